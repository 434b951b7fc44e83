"""Wall time per round of one tiny federation three ways: in-process (`fedpeft simulate`), Flower's
simulation runtime (`flwr run .`, Ray), and a loopback deployment (TLS SuperLink + N authenticated
SuperNodes, separate processes).

    .venv/bin/python scripts/bench_flower.py [--out docs/benchmarks/flower-cpu.json] [--rounds 4] [--nodes 3]

The federation: the random 2-layer tiny BERT on synthetic data, N clients all sampled every round,
5 local steps of batch 16, DP-SGD at epsilon 8, FedAvg. Per-round seconds are the server's
(rounds.jsonl: from sampling to checkpoint, so messaging and client start-up included); round 1
is reported apart (node discovery, first imports). `total` is the command's wall time, start-up
included. Ratios are against in-process in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft.config import Spec  # noqa: E402
from fedpeft.deploy import LocalDeployment, flwr_simulation, run_config_arg  # noqa: E402
from fedpeft.spec_io import to_run_config  # noqa: E402


def spec(nodes: int, rounds: int) -> Spec:
    return Spec().with_flat(
        {
            "name": "bench-flower", "federation.rounds": rounds, "federation.clients": nodes,
            "federation.clients_per_round": nodes, "model.name": "tiny-bert", "model.max_length": 24,
            "data.name": "synthetic", "data.partition": "iid", "data.test_size": 200, "strategy.name": "fedavg",
            "privacy.epsilon": 8.0, "train.local_steps": 5, "train.batch_size": 16, "train.lr": 0.3,
        }
    )  # fmt: skip


def rounds_of(out: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (out / "rounds.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_flower.json")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    the_spec = spec(args.nodes, args.rounds)
    flat = to_run_config(the_spec)
    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    rows = {}

    out = work / "in-process"
    tic = time.perf_counter()
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--out", str(out), "--set"]
    cmd += [f"{k}={v}" for k, v in flat.items()]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    rows["in-process"] = (rounds_of(out), time.perf_counter() - tic)
    print(f"in-process done in {rows['in-process'][1]:.1f} s", flush=True)

    out = work / "flwr-simulation"
    tic = time.perf_counter()
    proc = flwr_simulation(ROOT, run_config_arg(the_spec, out), args.nodes, work / "flwr-home")
    if not (out / "summary.json").is_file():
        raise SystemExit(f"flwr run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows["flwr-simulation"] = (rounds_of(out), time.perf_counter() - tic)
    print(f"flwr simulation done in {rows['flwr-simulation'][1]:.1f} s", flush=True)

    out = work / "deployment"
    tic = time.perf_counter()
    with LocalDeployment(work / "deployment-state", args.nodes) as deployment:
        deployment.run(ROOT, run_config_arg(the_spec, out), timeout=3600)
    rows["deployment"] = (rounds_of(out), time.perf_counter() - tic)
    print(f"deployment done in {rows['deployment'][1]:.1f} s", flush=True)

    base = statistics.mean(rows["in-process"][0][1:])
    result = {
        "spec": flat,
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor(),
            "cpus": __import__("os").cpu_count(),
        },
        "runs": {
            name: {
                "round_seconds": secs,
                "round_1": secs[0],
                "later_rounds_mean": statistics.mean(secs[1:]),
                "total_seconds": total,
                "later_rounds_vs_in_process": statistics.mean(secs[1:]) / base,
            }
            for name, (secs, total) in rows.items()
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.nodes} clients, {args.rounds} rounds, tiny BERT, DP-SGD; seconds")
    print("| mode | round 1 | later rounds (mean) | x in-process | total wall |\n|---|---:|---:|---:|---:|")
    for name, row in result["runs"].items():
        print(
            f"| {name} | {row['round_1']:.2f} | {row['later_rounds_mean']:.2f} | "
            f"{row['later_rounds_vs_in_process']:.1f}x | {row['total_seconds']:.1f} |"
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
