"""The Flower app through Flower's own runtimes (slow: real processes).

- `flwr run .` in Flower's simulation runtime (Ray), as a user types it.
- A TLS SuperLink and 3 authenticated SuperNodes as separate processes on loopback: the final
  adapter equals the in-process run; with privacy on each node reports its epsilon; a node killed
  mid-run does not end the federation.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fedpeft.adapters import load_exported
from fedpeft.deploy import LocalDeployment, flwr_simulation, run_config_arg
from fedpeft.federation import Federation
from tests.conftest import tiny_spec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _spec(**overrides):  # noqa: ANN003, ANN202
    return tiny_spec(
        **{"federation__rounds": 2, "federation__clients": 3, "federation__clients_per_round": 3, **overrides}
    )


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def _assert_same_adapter(out: Path, reference: Path) -> None:
    mine, ref = _adapter(out), _adapter(reference)
    assert set(mine) == set(ref)
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], atol=1e-5, rtol=0, msg=name)


def _reference(spec, out: Path):  # noqa: ANN001, ANN202
    return Federation.build(spec).run(out)


def test_flwr_run_simulation_equals_in_process(tmp_path):
    spec = _spec()
    reference = _reference(spec, tmp_path / "in-process")
    out = tmp_path / "flwr-sim"
    proc = flwr_simulation(ROOT, run_config_arg(spec, out), nodes=3, flwr_home=tmp_path / "flwr-home", timeout=400)
    assert (out / "summary.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_same_adapter(out, tmp_path / "in-process")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(reference.summary["accuracy"], abs=1e-6)
    assert "round 2: accuracy" in proc.stdout + proc.stderr  # progress streamed to the user


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):  # noqa: ANN201
    with LocalDeployment(tmp_path_factory.mktemp("deployment"), nodes=3) as dep:
        yield dep


def test_deployment_equals_in_process(deployment, tmp_path):
    spec = _spec()
    _reference(spec, tmp_path / "in-process")
    out = tmp_path / "deployed"
    proc = deployment.run(ROOT, run_config_arg(spec, out), timeout=400)
    assert (out / "summary.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_same_adapter(out, tmp_path / "in-process")
    model = load_exported(out)  # the exported adapter loads as a model too
    assert model is not None


# -- secure aggregation (SecAgg+) through Flower's runtimes: the plain run within quantisation ----------
SECAGG_TOLERANCE = 2 * 20 * 2 * 8.0 / 2**22  # 2 rounds of a few SecAgg+ quantisation levels


def _assert_close_adapter(out: Path, reference: Path, atol: float) -> None:
    mine, ref = _adapter(out), _adapter(reference)
    assert set(mine) == set(ref)
    assert max(float((mine[n] - ref[n]).abs().max()) for n in ref) < atol


def test_flwr_run_simulation_with_secagg(tmp_path):
    spec = _spec()
    _reference(spec, tmp_path / "in-process")
    out = tmp_path / "flwr-sim"
    secure = spec.with_flat({"federation.secagg": True})
    proc = flwr_simulation(ROOT, run_config_arg(secure, out), nodes=3, flwr_home=tmp_path / "flwr-home", timeout=400)
    assert (out / "summary.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_close_adapter(out, tmp_path / "in-process", SECAGG_TOLERANCE)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rounds] == [[0, 1, 2], [0, 1, 2]]


def test_deployment_with_secagg(deployment, tmp_path):
    """Before the test that kills a node: all three nodes are up."""
    spec = _spec()
    _reference(spec, tmp_path / "in-process")
    out = tmp_path / "deployed"
    proc = deployment.run(ROOT, run_config_arg(spec.with_flat({"federation.secagg": True}), out), timeout=400)
    assert (out / "summary.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rounds] == [[0, 1, 2], [0, 1, 2]]
    _assert_close_adapter(out, tmp_path / "in-process", SECAGG_TOLERANCE)


def test_deployment_private_with_a_node_killed_mid_run(deployment, tmp_path):
    spec = _spec(federation__rounds=3, privacy__epsilon=4.0)
    reference = _reference(spec, tmp_path / "in-process")
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
