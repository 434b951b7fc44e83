"""User code registers a strategy and a dataset (fedpeft.plugins) and they run under `fedpeft
simulate --plugin` and under the ServerApp (run-config `plugins`, nodes' node-config `plugins`).
Each case runs in a fresh interpreter: a registered plugin would outlive a test in this one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = '''
from dataclasses import dataclass

from fedpeft.data import DATASETS
from fedpeft.data.synthetic import load
from fedpeft.plugins import register_strategy
from fedpeft.strategies.fedavg import FedAvg


@register_strategy("half-step", sum_only=True)
@dataclass(frozen=True)
class HalfStep(FedAvg):
    """FedAvg that moves the global adapter half way to the clients' mean."""

    name = "half-step"

    def aggregate(self, state, updates, round_num, server_state):
        mean, server_state, metrics = super().aggregate(state, updates, round_num, server_state)
        half = {n: (state.tensors[n] + mean.tensors[n]) / 2 for n in mean.tensors}
        return state.with_tensors(half), server_state, {"half": 1.0}


DATASETS.register("my-words")(load)
'''
TINY = ["model.name=tiny-bert", "data.name=my-words", "strategy.name=half-step", "federation.rounds=1",
        "privacy.epsilon=inf", "federation.executor=sequential", "data.partition=iid"]  # fmt: skip


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_a_plugin_strategy_and_dataset_run_under_simulate_and_are_unknown_without_it(tmp_path):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    done = _cli("simulate", "--plugin", "my_plugin.py", "--set", *TINY, "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategy"] == "half-step" and summary["spec"]["data"]["name"] == "my-words"
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["strategy.half"] == 1.0  # its own aggregate ran
    listed = _cli("list", "--plugin", "my_plugin.py", cwd=tmp_path)
    assert "half-step" in listed.stdout
    without = _cli("simulate", "--set", *TINY, "--out", "run2", cwd=tmp_path)
    assert without.returncode == 2 and "unknown dataset 'my-words'" in without.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    failed = _cli("simulate", "--plugin", str(broken), cwd=tmp_path)
    assert failed.returncode == 2 and "plugin" in failed.stderr and "RuntimeError: boom" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_the_server_app_and_its_nodes_load_the_plugins_their_configs_name(tmp_path):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    plugin = str(tmp_path / "my_plugin.py")
    config = {k: v for k, _, v in (item.partition("=") for item in TINY)}
    code = f"""
import json, sys
from flwr.app import Context, RecordDict
from fedpeft import plugins
from fedpeft.flower import server_app
from fedpeft.flower.local import LocalGrid

config = {{**{config!r}, "federation.clients": 2, "federation.clients_per_round": 2, "federation.rounds": 1,
          "privacy.epsilon": float("inf"), "plugins": {plugin!r}, "out": {str(tmp_path / "flwr-run")!r}}}
grid = LocalGrid(2, node_config={{"plugins": {plugin!r}}})
server_app.main(grid, Context(1, 0, {{}}, RecordDict(), config))
print(json.dumps(sorted(plugins._loaded)))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [plugin]
    summary = json.loads((tmp_path / "flwr-run" / "summary.json").read_text())
    assert summary["strategy"] == "half-step" and summary["spec"]["data"]["name"] == "my-words"
