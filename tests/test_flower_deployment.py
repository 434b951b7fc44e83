"""The Flower app on a loopback deployment (slow: real processes): a TLS SuperLink and 3
authenticated SuperNodes as separate processes. The final adapter equals the in-process run; with
SecAgg+ within quantisation; with privacy on each node reports its epsilon, and a node killed
mid-run does not end the federation."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from fedpeft.adapters import load_exported
from fedpeft.deploy import LocalDeployment, run_config_arg
from tests.runtime_helpers import (
    ROOT,
    SECAGG_TOLERANCE,
    assert_close_adapter,
    assert_same_adapter,
    run_in_process,
    runtime_spec,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):  # noqa: ANN201
    with LocalDeployment(tmp_path_factory.mktemp("deployment"), nodes=3) as dep:
        yield dep


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
    """Before the test that kills a node: all three nodes are up."""
    spec = runtime_spec()
    run_in_process(spec, tmp_path / "in-process")
    out = tmp_path / "deployed"
    proc = deployment.run(ROOT, run_config_arg(spec.with_flat({"federation.secagg": True}), out), timeout=400)
    assert (out / "summary.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rounds] == [[0, 1, 2], [0, 1, 2]]
    assert_close_adapter(out, tmp_path / "in-process", SECAGG_TOLERANCE)


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
