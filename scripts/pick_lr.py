"""The learning-rate pilot's rule, applied to its result files: for each lr directory (lr-X/, one
`fedpeft sweep` each), the mean accuracy over the last 3 rounds of every cell (strategy x budget),
their average, and the winner. The rule is fixed before the grid runs and applied to every
strategy alike (issue 15: no per-strategy tuning).

    .venv/bin/python scripts/pick_lr.py docs/results/fedsvd-comparison-pilot [--out pilot.md]
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
    args = parser.parse_args(argv)
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
        lines.append(f"| {lr:g} | " + " | ".join(shown) + f" | {100 * mean:.2f} |")
    if not complete:
        print("\n".join(lines))
        print("no lr has every cell finished", file=sys.stderr)
        return 1
    best = max(complete, key=lambda lr: sum(v[0] for v in complete[lr].values()))
    lines += ["", f"Chosen: lr = {best:g} (the best mean over the {len(cells)} cells), for every strategy."]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({"lr": best}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
