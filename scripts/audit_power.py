"""The audit's power: `fedpeft audit` at one claim against the shipped node and nodes broken on purpose
(sigma / 2, / 4, / 10, and a node that uses the seeds the server sent), at the CLI's defaults.

    .venv/bin/python scripts/audit_power.py [--epsilon 1] [--trials 200] [--pairs 10] \
        [--out docs/audits/audit-power.json]

Prints the audit's table (one column per node) and the noise check's power: the sigma factor it
fails 95% of the time and the epsilon such a node really spends in the check's game.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "docs" / "audits" / "audit-power.json"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from fedpeft.config import Spec
    from fedpeft.privacy.audit import AUDIT_SPEC, FAULT_NAMES, audit, format_table, noise_power

    spec = Spec().with_flat(AUDIT_SPEC).with_flat({"privacy.epsilon": args.epsilon})
    results, seconds = [], []
    for fault in (None, *FAULT_NAMES):
        tic = time.perf_counter()
        results.append(audit(spec, args.trials, pairs=args.pairs, fault=fault))
        seconds.append(time.perf_counter() - tic)
        verdict = "FAIL: " + "; ".join(results[-1].failures) if results[-1].failures else "pass"
        print(f"{fault or 'shipped node'}: {verdict} ({seconds[-1]:.0f} s)", flush=True)
    print(format_table(results))
    power = noise_power(results[0].noise_df, results[0].statistics, spec, 32)
    print(f"noise check at {args.pairs} pairs ({results[0].noise_df} numbers): fails a node at sigma x "
          f"{power['sigma_factor']:.3f} or less 95% of the time (epsilon {power['epsilon_spent']:.3f} against the "
          f"claim {args.epsilon:g} in its one-step game)")  # fmt: skip
    out = {"machine": platform.platform(), "threads": 1, "claim": args.epsilon, "noise_power": power,
           "seconds": seconds, "results": [r.to_dict() for r in results]}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
