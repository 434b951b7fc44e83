"""Make a CA, a SuperLink TLS certificate signed by it, and SuperNode authentication keys.

    .venv/bin/python scripts/make_certs.py DIR [--host superlink.example.org --host 10.0.0.5] [--nodes 3]

Writes DIR/ca.crt (give it to every SuperNode and to the `flwr` CLI: root-certificates),
DIR/server.pem + DIR/server.key (for flower-superlink --ssl-certfile/--ssl-keyfile, with
--ssl-ca-certfile DIR/ca.crt), and DIR/node-K + DIR/node-K.pub per SuperNode (the private key stays
on node K: --auth-supernode-private-key; the public key is registered with
`flwr supernode register DIR/node-K.pub <connection>`). Private keys are mode 600; keep ca.key off
the machines. The certificate is valid for every --host (names and IP addresses) the SuperNodes
use to reach the SuperLink.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.deploy import make_certs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument(
        "--host", action="append", help="SuperLink host name or IP (repeat); default localhost, 127.0.0.1"
    )
    parser.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make")
    args = parser.parse_args()
    certs = make_certs(args.directory, tuple(args.host or ("localhost", "127.0.0.1")), args.nodes)
    print(f"CA certificate      {certs.ca}")
    print(f"SuperLink cert/key  {certs.server_cert}  {certs.server_key}")
    for key in certs.node_keys:
        print(f"SuperNode key       {key}  (public: {key.with_suffix('.pub')})")


if __name__ == "__main__":
    main()
