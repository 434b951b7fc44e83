"""Paired differences (by seed and budget) between one strategy's runs in one directory and
another's in a second, e.g. an ablation sweep against the main grid:

    .venv/bin/python scripts/paired_dirs.py docs/results/fedsvd-comparison-ffa-orthonormal ffa \\
        docs/results/fedsvd-comparison fedsvd
"""

from __future__ import annotations

import sys

from fedpeft.report import _ci95, collect, detectable, eps_label


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__)
        return 2
    (dir_a, name_a, dir_b, name_b) = argv
    a = [r for r in collect(dir_a) if r["strategy"] == name_a]
    b = {(r["target"], r["seed"]): r for r in collect(dir_b) if r["strategy"] == name_b}
    if not a or not b:
        print(f"no runs of {name_a!r} under {dir_a} or of {name_b!r} under {dir_b}", file=sys.stderr)
        return 1
    print(f"{name_a} ({dir_a}) minus {name_b} ({dir_b}), points, paired by seed: mean ± 95% CI (seeds ahead; MDE)")
    for key in ("accuracy", "accuracy_last3"):
        for target in sorted({r["target"] for r in a}, reverse=True):
            d = [
                100 * (r[key] - b[target, r["seed"]][key])
                for r in a
                if r["target"] == target and (target, r["seed"]) in b
            ]
            if d:
                print(f"  {key:15s} ε={eps_label(target):>4}: {sum(d) / len(d):+.2f} ± {_ci95(d):.2f} "
                      f"({sum(x > 0 for x in d)}/{len(d)}; MDE {detectable(d):.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
