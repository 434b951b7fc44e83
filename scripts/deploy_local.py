"""A real Flower deployment on this machine: a TLS SuperLink and N authenticated SuperNodes, each a
separate process on loopback, then the federation through it with `flwr run`.

    .venv/bin/python scripts/deploy_local.py [--nodes 3] [--dir runs/deployment] [--set KEY=VALUE ...]
        [--node-config 'max-epsilon=6'] [--runs K] [--keep]

The spec is the quickstart's with federation.clients = --nodes and your --set overrides (the same
keys as `fedpeft simulate --set`). Node k holds partition k (node config partition-id=k,
num-partitions=N, state-dir=DIR/node-k for its privacy ledger). Logs of every process are in DIR/*.log;
results in DIR/out. --node-config adds to every node's config (its privacy policy); --runs K submits
K runs one after another to the same nodes and prints, per round, who trained and who refused:
the nodes' lifetime ledgers compose the runs, so with a max-epsilon the later runs are refused.

    .venv/bin/python scripts/deploy_local.py --runs 4 --node-config 'max-epsilon=6' --set privacy.epsilon=2

With --keep, the SuperLink and SuperNodes stay up after the run (Ctrl-C stops
them) and you can submit more runs yourself:

    FLWR_HOME=DIR/flwr .venv/bin/flwr run . fedpeft-local --stream --run-config "federation.clients=3 ..."
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft.catalog import check_names  # noqa: E402
from fedpeft.cli import add_set_argument  # noqa: E402
from fedpeft.config import ConfigError  # noqa: E402
from fedpeft.deploy import LocalDeployment, run_config_arg  # noqa: E402
from fedpeft.registry import UnknownNameError  # noqa: E402
from fedpeft.spec_io import parse_overrides  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--dir", default="runs/deployment")
    add_set_argument(parser, "model.name=tiny-bert data.name=synthetic")
    parser.add_argument("--node-config", default="", help="more node config for every node, e.g. 'max-epsilon=6'")
    parser.add_argument("--runs", type=int, default=1, help="runs to submit one after another (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the SuperLink and SuperNodes running after the run")
    args = parser.parse_args()

    from fedpeft.spec_io import default_spec

    directory = Path(args.dir).resolve()
    try:
        overrides = parse_overrides(args.set)
        per_round = min(default_spec().federation.clients_per_round, args.nodes)
        spec = default_spec().with_flat(
            {"federation.clients": args.nodes, "federation.clients_per_round": per_round, **overrides}
        )
        check_names(spec)
    except (ConfigError, UnknownNameError) as exc:
        print(f"deploy_local: {exc}", file=sys.stderr)
        return 2
    if args.runs < 1:
        print(f"deploy_local: --runs must be >= 1 (got {args.runs})", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outs = [directory / "out" / (stamp if args.runs == 1 else f"{stamp}-run-{i + 1}") for i in range(args.runs)]
    deployment = LocalDeployment(directory, args.nodes, node_config=args.node_config)
    print(f"starting a TLS SuperLink on {deployment.address} and {args.nodes} SuperNodes (logs in {directory})")
    try:
        deployment.start()
        for i, out in enumerate(outs):
            print(f"flwr run . fedpeft-local  ->  {out}")
            deployment.run(ROOT, run_config_arg(spec, out), timeout=24 * 3600, capture=False)
            if args.runs > 1:
                _print_rounds(i + 1, out)
        if args.keep:
            print(f"SuperLink and SuperNodes still running; FLWR_HOME={directory / 'flwr'}; Ctrl-C stops them")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        deployment.stop()
    return 0 if all((out / "summary.json").is_file() for out in outs) else 1


def _print_rounds(run: int, out: Path) -> None:
    """Per round of a finished run: the clients that trained, and why the others did not."""
    path = out / "rounds.jsonl"
    if not path.is_file():
        print(f"run {run}: no rounds.jsonl in {out}")
        return
    for line in path.read_text().splitlines():
        r = json.loads(line)
        dropped = ", ".join(f"client {c}: {why}" for c, why in r["dropped"].items()) or "none"
        print(f"run {run} round {r['round']}: trained {r['clients']}, refused/dropped: {dropped}, "
              f"epsilon_max {r['epsilon_max']}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
