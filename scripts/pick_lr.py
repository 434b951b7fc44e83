"""The learning-rate pilot's rule, applied to its result files: for each lr directory (lr-X/, one
`fedpeft sweep` each), the mean accuracy over the last 3 rounds of every cell (strategy x budget).

Two rules, each fixed before its grid runs:
- default (comparison v2, issue 15): the lr with the best average over all cells, for every strategy;
- `--per-arm` (comparison v3, issue 30: the papers tune each method): for each arm (strategy, or
  strategy+family) and budget, the lr with the best last-3 accuracy; ties go to the smaller lr.
  Printed as the `sweep.lrs` entries (ARM@EPSILON=LR) of the grid. An arm whose pick is the grid's
  largest lr is extended: an lr-X/ directory holding only some arms is an extension, its cells
  compete with the rest of their arm's row, and the pick says so. Only lrs above every complete
  one can be extensions: an incomplete directory below that is an unfinished sweep, an error.
- `--per-arm --ladders` (comparison v3 under DP): each arm tries its own lrs (a ladder around its
  no-DP pick), so no lr-X/ needs every arm; the same pick, and a pick at either end of its arm's
  ladder is marked for extension that way.

    .venv/bin/python scripts/pick_lr.py docs/results/fedsvd-comparison-pilot [--out pilot.md]
    .venv/bin/python scripts/pick_lr.py docs/results/fedsvd-comparison-v3/pilot --per-arm --out pilot.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedpeft.report import collect, eps_label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pilot", help="directory holding lr-*/ sweep directories")
    parser.add_argument("--out", help="also write the table (Markdown) here")
    parser.add_argument("--per-arm", action="store_true", help="pick per arm and budget (the v3 rule)")
    parser.add_argument("--ladders", action="store_true", help="with --per-arm: each arm has its own lrs")
    args = parser.parse_args(argv)
    if args.ladders and not args.per_arm:
        parser.error("--ladders goes with --per-arm")
    dirs = sorted(Path(args.pilot).glob("lr-*"), key=lambda p: float(p.name.removeprefix("lr-")))
    if not dirs:
        print(f"no lr-*/ directories under {args.pilot}", file=sys.stderr)
        return 2
    table: dict[float, dict[str, tuple[float, float]]] = {}
    for d in dirs:
        lr = float(d.name.removeprefix("lr-"))
        table[lr] = {
            f"{r['strategy']} ε={eps_label(r['target'])}": (r["accuracy_last3"], r["adapter_change"])
            for r in collect(d)
        }
    cells = sorted({c for row in table.values() for c in row})
    complete = {lr: row for lr, row in table.items() if set(row) == set(cells)}
    lines = [
        "Mean test accuracy over the last 3 rounds (%), and ‖ΔW‖/‖W0‖ at the end, per cell of the pilot:",
        "",
        "| lr | " + " | ".join(cells) + " | mean |",
        "|---:|" + "---:|" * (len(cells) + 1),
    ]
    for lr, row in table.items():
        vals = [row.get(c) for c in cells]
        mean = sum(v[0] for v in vals if v) / len(cells) if lr in complete else float("nan")
        shown = ["" if v is None else f"{100 * v[0]:.1f} ({v[1]:.2g})" for v in vals]
        lines.append(f"| {lr:g} | " + " | ".join(shown) + (f" | {100 * mean:.2f} |" if lr in complete else " | |"))
    if args.ladders:
        return _per_arm(table, cells, lines, args.out, ladders=True)
    if not complete:
        print("\n".join(lines))
        print("no lr has every cell finished", file=sys.stderr)
        return 1
    if args.per_arm:
        return _per_arm(table, cells, lines, args.out)
    best = max(complete, key=lambda lr: sum(v[0] for v in complete[lr].values()))
    lines += ["", f"Chosen: lr = {best:g} (the best mean over the {len(cells)} cells), for every strategy."]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({"lr": best}))
    return 0


def _per_arm(
    table: dict[float, dict[str, tuple]], cells: list[str], lines: list[str], out: str | None, ladders: bool = False
) -> int:
    """The v3 rule: per cell (arm x budget), the lr with the best last-3 accuracy, ties to the smaller."""
    base = list(table) if ladders else [lr for lr, row in table.items() if set(row) == set(cells)]
    # an incomplete lr counts as an extension only above every complete one (the rule extends the
    # top); one at or below it is an unfinished sweep of the base grid
    top = max(base, default=-1.0)
    missing = sorted({c for lr, row in table.items() if lr <= top for c in cells if c not in row}) if base else cells
    missing = [] if ladders else missing  # a ladder is whatever lrs its arm ran
    if missing:
        print("\n".join(lines))
        print(f"cells not finished at every lr: {missing}", file=sys.stderr)
        return 1
    entries, chosen = [], []
    for cell in cells:
        arm, _, eps = cell.partition(" ε=")
        row = [lr for lr in sorted(table) if cell in table[lr]]
        best = max(row, key=lambda lr: (round(table[lr][cell][0], 6), -lr))
        note = " (extension)" if best not in base else ""
        note += " (top of its row: extend)" if best == row[-1] else ""
        note += " (bottom of its row: extend)" if ladders and best == row[0] else ""
        chosen.append(f"| {arm} | {eps} | {best:g}{note} | {100 * table[best][cell][0]:.1f} |")
        entries.append(f"{arm}@{eps}={best:g}")
    lines += ["", "Chosen per arm and budget (best last-3 accuracy; ties to the smaller lr):", "",
              "| arm | ε | lr | last-3 accuracy (%) |", "|---|---:|---:|---:|", *chosen,
              "", "As the grid's `[sweep] lrs`:", "",
              "```toml", "lrs = [" + ", ".join(f'"{e}"' for e in entries) + "]", "```"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out:
        Path(out).write_text(text)
    print(json.dumps({"lrs": entries}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
