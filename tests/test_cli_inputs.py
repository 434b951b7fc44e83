"""Every command-line entry point answers bad input with one line, an exit status, and no hang.

Each case runs `fedpeft.cli.main` in-process under an alarm: a regression that loops forever (as
`privacy --q 0` did) fails here instead of hanging the suite."""

from __future__ import annotations

import json
import signal
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.cli import main

TINY = ["--set", "model.name=tiny-bert", "data.name=synthetic", "federation.rounds=1", "privacy.epsilon=inf"]


def _answer(argv, capsys, seconds=60):
    def hang(signum, frame):  # noqa: ANN001
        raise TimeoutError(f"fedpeft {' '.join(argv)} did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, capsys.readouterr().err


def _one_line_error(code, err, expected):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("fedpeft: error:"), err
    assert "Traceback" not in err
    assert expected in lines[-1], lines[-1]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["privacy", "--q", "0", "--steps", "10", "--epsilon", "1"], "q must be in (0, 1]"),
        (["privacy", "--q", "1.5", "--steps", "10", "--epsilon", "1"], "q must be in (0, 1]"),
        (["privacy", "--q", "0.01", "--steps", "0", "--epsilon", "1"], "steps must be an integer >= 1"),
        (["privacy", "--q", "0.01", "--steps", "10", "--sigma", "0"], "sigma must be a finite number > 0"),
        (["privacy", "--q", "0.01", "--steps", "10", "--delta", "2", "--epsilon", "1"], "delta must be in (0, 1)"),
        (["privacy", "--q", "0.01", "--steps", "10"], "give --sigma to compute epsilon"),
        (["simulate", *TINY[:1], "name=../../x"], "must stay inside runs/"),
        (["sweep", "no-such.toml"], "does not exist"),
        (["report", "no-such-dir"], "no finished runs"),
        (["predict", "no-such-dir", "text"], "holds no exported model"),
        (["audit", "--set", "model.name=nope"], "nope"),
    ],
)
def test_bad_input_is_one_line_and_returns(argv, expected, capsys):
    _one_line_error(*_answer(argv, capsys), expected)


def test_out_naming_a_file_and_a_report_of_broken_summaries(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(*_answer(["simulate", *TINY, "--out", str(afile)], capsys), "is a file, not a directory")
    run = tmp_path / "sweep" / "fedavg" / "eps-inf" / "seed-0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"strategy": "fedavg"}))
    _one_line_error(*_answer(["report", str(tmp_path / "sweep")], capsys), "is not a fedpeft summary")
    (run / "summary.json").write_text("{torn")
    _one_line_error(*_answer(["report", str(tmp_path / "sweep")], capsys), "is not readable JSON")


def test_node_ledger_on_a_missing_dir_or_a_torn_ledger(tmp_path, capsys):
    _one_line_error(*_answer(["node", "ledger", "--state-dir", str(tmp_path / "none")], capsys), "no node state there")
    assert not (tmp_path / "none").exists()
    (tmp_path / "lifetime.json").write_text("{torn")
    _one_line_error(
        *_answer(["node", "ledger", "--state-dir", str(tmp_path)], capsys),
        "is torn and there is nothing to recover it from",
    )
    _one_line_error(
        *_answer(["node", "ledger", "--state-dir", str(tmp_path), "--reset", "x"], capsys), "nothing to recover it from"
    )
    assert (tmp_path / "lifetime.json").read_text() == "{torn"  # never rewritten


def test_report_with_an_unknown_baseline_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    _one_line_error(*_answer(["report", str(tmp_path), "--baseline", "typo"], capsys), "baseline 'typo'")
    assert not (tmp_path / "results.csv").exists() and not (tmp_path / "results.md").exists()


def test_a_torn_export_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _one_line_error(*_answer(["predict", str(out), "a film"], capsys), "cannot be read")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    q=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1.0, 1e-9])),
    steps=st.integers(min_value=-5, max_value=50),
    delta=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, 1e-5])),
)
def test_privacy_never_hangs_or_tracebacks(q, steps, delta, capsys):
    argv = ["privacy", f"--q={q!r}", f"--steps={steps}", f"--delta={delta!r}", "--sigma=1.0"]
    code, err = _answer(argv, capsys)
    if code != 0:
        _one_line_error(code, err, "")
    assert "Traceback" not in err


@settings(max_examples=30, deadline=None)
@given(name=st.text(alphabet=string.printable, min_size=1, max_size=20))
def test_a_run_name_never_leaves_runs(name):
    from fedpeft.config import ConfigError
    from fedpeft.spec_io import resolve_spec

    try:
        spec = resolve_spec(None, [f"name={json.dumps(name)}"])
    except (ConfigError, ValueError):
        return
    from pathlib import Path

    path = (Path("runs") / f"{spec.name}-20260101-000000").resolve()
    assert Path("runs").resolve() in path.parents


def test_a_full_disk_at_a_checkpoint_is_one_line_and_a_killed_writes_temporaries_are_swept(tmp_path, capsys,
                                                                                            monkeypatch):  # fmt: skip
    """torch reports a failed write as RuntimeError (before: ~40 lines of traceback); the temporary files
    of writes a killed run left are removed when the directory is next locked."""
    import torch

    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")

    def full(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full)
    code, err = _answer(["simulate", *TINY, "--out", str(out)], capsys)
    _one_line_error(code, err, "could not write the checkpoint (")
    assert str(out / "checkpoint.pt") in err and not stale.exists()
    assert not list(out.glob(".*.tmp"))
