"""Client updates per second and peak memory: the cohort executor against the sequential
in-process reference, for K clients per round with small per-client batches.

    .venv/bin/python scripts/bench_simulation.py [--out bench_simulation.json] [--device auto]

Each (executor, K, batch) cell runs in a fresh subprocess (so its peak memory is its own): build
the federation (MiniLM cut to --layers layers, rotten-tomatoes split iid across K clients, DP-SGD
at epsilon 8, FedSVD's trainable set), train one untimed warm-up round, then time one round of K
client updates of --steps local steps each. The Flower column runs the same two rounds through
`flwr run .` in Flower's simulation runtime (Ray; K virtual nodes, one ClientApp call per client)
and takes round 2's training time from rounds.jsonl (its peak memory, spread over Ray's processes,
is not measured). Speed-ups are ratios to sequential within this run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(executor: str, k: int, batch: int, steps: int, layers: int, device: str) -> dict:
    import torch

    from fedpeft.config import Spec
    from fedpeft.federation import Federation, sample_clients, seed_for

    spec = Spec().with_flat(
        {
            "federation.clients": k, "federation.clients_per_round": k, "federation.rounds": 2,
            "federation.executor": "sequential" if executor == "flower" else executor, "federation.device": device,
            "model.name": "minilm", "model.layers": layers, "data.partition": "iid", "data.test_size": 200,
            "strategy.name": "fedsvd", "privacy.epsilon": 8.0, "train.local_steps": steps, "train.batch_size": batch,
        }
    )  # fmt: skip
    if executor == "flower":
        return one_flower(spec, k, batch, steps)
    fed = Federation.build(spec)
    state = fed.model.state()
    timings = []
    for rnd in (1, 2):
        clients = sample_clients(0, rnd, k, k)
        seeds = {c: seed_for(0, rnd, c + 1) for c in clients}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        results = fed.executor.run_round(rnd, clients, state, fed.plan, seeds)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - tic)
        assert len(results) == k
    out = {
        "executor": executor, "clients": k, "batch": batch, "steps": steps, "seconds": timings[1],
        "updates_per_s": k / timings[1],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": str(fed.model.device),
    }  # fmt: skip
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def one_flower(spec, k: int, batch: int, steps: int) -> dict:  # noqa: ANN001
    """The same two rounds through `flwr run .` in Flower's simulation runtime (Ray), K virtual
    nodes, one ClientApp call per client; the time of round 2's training from rounds.jsonl."""
    import tempfile

    from fedpeft.deploy import flwr_simulation, run_config_arg

    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    proc = flwr_simulation(ROOT, run_config_arg(spec, work / "run"), k, work / "flwr-home")
    if not (work / "run" / "summary.json").is_file():
        raise RuntimeError(f"flwr run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rounds = [json.loads(line) for line in (work / "run" / "rounds.jsonl").read_text().splitlines()]
    seconds = rounds[1]["train_seconds"]
    return {
        "executor": "flower", "clients": k, "batch": batch, "steps": steps, "seconds": seconds,
        "updates_per_s": k / seconds, "peak_rss_mb": None, "device": "cpu",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_simulation.json")
    parser.add_argument("--clients", default="8,32,128", help="K values")
    parser.add_argument("--batches", default="4,16", help="per-client expected batch sizes")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2, help="MiniLM layers kept (0 = all 6)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower simulation column")
    parser.add_argument("--one", nargs=3, metavar=("EXECUTOR", "K", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        executor, k, batch = args.one
        print(json.dumps(one(executor, int(k), int(batch), args.steps, args.layers, args.device)))
        return
    rows = []
    executors = ("sequential", "cohort", "flower") if not args.no_flower else ("sequential", "cohort")
    for batch in [int(b) for b in args.batches.split(",")]:
        for k in [int(c) for c in args.clients.split(",")]:
            cell = {}
            for executor in executors:
                cmd = [sys.executable, __file__, "--one", executor, str(k), str(batch), "--steps", str(args.steps)]
                cmd += ["--layers", str(args.layers), "--device", args.device]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{executor} K={k} batch={batch} failed")
                cell[executor] = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(cell[executor])
            base = cell["sequential"]["updates_per_s"]
            for executor in executors:
                cell[executor]["vs_sequential"] = cell[executor]["updates_per_s"] / base
            print(
                f"K={k:>4} batch={batch:>3}: "
                + ", ".join(
                    f"{e} {cell[e]['updates_per_s']:7.2f} upd/s ({cell[e]['vs_sequential']:.2f}x)" for e in executors
                ),
                flush=True,
            )
    import torch

    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": rows[0]["device"],
        },
        "settings": {
            "model": "minilm",
            "layers": args.layers,
            "steps": args.steps,
            "strategy": "fedsvd",
            "epsilon": 8.0,
        },
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        "\n| K | batch | "
        + " | ".join(f"{e} upd/s" for e in executors)
        + " | cohort / sequential | "
        + ("flower / sequential | " if "flower" in executors else "")
        + "peak RSS seq / cohort (MB) |"
    )
    print("|---:|---:|" + "---:|" * (len(executors) * 2))
    for i in range(0, len(rows), len(executors)):
        cell = {r["executor"]: r for r in rows[i : i + len(executors)]}
        seq, coh = cell["sequential"], cell["cohort"]
        line = f"| {seq['clients']} | {seq['batch']} | " + " | ".join(
            f"{cell[e]['updates_per_s']:.2f}" for e in executors
        )
        line += f" | {coh['vs_sequential']:.2f}x | "
        if "flower" in executors:
            line += f"{cell['flower']['vs_sequential']:.2f}x | "
        print(line + f"{seq['peak_rss_mb']:.0f} / {coh['peak_rss_mb']:.0f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
