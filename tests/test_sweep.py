"""`fedpeft sweep` and `fedpeft report`: the grid, resuming an interrupted sweep, the tables."""

from __future__ import annotations

import csv
import json
import math

import pytest

from fedpeft.cli import main
from fedpeft.federation import Federation
from fedpeft.report import _ci95, collect, summarise
from fedpeft.sweep import cells, run_sweep
from tests.conftest import tiny_spec


def _sweep_spec(**kw):
    return tiny_spec(**{
        "sweep__strategies": ["fedavg", "fedsvd"], "sweep__epsilons": [float("inf"), 4.0], "sweep__seeds": [0, 1],
        "federation__rounds": 2, "train__local_steps": 3, **kw,
    })  # fmt: skip


def test_grid_covers_every_combination(tmp_path):
    grid = cells(_sweep_spec(strategy__name="fedsvd", strategy__refactor_period=2), tmp_path)
    assert len(grid) == 8 and len({c.path for c in grid}) == 8
    combos = {(c.spec.strategy.name, c.spec.privacy.epsilon, c.spec.federation.seed) for c in grid}
    assert combos == {(s, e, seed) for s in ("fedavg", "fedsvd") for e in (math.inf, 4.0) for seed in (0, 1)}
    assert all(
        c.spec.strategy.kwargs == ({"refactor_period": 2} if c.spec.strategy.name == "fedsvd" else {}) for c in grid
    )
    assert (tmp_path / "fedsvd" / "eps-inf" / "seed-1") in {c.path for c in grid}


def test_per_arm_learning_rates_reach_their_cells(tmp_path):
    """sweep.lrs: an arm's budget-specific lr, else its default, else train.lr."""
    spec = _sweep_spec(sweep__lrs=["fedsvd=0.2", "fedsvd@inf=0.05"], train__lr=0.3)
    lrs = {(c.spec.strategy.name, c.spec.privacy.epsilon): c.spec.train.lr for c in cells(spec, tmp_path)}
    assert lrs == {("fedsvd", math.inf): 0.05, ("fedsvd", 4.0): 0.2, ("fedavg", math.inf): 0.3, ("fedavg", 4.0): 0.3}
    for bad, message in (
        (["ffa=0.1"], "names no arm of the grid: fedavg, fedsvd"),
        (["fedavg@3=0.1"], "names no budget of the grid"),
        (["fedavg:0.1"], "is not ARM=VALUE or ARM@EPSILON=VALUE"),
        (["fedavg=-1"], "is not ARM=VALUE"),
        (["fedavg=inf"], "is not ARM=VALUE"),
    ):
        with pytest.raises(ValueError, match=message):
            cells(_sweep_spec(sweep__lrs=bad), tmp_path)


def test_per_arm_clip_bounds_reach_their_cells(tmp_path):
    """sweep.clips: as sweep.lrs, for privacy.clip (B-only arms' gradients are ~20x smaller than A+B's)."""
    spec = _sweep_spec(sweep__clips=["fedsvd=0.05", "fedavg@4=0.9"], privacy__clip=2.0)
    clips = {(c.spec.strategy.name, c.spec.privacy.epsilon): c.spec.privacy.clip for c in cells(spec, tmp_path)}
    assert clips == {("fedsvd", math.inf): 0.05, ("fedsvd", 4.0): 0.05, ("fedavg", math.inf): 2.0, ("fedavg", 4.0): 0.9}
    assert all(c.spec.train.lr == spec.train.lr for c in cells(spec, tmp_path))  # clips leave lrs alone
    with pytest.raises(ValueError, match="sweep.clips entry 'ffa=0.1' names no arm"):
        cells(_sweep_spec(sweep__clips=["ffa=0.1"]), tmp_path)


