"""After a run: `fedpeft predict` on its exported model, tokenizers that behave like Hugging Face's,
run names that say what ran, and report units that fit the numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedpeft import Predictor, load_exported, predict
from fedpeft.cli import main
from fedpeft.federation import Federation
from fedpeft.models import MODELS, build_model
from fedpeft.report import markdown
from fedpeft.spec_io import resolve_spec
from tests.conftest import tiny_spec

TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "ok"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):  # noqa: ANN201
    out = tmp_path_factory.mktemp("run")
    Federation.build(tiny_spec(federation__rounds=1)).run(out)
    return out


def test_predict_is_the_exported_models_softmax(run_dir):
    """Predictions equal the loaded model's own forward pass on the training-time encoding."""
    model, tokenizer = load_exported(run_dir)
    ids, mask = tokenizer.encode_batch(TEXTS, 24)
    with torch.no_grad():
        expected = torch.softmax(model(input_ids=ids, attention_mask=mask), dim=-1)
    predictions = predict(run_dir, TEXTS)
    names = json.loads((run_dir / "fedpeft_model.json").read_text())["label_names"]
    assert len(names) == expected.shape[1] and [p.text for p in predictions] == TEXTS
    for p, probs in zip(predictions, expected, strict=True):
        assert list(p.probabilities) == names
        torch.testing.assert_close(torch.tensor(list(p.probabilities.values())), probs, atol=1e-5, rtol=0)
        assert p.label == names[int(probs.argmax())] and p.probability == max(p.probabilities.values())
    assert math.isclose(sum(predictions[0].probabilities.values()), 1.0, abs_tol=1e-6)
    assert [p.label for p in Predictor(run_dir)(TEXTS, batch_size=2)] == [p.label for p in predictions]


def test_predict_command_prints_one_line_per_text(run_dir, tmp_path, capsys):
    lines = tmp_path / "texts.txt"
    lines.write_text("from a file\n\n")
    assert main(["predict", str(run_dir), *TEXTS[:2], "--file", str(lines), "--tsv"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [r[2] for r in rows] == [*TEXTS[:2], "from a file"]
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows)
    assert main(["predict", str(tmp_path), "x"]) == 2
    assert "holds no exported model" in capsys.readouterr().err
    assert main(["predict", str(run_dir)]) == 2
    assert "nothing to predict" in capsys.readouterr().err
    assert main(["predict", str(run_dir), "--file", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n in MODELS.names() if MODELS.get(n).task == "classify"])
def test_every_models_tokenizer_is_called_like_hugging_faces(name):
    _, tok = build_model(name, num_labels=2, layers=1, seed=0)
    one = tok("Hello world, again")
    assert isinstance(one["input_ids"], list) and len(one["input_ids"]) == len(one["attention_mask"]) > 2
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == len(TEXTS)
    assert batch["attention_mask"].sum(1).tolist() == [len(tok(t)["input_ids"]) for t in TEXTS]
    ids, mask = tok.encode_batch(TEXTS, 16)  # what training uses: the same as the call at max_length
    fixed = tok(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(ids, fixed["input_ids"].long()) and torch.equal(mask, fixed["attention_mask"].long())
    assert tok(TEXTS[0] * 20, truncation=True, max_length=8)["input_ids"].__len__() == 8


def test_run_names_say_what_the_overrides_changed():
    assert resolve_spec(None, []).name == "quickstart"
    changed = resolve_spec(None, ["model.name=tiny-bert", "data.name=synthetic", "privacy.epsilon=inf"])
    assert changed.name == "quickstart-tiny-bert-synthetic-epsiloninf"
    assert resolve_spec(None, ["federation.rounds=24"]).name == "quickstart"  # the quickstart's own value
    assert resolve_spec(None, ["name=mine", "federation.rounds=3"]).name == "mine"
    assert resolve_spec(None, ["sweep.seeds=[0,1]"]).name == "quickstart"  # a sweep's grid is not the run
    long = resolve_spec(None, [f"model.targets={json.dumps(['query', 'key', 'value', 'dense'] * 6)}"]).name
    assert len(long) <= len("quickstart-") + 64 and long != resolve_spec(None, ["model.targets=['query']"]).name


def test_the_simulate_directory_carries_the_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["simulate", "--set", "model.name=tiny-bert", "data.name=synthetic", "data.test_size=100",
            "federation.rounds=1", "train.local_steps=2", "train.batch_size=16", "model.max_length=24"]  # fmt: skip
    assert main(args) == 0
    (run,) = (tmp_path / "runs").iterdir()
    name = json.loads((run / "summary.json").read_text())["spec"]["name"]
    assert name.startswith("quickstart-rounds1-tiny-bert-") and "synthetic" in name
    assert run.name.startswith(f"{name}-") and f"fedpeft {name}: fedavg" in capsys.readouterr().err


def _row(up_mb: float, down_mb: float) -> dict:
    return {
        "strategy": "fedsvd", "epsilon": "8", "seeds": 1, "accuracy_mean": 0.7, "accuracy_ci95": float("nan"),
        "accuracy_min": 0.7, "accuracy_max": 0.7, "accuracy_last3_mean": 0.7, "accuracy_last3_ci95": float("nan"),
        "adapter_change": 0.01, "epsilon_spent": 8.0, "mbytes_up": up_mb, "mbytes_down": down_mb,
        "seconds": 10.0, "majority_rate": 0.5,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("up", "down", "header", "cells"),
    [(3.2, 1.5, "MB up | MB down", "3.2 | 1.5"), (0.0123, 0.0456, "kB up | kB down", "12.3 | 45.6"),
     (2e-4, 1e-4, "B up | B down", "200 | 100"), (2.4, 0.0015, "MB up | MB down", "2.4 | 0.0015")],
)  # fmt: skip
def test_report_bytes_in_a_unit_that_fits(up, down, header, cells):
    table = markdown([_row(up, down)])
    assert header in table and f"| {cells} |" in table
