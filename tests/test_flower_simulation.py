"""The Flower app through `flwr run .` in Flower's simulation runtime (Ray), as a user types it
(slow: real processes). Its final adapter equals the in-process run's; with SecAgg+, within the
quantisation's tolerance."""

from __future__ import annotations

import json

import pytest

from fedpeft.deploy import flwr_simulation, run_config_arg
from tests.runtime_helpers import (
    ROOT,
    SECAGG_TOLERANCE,
    assert_close_adapter,
    assert_same_adapter,
    run_in_process,
    runtime_spec,
)

pytestmark = pytest.mark.slow


def test_flwr_run_simulation_equals_in_process(tmp_path):
    spec = runtime_spec()
    reference = run_in_process(spec, tmp_path / "in-process")
    out = tmp_path / "flwr-sim"
    proc = flwr_simulation(ROOT, run_config_arg(spec, out), nodes=3, flwr_home=tmp_path / "flwr-home", timeout=400)
    assert (out / "summary.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_adapter(out, tmp_path / "in-process")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(reference.summary["accuracy"], abs=1e-6)
    assert "round 2: accuracy" in proc.stdout + proc.stderr  # progress streamed to the user


def test_flwr_run_simulation_with_secagg(tmp_path):
    spec = runtime_spec()
    run_in_process(spec, tmp_path / "in-process")
    out = tmp_path / "flwr-sim"
    secure = spec.with_flat({"federation.secagg": True})
    proc = flwr_simulation(ROOT, run_config_arg(secure, out), nodes=3, flwr_home=tmp_path / "flwr-home", timeout=400)
    assert (out / "summary.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_close_adapter(out, tmp_path / "in-process", SECAGG_TOLERANCE)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rounds] == [[0, 1, 2], [0, 1, 2]]
