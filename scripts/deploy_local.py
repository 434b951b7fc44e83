"""A real Flower deployment on this machine: a TLS SuperLink and N authenticated SuperNodes, each a
separate process on loopback, then the federation through it with `flwr run`.

    .venv/bin/python scripts/deploy_local.py [--nodes 3] [--dir runs/deployment] [--set KEY=VALUE ...] [--keep]

The spec is the quickstart's with federation.clients = --nodes and your --set overrides (the same
keys as `fedpeft simulate --set`). Node k holds partition k (node config partition-id=k,
num-partitions=N, state-dir=DIR/node-k for its privacy ledger). Logs of every process are in DIR/*.log;
results in DIR/out. With --keep, the SuperLink and SuperNodes stay up after the run (Ctrl-C stops
them) and you can submit more runs yourself:

    FLWR_HOME=DIR/flwr .venv/bin/flwr run . fedpeft-local --stream --run-config "federation.clients=3 ..."
"""

from __future__ import annotations

import argparse
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
    out = directory / "out" / time.strftime("%Y%m%d-%H%M%S")
    deployment = LocalDeployment(directory, args.nodes)
    print(f"starting a TLS SuperLink on {deployment.address} and {args.nodes} SuperNodes (logs in {directory})")
    try:
        deployment.start()
        print(f"flwr run . fedpeft-local  ->  {out}")
        deployment.run(ROOT, run_config_arg(spec, out), timeout=24 * 3600, capture=False)
        if args.keep:
            print(f"SuperLink and SuperNodes still running; FLWR_HOME={directory / 'flwr'}; Ctrl-C stops them")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        deployment.stop()
    return 0 if (out / "summary.json").is_file() else 1


if __name__ == "__main__":
    sys.exit(main())