def test_interrupted_sweep_resumes_without_redoing_cells(tmp_path, monkeypatch):
    spec = _sweep_spec()
    original = Federation.run
    calls = []

    def flaky(self, out, resume=False, callbacks=None):
        calls.append(out)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third cell
        return original(self, out, resume=resume, callbacks=callbacks)

    monkeypatch.setattr(Federation, "run", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path)
    finished = sorted(p.parent for p in tmp_path.rglob("summary.json"))
    assert len(finished) == 2
    stamps = {p: (p / "summary.json").stat().st_mtime_ns for p in finished}
    monkeypatch.setattr(Federation, "run", original)
    paths = run_sweep(spec, tmp_path)
    assert len(list(tmp_path.rglob("summary.json"))) == 8
    assert all((p / "summary.json").stat().st_mtime_ns == t for p, t in stamps.items())  # not re-run
    for key in ("csv", "markdown", "accuracy_vs_epsilon", "accuracy_vs_round", "epsilon_vs_round"):
        assert paths[key].is_file(), key
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 4 and all(r["seeds"] == "2" for r in rows)
    assert {(r["strategy"], r["epsilon"]) for r in rows} == {(s, e) for s in ("fedavg", "fedsvd") for e in ("inf", "4")}
    assert "no DP" in paths["markdown"].read_text() and "ε = 4" in paths["markdown"].read_text()


def test_a_different_spec_cannot_reuse_a_sweep_directory(tmp_path, capsys):
    from fedpeft.sweep import prepare_sweep

    prepare_sweep(_sweep_spec(), tmp_path)
    with pytest.raises(ValueError, match="train.lr: sweep has 0.3, now 0.1.*another --out, or remove"):
        prepare_sweep(_sweep_spec(train__lr=0.1), tmp_path)
    with pytest.raises(ValueError, match=r"leaves out 4 cell\(s\).*seed-1.*not drop them"):  # other seeds
        prepare_sweep(_sweep_spec(sweep__seeds=[0, 2]), tmp_path)


def test_a_sweep_can_gain_seeds_and_arms_and_keeps_its_finished_cells(tmp_path):
    from fedpeft.sweep import SWEEP_SPEC, prepare_sweep

    prepare_sweep(_sweep_spec(), tmp_path)
    assert len(prepare_sweep(_sweep_spec(sweep__seeds=[0, 1, 2]), tmp_path)) == 12  # the same design, more power
    assert json.loads((tmp_path / SWEEP_SPEC).read_text())["sweep"]["seeds"] == [0, 1, 2]
    with pytest.raises(ValueError, match="leaves out 4 cell"):
        prepare_sweep(_sweep_spec(sweep__seeds=[0, 1]), tmp_path)  # now 3 seeds were asked for
    assert json.loads((tmp_path / SWEEP_SPEC).read_text())["sweep"]["seeds"] == [0, 1, 2]  # refused: unchanged
    with pytest.raises(ValueError, match="train.lr"):
        prepare_sweep(_sweep_spec(sweep__seeds=[0, 1, 2, 3], train__lr=0.1), tmp_path)
    more = _sweep_spec(sweep__seeds=[0, 1, 2], sweep__strategies=["fedavg", "fedsvd", "ffa"])
    assert len(prepare_sweep(more, tmp_path)) == 18  # an arm added


def _cut_in_third_cell(monkeypatch):  # noqa: ANN001, ANN202
    """Federation.run killed after the first round of the sweep's third cell (its checkpoint written)."""
    from fedpeft.federation import Callbacks

    original, calls = Federation.run, []

    def cut(self, out, resume=False, callbacks=None):  # noqa: ANN001, ANN202
        calls.append(out)
        if len(calls) == 3:
            callbacks = Callbacks(on_round_end=lambda record: (_ for _ in ()).throw(KeyboardInterrupt()))
        return original(self, out, resume=resume, callbacks=callbacks)

    monkeypatch.setattr(Federation, "run", cut)
    return original


def test_a_sweep_cut_mid_cell_continues_with_a_seed_added(tmp_path, monkeypatch):
    """Before: the cut cell's checkpoint carried the old [sweep] table, so the grown spec was refused,
    and sweep.json was already rewritten, so the old spec was refused too: wedged."""
    spec = _sweep_spec(sweep__strategies=["fedavg"])
    original = _cut_in_third_cell(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path)
    cut = [p.parent for p in tmp_path.rglob("checkpoint.pt") if not (p.parent / "summary.json").exists()]
    assert len(cut) == 1
    monkeypatch.setattr(Federation, "run", original)
    run_sweep(_sweep_spec(sweep__strategies=["fedavg"], sweep__seeds=[0, 1, 2]), tmp_path)
    assert len(list(tmp_path.rglob("summary.json"))) == 6
    assert [json.loads(line)["round"] for line in (cut[0] / "rounds.jsonl").read_text().splitlines()] == [1, 2]


