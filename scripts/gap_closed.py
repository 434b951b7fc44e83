"""Where each arm of a comparison lands between its floor and its ceiling, per budget.

The floor of a seed is the better of its spec's model before round 1 (every adapter at its untrained
start, the head as `model.head_init` sets it) and the majority class, on that seed's test split (a
random head can start below the majority class: an arm that only learns to say the majority class
has closed none of the gap); the ceiling is a sweep of centralised
runs on the same seeds (one client holding the union of the clients' data; the same test split),
at each budget of the grid (a DP arm is measured against the centralised run at its own epsilon).
For every arm and budget: the final accuracy, the mean over the last 3 rounds, and the fraction of
the gap closed, (last-3 - floor) / (ceiling last-3 - floor), per seed, then mean and 95% CI. A
budget the ceiling did not run is left out, and said so.

    .venv/bin/python scripts/gap_closed.py SPEC.toml GRID_DIR CEILING_DIR [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from fedpeft.build import build_parts
from fedpeft.client import evaluate
from fedpeft.plots import budget_label
from fedpeft.report import _ci95, _order, collect
from fedpeft.spec_io import load_spec


def floors(spec_path: str, seeds: list[int]) -> dict[int, float]:
    """Each seed's floor: the better of its accuracy before round 1 and its majority class rate."""
    spec = load_spec(spec_path)
    out = {}
    for seed in seeds:
        parts = build_parts(spec.with_flat({"federation.seed": seed}))
        before = evaluate(parts.model, parts.model.state(), parts.data.test, spec.train.eval_batch_size)["accuracy"]
        out[seed] = max(before, parts.data.majority_rate)
    return out


def _pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return ""
    mean, ci = sum(values) / len(values), _ci95(values)
    return f"{scale * mean:.{digits}f}" + ("" if math.isnan(ci) else f" ± {scale * ci:.{digits}f}")


def table(grid: list[dict], floor: dict[int, float], ceiling: dict[tuple[float, int], float],
          ceiling_final: dict[tuple[float, int], float]) -> str:  # fmt: skip
    """The Markdown table; `ceiling` and `ceiling_final` are keyed by (budget, seed)."""
    strategies, targets = _order(grid)
    lines = []
    for target in targets:
        seeds = sorted(s for s in floor if (target, s) in ceiling)
        if not seeds:
            lines += [f"{budget_label(target)}: no ceiling run at this budget, left out.", ""]
            continue
        top = [ceiling[target, s] for s in seeds]
        lines += [
            f"{budget_label(target)}: floor (before round 1, or the majority class if higher) "
            f"{_pm([floor[s] for s in seeds])}%, ceiling (centralised at this budget, last 3 rounds) {_pm(top)}% "
            f"(final {_pm([ceiling_final[target, s] for s in seeds])}%), over seeds {seeds}; gap "
            f"{_pm([ceiling[target, s] - floor[s] for s in seeds])} points.",
            "",
        ]
    lines += ["| arm | budget | seeds | final (%) | last 3 (%) | gap closed |", "|---|---:|---:|---:|---:|---:|"]
    for target in targets:
        for strategy in strategies:
            cell = [r for r in grid if r["strategy"] == strategy and r["target"] == target
                    and (target, r["seed"]) in ceiling and r["seed"] in floor]  # fmt: skip
            if not cell:
                continue
            closed = [
                (r["accuracy_last3"] - floor[r["seed"]]) / (ceiling[target, r["seed"]] - floor[r["seed"]]) for r in cell
            ]
            lines.append(
                f"| {strategy} | {budget_label(target)} | {len(cell)} | {_pm([r['accuracy'] for r in cell])} | "
                f"{_pm([r['accuracy_last3'] for r in cell])} | {_pm(closed, 1.0, 2)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="the grid's spec (for the floor)")
    parser.add_argument("grid", help="the grid's sweep directory")
    parser.add_argument("ceiling", help="the ceiling's sweep directory (same seeds; each budget of the grid)")
    parser.add_argument("--out", help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid, top = collect(Path(args.grid)), collect(Path(args.ceiling))
    if not grid or not top:
        print(f"no finished runs under {args.grid if not grid else args.ceiling}", file=sys.stderr)
        return 2
    ceiling = {(r["target"], r["seed"]): r["accuracy_last3"] for r in top}
    ceiling_final = {(r["target"], r["seed"]): r["accuracy"] for r in top}
    floor = floors(args.spec, sorted({seed for _, seed in ceiling}))
    text = table(grid, floor, ceiling, ceiling_final)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({"floor": floor, "ceiling": {f"{budget_label(t)}, seed {s}": v for (t, s), v in ceiling.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
