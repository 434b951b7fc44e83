"""The Flower app on a loopback deployment (slow: real processes): a TLS SuperLink and 3
authenticated SuperNodes as separate processes. The final adapter equals the in-process run; with
SecAgg+ within quantisation. A node killed mid-run: test_flower_deployment_faults.py (a
deployment of its own, so that the two files run on two workers)."""

from __future__ import annotations

import json

import pytest

from fedpeft.adapters import load_exported
from fedpeft.deploy import run_config_arg
from tests.runtime_helpers import (
    ROOT,
    SECAGG_TOLERANCE,
    assert_close_adapter,
    assert_same_adapter,
    run_in_process,
    runtime_spec,
)

pytestmark = pytest.mark.slow


def test_deployment_equals_in_process(deployment, tmp_path):
    spec = runtime_spec()
    run_in_process(spec, tmp_path / "in-process")
    out = tmp_path / "deployed"
    proc = deployment.run(ROOT, run_config_arg(spec, out), timeout=400)
    assert (out / "summary.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_adapter(out, tmp_path / "in-process")
    model = load_exported(out)  # the exported adapter loads as a model too
    assert model is not None


def test_deployment_with_secagg(deployment, tmp_path):
    spec = runtime_spec()
    run_in_process(spec, tmp_path / "in-process")
    out = tmp_path / "deployed"
    proc = deployment.run(ROOT, run_config_arg(spec.with_flat({"federation.secagg": True}), out), timeout=400)
    assert (out / "summary.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rounds] == [[0, 1, 2], [0, 1, 2]]
    assert_close_adapter(out, tmp_path / "in-process", SECAGG_TOLERANCE)
