"""The Flower app on a loopback deployment (slow: real processes), a node killed mid-run: with
privacy on, every node reports its epsilon, and the federation goes on without the dead node. Its
own deployment (the `deployment` fixture, tests/conftest.py), apart from test_flower_deployment.py,
so that the two files run on two workers at once."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from fedpeft.deploy import run_config_arg
from tests.runtime_helpers import ROOT, run_in_process, runtime_spec

pytestmark = pytest.mark.slow


def test_deployment_private_with_a_node_killed_mid_run(deployment, tmp_path):
    spec = runtime_spec(federation__rounds=3, privacy__epsilon=4.0)
    reference = run_in_process(spec, tmp_path / "in-process")
    out = tmp_path / "deployed"
    proc = subprocess.Popen(
        deployment.run_command(ROOT, run_config_arg(spec, out)), env=deployment.env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (out / "rounds.jsonl").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert (out / "rounds.jsonl").is_file(), "round 1 never finished"
        deployment.kill_node(2)
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / "summary.json").is_file(), output[-4000:]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["clients"] == [0, 1, 2]
    for r in rounds[1:]:  # the federation went on without the dead node, and said so
        assert r["clients"] == [0, 1] and r["aggregated"]
        assert "2" in r["dropped"]
    assert "missing client 2" in output
    # with privacy on, every node reported its own epsilon; round 1 matches the in-process ledgers
    assert rounds[0]["epsilon_max"] == pytest.approx(reference.history[0]["epsilon_max"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["epsilon_per_client"]) == {"0", "1", "2"}
    assert all(0 < e <= 4.0 for e in summary["epsilon_per_client"].values())
    assert summary["epsilon_per_client"]["2"] < summary["epsilon_per_client"]["0"]  # it trained once
    ledgers = sorted(deployment.directory.glob("node-*/run-*/client-*.json"))
    assert len(ledgers) >= 3  # on each node's disk, where a restarted node finds it
