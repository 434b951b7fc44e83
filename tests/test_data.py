"""Datasets, the held-out split and partitioners; the offline model and data packages."""

import json

import pytest
import torch

from fedpeft.config import DataConfig
from fedpeft.data import DATASETS, prepare
from fedpeft.data.partition import partition
from fedpeft.data.synthetic import load as synthetic
from fedpeft.models import HashTokenizer


@pytest.mark.parametrize("how", ["iid", "dirichlet", "natural"])
def test_partitions_are_disjoint_cover_and_seeded(how):
    raw = synthetic()
    parts = partition(raw.labels, raw.groups, 5, how, alpha=0.5, seed=3)
    rows = sorted(r for p in parts for r in p)
    assert rows == list(range(len(raw.labels)))
    assert all(len(p) > 0 for p in parts)
    assert parts == partition(raw.labels, raw.groups, 5, how, alpha=0.5, seed=3)
    if how == "natural":
        owner = {}
        for cid, p in enumerate(parts):
            for r in p:
                assert owner.setdefault(raw.groups[r], cid) == cid, "a group was split across clients"


def test_dirichlet_skews_labels_more_than_iid():
    raw = synthetic()
    labels = torch.tensor(raw.labels, dtype=torch.float)

    def spread(parts):
        return float(torch.tensor([labels[p].mean() for p in parts]).std())

    assert spread(partition(raw.labels, raw.groups, 5, "dirichlet", 0.3, 0)) > 3 * spread(
        partition(raw.labels, raw.groups, 5, "iid", 0.3, 0)
    )


def test_natural_needs_enough_groups():
    with pytest.raises(ValueError, match="groups cannot fill"):
        partition([0, 1, 0], ["a", "a", "b"], 3, "natural", 0.5, 0)


def test_prepare_holds_out_a_disjoint_test_split():
    cfg = DataConfig(name="synthetic", partition="iid", test_size=300)
    fed = prepare(cfg, 4, HashTokenizer(256), 24, seed=0)
    assert len(fed.test) == 300 and sum(len(c) for c in fed.clients) == 2000 - 300
    seen = {tuple(x.tolist()) for c in fed.clients for x in c.input_ids}
    # synthetic texts can collide; the split is by row, so just check sizes and label range
    assert len(seen) > 1000 and set(fed.test.labels.tolist()) == {0, 1}
    capped = prepare(
        DataConfig(name="synthetic", partition="iid", test_size=300, max_examples=400), 4, HashTokenizer(256), 24, 0
    )
    assert sum(len(c) for c in capped.clients) == 400
    with pytest.raises(ValueError, match="leaves no training data"):
        prepare(DataConfig(name="synthetic", test_size=5000), 4, HashTokenizer(256), 24, 0)


def test_batches_trim_padding_columns():
    fed = prepare(DataConfig(name="synthetic", partition="iid", test_size=100), 2, HashTokenizer(256), 24, 0)
    ids, mask, labels = fed.test.batch(torch.arange(8))
    assert ids.shape[1] == int(mask.sum(1).max()) < 24 and mask[:, -1].any()


def test_rotten_tomatoes_and_minilm_load_offline():
    """The packaged real data and pretrained model (installed by the README's set-up)."""
    from fedpeft.models import build_model

    raw = DATASETS.get("rotten-tomatoes")()
    assert 12_000 < len(raw.texts) < 12_900 and len(set(raw.texts)) == len(raw.texts)
    assert raw.label_names == ("rotten", "fresh") and 400 < len(set(raw.groups)) <= 508
    assert 0.55 < sum(raw.labels) / len(raw.labels) < 0.6
    model, tokenizer = build_model("minilm", 2, 1, seed=0)
    ids, mask = tokenizer.encode_batch(["a gripping, beautifully acted film"], 16)
    assert ids[0, 0] == 101 and int(mask.sum()) < 16  # [CLS], padded
    assert len(model.backbone.encoder.layer) == 1
    with torch.no_grad():
        assert model(ids, mask).shape == (1, 2)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_chatterbot_test_split_shares_no_conversation_and_no_answer_with_any_client(seed):
    """Issue 33: held out by conversation, and no test answer is verbatim a client's prompt or
    answer. The clients' pairs are read back from their token rows (the byte tokenizer inverts)."""
    from fedpeft.causal import ByteChatTokenizer

    raw = DATASETS.get("chatterbot")()
    tokenizer = ByteChatTokenizer()
    data = prepare(DataConfig(name="chatterbot", partition="natural", test_size=100), 4, tokenizer, 2048, seed, raw=raw)
    assert 60 <= len(data.test_pairs) <= 110 and len(data.test) == len(data.test_pairs)
    clients = set()
    for client in data.clients:
        for row in client.input_ids.tolist():
            cut = row.index(2)  # <user> prompt <assistant> answer <end>
            clients.add((tokenizer.decode(row[1:cut]), tokenizer.decode(row[cut + 1 : row.index(3)])))
    assert len(clients) == sum(len(c) for c in data.clients)
    unit = {(p, a): u for p, a, u in zip(raw.texts, raw.answers, raw.units, strict=True)}
    assert not {unit[pair] for pair in data.test_pairs} & {unit[pair] for pair in clients}
    client_text = {p for p, _ in clients} | {a for _, a in clients}
    assert not [a for _, a in data.test_pairs if a in client_text]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        (
            "big.csv",
            "text,label\n" + '"' + "x" * 200_000 + '",0\n',
            "big.csv:2: not CSV (field larger than field limit",
        ),
        ("sup.jsonl", json.dumps({"text": "a", "label": "\u00b2"}) + "\n", "sup.jsonl:1: its label is none of"),
        ("long.jsonl", '{"text": "a", "label": "' + "7" * 5000 + '"}\n', "long.jsonl:1: its label is none of"),
        ("int.jsonl", '{"text": "a", "label": ' + "7" * 5000 + "}\n", "int.jsonl:1: not usable JSON"),
        ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "deep.jsonl:1: JSON nested too deep"),
        ("line.jsonl", json.dumps({"text": "x" * 2_000_000, "label": 0}) + "\n", "line.jsonl:1: a line of 2,000,0"),
        ("text.jsonl", json.dumps({"text": "x" * 200_000, "label": 0}) + "\n", "text.jsonl:1: a text of 200,000"),
    ],
)
def test_a_hostile_data_file_is_one_clear_error(tmp_path, name, content, expected):
    """Before: a CSV field over 128 kB, the label "²", a 5,000-digit label and JSON nested 100,000 deep
    escaped as tracebacks, and one 40 MB line was tokenised (53 s, 7 GB)."""
    from fedpeft.config import ConfigError
    from fedpeft.data import load_file

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_file(path, ("negative", "positive"))
    assert str(caught.value).startswith(str(tmp_path / expected.split(":")[0])) and expected in str(caught.value)