def test_cells_run_with_another_spec_are_refused_never_reported_beside_the_others(tmp_path):
    """Before: sweep.json removed (as its error advised when torn), then rounds 2 -> 3: 2-round and
    3-round cells were reported side by side."""
    from fedpeft.sweep import SWEEP_SPEC

    spec = _sweep_spec(sweep__strategies=["fedavg"], sweep__epsilons=[float("inf")])
    run_sweep(spec, tmp_path)
    (tmp_path / SWEEP_SPEC).unlink()
    with pytest.raises(ValueError, match=r"2 cell\(s\).*federation.rounds: cell has 2, now 3.*rm -r .*seed-0"):
        run_sweep(_sweep_spec(sweep__strategies=["fedavg"], sweep__epsilons=[float("inf")], federation__rounds=3),
                  tmp_path)  # fmt: skip
    assert not (tmp_path / SWEEP_SPEC).exists()  # a refused start writes nothing


def test_confidence_interval_is_student_t():
    assert _ci95([1.0, 2.0, 3.0]) == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(_ci95([0.7]))


def test_report_from_files_alone(tmp_path, capsys):
    for seed, acc in ((0, 0.70), (1, 0.74), (2, 0.72)):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        summary = {
            "strategy": "ffa", "target_epsilon": 6.0, "epsilon": 5.98, "accuracy": acc, "majority_rate": 0.55,
            "bytes_up": 2e6, "bytes_down": 4e6, "seconds": 60.0, "seed": seed,
        }  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "rounds.jsonl").write_text(
            "".join(
                json.dumps({"round": r, "accuracy": acc - 0.1 / r, "epsilon_max": 2.0 * r}) + "\n" for r in (1, 2, 3)
            )
        )
    (row,) = summarise(collect(tmp_path))
    assert row["accuracy_mean"] == pytest.approx(0.72) and row["accuracy_ci95"] == pytest.approx(
        _ci95([0.70, 0.74, 0.72])
    )
    assert row["epsilon_spent"] == 5.98 and row["mbytes_up"] == pytest.approx(2.0)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| ffa | 72.0 ± " in out
    assert (tmp_path / "accuracy_vs_round.png").stat().st_size > 1000


def test_report_of_an_empty_directory_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_paired_differences_are_per_seed():
    from fedpeft.report import detectable, paired

    runs = [
        {"strategy": s, "target": 3.0, "seed": seed, "accuracy": acc}
        for s, seed, acc in [("fedavg", 0, 0.60), ("fedavg", 1, 0.70), ("fedsvd", 0, 0.63), ("fedsvd", 1, 0.71)]
    ]
    text = paired(runs, "fedavg")
    half, mde = _ci95([3.0, 1.0]), detectable([3.0, 1.0])
    assert f"| fedsvd | +2.0 ± {half:.1f} (2/2; MDE {mde:.1f}) |" in text


def test_the_detectable_difference_is_the_paired_t_tests_power_formula():
    """n = 5, sd = 1: (t_0.975,4 + t_0.8,4) / sqrt(5) = (2.776 + 0.941) / 2.236 = 1.662; it shrinks
    as 1/sqrt(n) (roughly) with more seeds, and a larger spread needs a larger difference."""
    from fedpeft.report import detectable

    diffs = [x - 3 for x in (1.0, 2.0, 3.0, 4.0, 5.0)]  # sd = sqrt(2.5)
    assert detectable([d / 2.5**0.5 for d in diffs]) == pytest.approx(1.662, abs=2e-3)
    assert detectable([2 * d for d in diffs]) == pytest.approx(2 * detectable(diffs))
    assert detectable(diffs * 4) < detectable(diffs) / 1.9
    assert math.isnan(detectable([1.0]))
