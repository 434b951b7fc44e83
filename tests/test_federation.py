"""The round loop end to end on a tiny model: learning, determinism, resume, bad updates, budgets,
export."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedpeft.config import ConfigError
from fedpeft.federation import Callbacks, Federation, sample_clients
from fedpeft.privacy.accounting import calibrate_budget
from fedpeft.state import ClientUpdate
from fedpeft.validation import validate_update
from tests.conftest import tiny_spec


def _run(spec, out, **kw):
    return Federation.build(spec).run(out, **kw)


@pytest.mark.parametrize("strategy", ["fedavg", "fedsvd"])
def test_tiny_federation_learns(tmp_path, strategy):
    spec = tiny_spec(strategy__name=strategy, federation__rounds=6, train__local_steps=10)
    result = _run(spec, tmp_path)
    s = result.summary
    assert s["accuracy"] >= s["majority_rate"] + 0.15, result.history
    assert s["epsilon"] is None and s["delta"] is None


def test_private_federation_spends_at_most_its_budget_and_learns(tmp_path):
    spec = tiny_spec(privacy__epsilon=8.0, federation__rounds=6, train__local_steps=10, federation__clients_per_round=4)
    result = _run(spec, tmp_path)
    s = result.summary
    assert 7.0 < s["epsilon"] <= 8.0
    assert len(s["epsilon_per_client"]) == 4 and all(e <= 8.0 for e in s["epsilon_per_client"].values())
    eps = [r["epsilon_max"] for r in result.history]
    assert eps == sorted(eps) and eps[0] > 0
    assert s["accuracy"] >= s["majority_rate"] + 0.1, result.history


def test_outputs_follow_the_contract(tmp_path):
    result = _run(tiny_spec(privacy__epsilon=6.0), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert {"round", "accuracy", "loss", "epsilon_max", "clients", "seconds"} <= set(r)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"strategy", "rounds", "accuracy", "epsilon", "delta", "seed", "spec"} <= set(summary)
    assert summary["accuracy"] == lines[-1]["accuracy"] == result.summary["accuracy"]
    assert summary["spec"]["privacy"]["epsilon"] == 6.0 and summary["delta"] == 1e-5
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > summary["bytes_up"] / 3


def test_same_seed_same_result_and_other_seed_differs(tmp_path):
    spec = tiny_spec(privacy__epsilon=8.0, strategy__name="fedsvd")
    a = _run(spec, tmp_path / "a")
    b = _run(spec, tmp_path / "b")
    c = _run(tiny_spec(privacy__epsilon=8.0, strategy__name="fedsvd", federation__seed=1), tmp_path / "c")
    for name, tensor in a.state.tensors.items():
        assert torch.equal(tensor, b.state.tensors[name]), name
    assert [r["accuracy"] for r in a.history] == [r["accuracy"] for r in b.history]
    assert any(not torch.equal(t, c.state.tensors[n]) for n, t in a.state.tensors.items())


class _Crash(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    spec = tiny_spec(privacy__epsilon=8.0, strategy__name="fedsvd", federation__rounds=4)
    full = _run(spec, tmp_path / "full")

    def crash_after_round_2(record):
        if record["round"] == 2:
            raise _Crash

    with pytest.raises(_Crash):
        _run(spec, tmp_path / "cut", callbacks=Callbacks(on_round_end=crash_after_round_2))
    assert not (tmp_path / "cut" / "summary.json").exists()  # no result from a killed run
    resumed = _run(spec, tmp_path / "cut", resume=True)
    for name, tensor in full.state.tensors.items():
        assert torch.equal(tensor, resumed.state.tensors[name]), name

    def untimed(history):
        return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in history]

    assert untimed(resumed.history) == untimed(full.history)
    assert [json.loads(line)["round"] for line in (tmp_path / "cut" / "rounds.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    assert resumed.summary["epsilon_per_client"] == full.summary["epsilon_per_client"]


def test_validate_update_rejects_nan_shape_and_names():
    fed = Federation.build(tiny_spec())
    state = fed.model.state()
    names = list(fed.plan.uploads)
    good = ClientUpdate(0, 10, {n: state.tensors[n].clone() for n in names})
    assert validate_update(good, names, state) is None
    nan = ClientUpdate(0, 10, {**good.tensors, names[0]: torch.full_like(state.tensors[names[0]], float("nan"))})
    assert "non-finite" in validate_update(nan, names, state)
    wrong = ClientUpdate(0, 10, {**good.tensors, names[0]: torch.zeros(3)})
    assert "shape" in validate_update(wrong, names, state)
    assert "missing" in validate_update(ClientUpdate(0, 10, dict(list(good.tensors.items())[1:])), names, state)
    assert "dtype" in validate_update(
        ClientUpdate(0, 10, {**good.tensors, names[0]: state.tensors[names[0]].double()}), names, state
    )
    assert "num_examples" in validate_update(ClientUpdate(0, 0, good.tensors), names, state)


class _PoisonClientZero:
    """Wraps an executor; client 0 sends NaNs (a diverged or malicious client)."""

    def __init__(self, inner):
        self.inner = inner

    def run_round(self, *args, **kwargs):
        results = self.inner.run_round(*args, **kwargs)
        for r in results:
            if isinstance(r, ClientUpdate) and r.client_id == 0:
                r.tensors = {n: torch.full_like(t, float("nan")) for n, t in r.tensors.items()}
        return results

    def client_states(self):
        return self.inner.client_states()

    def load_client_states(self, states):
        self.inner.load_client_states(states)


def test_nan_update_is_dropped_not_aggregated(tmp_path):
    spec = tiny_spec(federation__clients_per_round=4, federation__rounds=2)
    fed = Federation.build(spec)
    fed.executor = _PoisonClientZero(fed.executor)
    result = fed.run(tmp_path)
    for record in result.history:
        assert 0 not in record["clients"] and "non-finite" in record["dropped"]["0"]
        assert record["aggregated"]
    assert all(torch.isfinite(t).all() for t in result.state.tensors.values())
    assert result.summary["accuracy"] > 0


def test_client_over_budget_refuses_and_round_goes_on(tmp_path):
    spec = tiny_spec(
        privacy__epsilon=3.0, federation__rounds=3, federation__clients_per_round=4, federation__min_clients=1
    )
    fed = Federation.build(spec)
    # client 2's budget was planned for a single round: it must refuse rounds 2 and 3
    short = calibrate_budget(2, len(fed.data.clients[2]), 16, 1, 5, 3.0, 1e-5, "prv")
    fed.executor.budgets[2] = short
    result = fed.run(tmp_path)
    first, *later = result.history
    assert 2 in first["clients"]
    for record in later:
        assert 2 not in record["clients"] and record["aggregated"]
        assert "refuses to train" in record["dropped"]["2"] and "budget 3" in record["dropped"]["2"]
    assert result.summary["epsilon_per_client"]["2"] <= 3.0


def test_round_without_enough_updates_keeps_the_global_adapter(tmp_path):
    spec = tiny_spec(federation__clients_per_round=4, federation__min_clients=4, federation__rounds=1)
    fed = Federation.build(spec)
    before = fed.model.state()
    fed.executor = _PoisonClientZero(fed.executor)
    result = fed.run(tmp_path)
    assert not result.history[0]["aggregated"]
    assert all(torch.equal(before.tensors[n], t) for n, t in result.state.tensors.items())


def test_export_loads_with_peft_and_reproduces_the_global_model(tmp_path):
    from peft import PeftModel

    from fedpeft.client import evaluate
    from fedpeft.models import build_model

    spec = tiny_spec(federation__rounds=2)
    fed = Federation.build(spec)
    result = fed.run(tmp_path)
    base, _ = build_model(spec.model.name, 2, spec.model.layers, spec.federation.seed)
    loaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ids, mask, _ = fed.data.test.batch(torch.arange(32))
    fed.model.load(result.state)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask), fed.model.forward(ids, mask))
    assert evaluate(fed.model, result.state, fed.data.test, 64)["accuracy"] == result.summary["accuracy"]


def test_client_sampling_is_seeded_and_valid():
    picks = [sample_clients(0, r, 10, 3) for r in range(1, 6)]
    assert picks == [sample_clients(0, r, 10, 3) for r in range(1, 6)]
    assert all(len(set(p)) == 3 and all(0 <= c < 10 for c in p) for p in picks)
    assert len({tuple(p) for p in picks}) > 1


def test_frozen_head_stays_at_its_shared_seeded_init(tmp_path):
    spec = tiny_spec(model__train_head=False, strategy__name="fedsvd", federation__rounds=2)
    fed = Federation.build(spec)
    assert not any(n.startswith("head.") for n in fed.plan.uploads)
    before = fed.model.state()
    result = fed.run(tmp_path)
    for name in ("head.weight", "head.bias"):
        assert torch.equal(result.state.tensors[name], before.tensors[name])
    # the same seed gives every client and the server the same head
    assert torch.equal(Federation.build(spec).model.state().tensors["head.weight"], before.tensors["head.weight"])
    assert any(
        not torch.equal(result.state.tensors[n], before.tensors[n]) for n in result.state.tensors if ".lora_B." in n
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_eval_subset_scores_rounds_before_the_last_on_a_fixed_seeded_subset(tmp_path, monkeypatch):
    """federation.eval_subset: rounds 1..R-1 on the same seeded rows, round R on the whole split;
    the model and its training are untouched, and last-3 and best use whole-split scores only."""
    import fedpeft.federation as federation_module
    from fedpeft.federation import seed_for

    scored = []  # the rows each evaluation saw

    def spy(model, state, data, batch_size):  # noqa: ANN001, ANN202
        scored.append(data.input_ids.clone())
        return evaluate(model, state, data, batch_size)

    evaluate = federation_module.evaluate
    monkeypatch.setattr(federation_module, "evaluate", spy)
    spec = tiny_spec(federation__rounds=3, federation__eval_subset=20, data__test_size=60)
    federation = Federation.build(spec)
    result = federation.run(tmp_path / "subset")
    assert [r["scored_on"] for r in result.history] == ["subset", "subset", "whole"]
    subset = federation.data.test.sample(20, seed_for(spec.federation.seed, 0, 0, 2))
    assert len(subset) == 20 and len(federation.data.test) == 60
    assert [len(x) for x in scored] == [20, 20, 60]
    assert torch.equal(scored[0], subset.input_ids) and torch.equal(scored[1], subset.input_ids)
    assert torch.equal(scored[2], federation.data.test.input_ids)
    monkeypatch.undo()
    whole = Federation.build(tiny_spec(federation__rounds=3, data__test_size=60)).run(tmp_path / "whole")
    assert [r["scored_on"] for r in whole.history] == ["whole"] * 3
    assert result.history[-1]["accuracy"] == whole.history[-1]["accuracy"]  # the same training
    assert result.summary["accuracy_last3"] == result.summary["best_accuracy"] == result.history[-1]["accuracy"]
    assert result.summary["accuracy_last3_rounds"] == [3] and whole.summary["accuracy_last3_rounds"] == [1, 2, 3]
    from fedpeft.plots import plot_run

    assert plot_run(result.history, tmp_path / "a.png").stat().st_size > 0


def test_eval_subset_must_not_be_negative():
    with pytest.raises(ConfigError, match="federation.eval_subset must be >= 0"):
        tiny_spec(federation__eval_subset=-1)


def test_missing_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available; use auto or cpu"):
        Federation.build(tiny_spec(federation__device="cuda"))


def test_eval_every_skips_rounds_but_always_evaluates_the_last(tmp_path):
    spec = tiny_spec(federation__rounds=3, federation__eval_every=2)
    result = Federation.build(spec).run(tmp_path / "run")
    assert [r["accuracy"] is None for r in result.history] == [True, False, False]
    full = Federation.build(tiny_spec(federation__rounds=3)).run(tmp_path / "full")
    assert result.history[-1]["accuracy"] == full.history[-1]["accuracy"]  # the same run, fewer evaluations
    assert result.summary["best_accuracy"] == max(r["accuracy"] for r in result.history[1:])


def test_macro_f1_and_mcc_match_their_definitions_and_are_recorded(tmp_path):
    """The class scores against sklearn-free references computed by hand, and in rounds.jsonl and
    summary.json of a run."""
    from fedpeft.client import class_scores

    # 3 classes: true rows, predicted columns
    confusion = torch.tensor([[5.0, 1.0, 0.0], [2.0, 3.0, 1.0], [0.0, 0.0, 4.0]], dtype=torch.float64)
    f1 = [2 * 5 / (6 + 7), 2 * 3 / (6 + 4), 2 * 4 / (4 + 5)]
    n, c = 16.0, 12.0
    t, p = [6.0, 6.0, 4.0], [7.0, 4.0, 5.0]
    mcc = (c * n - sum(a * b for a, b in zip(t, p, strict=True))) / math.sqrt(
        (n * n - sum(b * b for b in p)) * (n * n - sum(a * a for a in t))
    )
    scores = class_scores(confusion)
    assert scores["f1_macro"] == pytest.approx(sum(f1) / 3) and scores["mcc"] == pytest.approx(mcc)
    binary = class_scores(torch.tensor([[3.0, 1.0], [2.0, 4.0]], dtype=torch.float64))
    assert binary["mcc"] == pytest.approx((3 * 4 - 1 * 2) / math.sqrt(4 * 6 * 5 * 5))  # the 2x2 formula
    assert class_scores(torch.tensor([[4.0, 0.0], [6.0, 0.0]], dtype=torch.float64))["mcc"] == 0.0  # constant
    result = _run(tiny_spec(federation__rounds=1), tmp_path / "run")
    assert 0 <= result.summary["f1_macro"] <= 1 and -1 <= result.summary["mcc"] <= 1
    assert result.history[-1]["f1_macro"] == result.summary["f1_macro"]
