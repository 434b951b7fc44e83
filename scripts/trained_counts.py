"""What each (strategy, adapter family) pair of a sweep spec trains and sends, before anything runs:
parameters each client trains, and bytes one client uploads and downloads per round, from the
real model and the strategy's plan (no data, no training).

    .venv/bin/python scripts/trained_counts.py simulations/fedsvd-comparison.toml \\
        simulations/fedsvd-comparison-families.toml
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedpeft.strategies import make_strategy

from fedpeft.adapters import AdaptedModel
from fedpeft.build import make_plan
from fedpeft.catalog import check_names
from fedpeft.data import DATASETS
from fedpeft.report import run_label
from fedpeft.spec_io import load_spec
from fedpeft.state import BASE, kind_of
from fedpeft.sweep import cells


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    print("| strategy | trained per client | kB up per client-round | kB down per client-round |")
    print("|---|---:|---:|---:|")
    seen = set()
    for path in argv:
        for cell in cells(load_spec(Path(path)), Path("unused")):
            spec = cell.spec
            label = run_label(spec.strategy.name, spec.model.adapter)
            if label in seen:
                continue
            seen.add(label)
            check_names(spec)
            labels = DATASETS.get(spec.data.name)().label_names
            model = AdaptedModel(spec.model, num_labels=len(labels), seed=spec.federation.seed)
            state = model.state()
            plan = make_plan(spec, make_strategy(spec.strategy.name, spec.strategy.kwargs), state)
            trained = sum(t.numel() for n, t in state.tensors.items() if kind_of(n) in plan.trains)
            down = [n for n in state.tensors if kind_of(n) != BASE and n not in plan.keeps]
            print(f"| {label} | {trained:,} | {state.num_bytes(list(plan.uploads)) / 1e3:.3g} | "
                  f"{state.num_bytes(down) / 1e3:.3g} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
