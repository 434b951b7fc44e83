"""The accuracy a comparison starts from: its spec's model before round 1 (every B = 0, the head as
`model.head_init` sets it) on each seed's test split, and what the strategies add to it. With a
sweep directory, each run's mean accuracy over its last 3 rounds minus its seed's starting
accuracy, per strategy and budget (mean and 95% CI over seeds).

    .venv/bin/python scripts/head_alone.py simulations/fedsvd-comparison.toml [SWEEP_DIR] [--seeds 0,1,2]

The seeds are the spec's sweep seeds (else its own seed) unless --seeds names them.
"""

from __future__ import annotations

import sys

import torch

from fedpeft.build import build_parts
from fedpeft.client import evaluate
from fedpeft.report import _ci95, _order, collect, eps_label
from fedpeft.spec_io import load_spec


def main(argv: list[str]) -> int:
    seeds = None
    if "--seeds" in argv:
        at = argv.index("--seeds")
        try:
            seeds = [int(s) for s in argv[at + 1].split(",")]
        except (IndexError, ValueError):
            print("--seeds takes a comma-separated list of integers, e.g. --seeds 0,1,2")
            return 2
        argv = argv[:at] + argv[at + 2 :]
    if not argv:
        print(__doc__)
        return 2
    torch.set_num_threads(1)
    spec = load_spec(argv[0])
    start = {}
    for seed in seeds or spec.sweep.seeds or (spec.federation.seed,):
        parts = build_parts(spec.with_flat({"federation.seed": seed}))
        start[seed] = evaluate(parts.model, parts.model.state(), parts.data.test, 256)["accuracy"]
        print(f"seed {seed}: before round 1 {100 * start[seed]:.1f}% (majority {100 * parts.data.majority_rate:.1f}%)")
    if len(argv) > 1:
        runs = collect(argv[1])
        strategies, targets = _order(runs)
        print("\nlast 3 rounds minus the start, points (mean ± 95% CI over seeds; seeds above the start):")
        for target in targets:
            for strategy in strategies:
                gains = [100 * (r["accuracy_last3"] - start[r["seed"]]) for r in runs
                         if r["strategy"] == strategy and r["target"] == target and r["seed"] in start]  # fmt: skip
                if gains:
                    mean, ci = sum(gains) / len(gains), _ci95(gains)
                    print(
                        f"  ε={eps_label(target):>4} {strategy:10s} {mean:+.2f} ± {ci:.2f} ({sum(g > 0 for g in gains)}/{len(gains)})"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
