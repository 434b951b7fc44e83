"""Resolve pyproject.toml's dependencies for every Python its `requires-python` admits, as uv does
(and so Flower's per-run `uv sync`): once with the declared ranges alone, once with
constraints.txt. A dry run: nothing is installed. Needs the package index (CI has it).

    .venv/bin/python scripts/check_resolution.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.fullmatch(r">=\s*(\d+\.\d+)", declared.strip())
    if match is None:
        print(f"requires-python {declared!r}: expected the form '>=3.N'")
        return 1
    lowest = match.group(1)
    failed = 0
    for label, extra in (("declared ranges", []), ("with constraints.txt", ["-c", str(ROOT / "constraints.txt")])):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "uv", "pip", "compile", "--universal", "--quiet", "--python-version", lowest,
                   str(ROOT / "pyproject.toml"), "--extra", "dev", "-o", str(Path(tmp) / "resolved.txt"), *extra]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp)
        ok = proc.returncode == 0
        failed += not ok
        print(f"resolve for Python {declared} ({label}): {'ok' if ok else 'FAILED'}")
        if not ok:
            print((proc.stderr or proc.stdout).strip()[-3000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
