"""What secure aggregation costs a round on a real deployment: plain vs SecAgg+ on loopback.

    .venv/bin/python scripts/bench_secagg.py [--nodes 3] [--rounds 4] [--repeats 2] [--model tiny-bert]
                                             [--out FILE]

One TLS SuperLink and `--nodes` authenticated SuperNodes (fedpeft.deploy.LocalDeployment, separate
processes on this host) serve every run; plain and `federation.secagg = true` runs of the same spec
alternate (`--repeats` of each). A round's cost is its wall time in rounds.jsonl (`seconds`: the
server's send, the nodes' training and the replies, aggregation, evaluation), round 1 left out
(the nodes build their model then). Prints the median per-round seconds of each and their ratio
secagg / plain with its range over pairs; JSON to --out. On 2 cores the nodes share the CPU, so
the ratio, not the seconds, is the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft.deploy import LocalDeployment, run_config_arg  # noqa: E402
from fedpeft.spec_io import default_spec  # noqa: E402


def _spec(args: argparse.Namespace, secagg: bool):  # noqa: ANN202
    flat = {
        "name": "bench-secagg", "federation.rounds": args.rounds, "federation.clients": args.nodes,
        "federation.clients_per_round": args.nodes, "federation.secagg": secagg, "model.name": args.model,
        "data.name": "synthetic", "data.partition": "iid", "data.test_size": 200, "privacy.epsilon": 8.0,
        "train.local_steps": 5, "train.batch_size": 16, "train.lr": 0.3,
    }  # fmt: skip
    if args.model != "tiny-bert":
        flat["model.layers"] = 2
    return default_spec().with_flat(flat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="tiny-bert")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-secagg-"))
    per_round: dict[str, list[float]] = {"plain": [], "secagg": []}
    pairs = []
    with LocalDeployment(work / "deployment", nodes=args.nodes) as deployment:
        for rep in range(args.repeats):
            medians = {}
            order = ("plain", "secagg") if rep % 2 == 0 else ("secagg", "plain")
            for kind in order:
                out = work / f"{kind}-{rep}"
                spec = _spec(args, kind == "secagg")
                proc = deployment.run(ROOT, run_config_arg(spec, out), timeout=900)
                rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
                if len(rounds) != args.rounds or any(len(r["clients"]) != args.nodes for r in rounds):
                    sys.exit(f"{kind} run {rep} lost clients or rounds:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                seconds = [r["seconds"] for r in rounds[1:]]
                per_round[kind] += seconds
                medians[kind] = statistics.median(seconds)
                print(f"{kind:7s} run {rep}: per-round seconds {', '.join(f'{s:.2f}' for s in seconds)}", flush=True)
            pairs.append(medians["secagg"] / medians["plain"])
    result = {
        "nodes": args.nodes, "rounds": args.rounds, "repeats": args.repeats, "model": args.model,
        "plain_round_seconds_median": statistics.median(per_round["plain"]),
        "secagg_round_seconds_median": statistics.median(per_round["secagg"]),
        "ratio_median": statistics.median(pairs), "ratio_range": [min(pairs), max(pairs)],
        "per_round": per_round,
    }  # fmt: skip
    print(
        f"\nper round, median: plain {result['plain_round_seconds_median']:.2f} s, secagg "
        f"{result['secagg_round_seconds_median']:.2f} s; secagg / plain {result['ratio_median']:.2f}x "
        f"(pairs {min(pairs):.2f}-{max(pairs):.2f}x, {args.nodes} nodes, {args.model})"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
