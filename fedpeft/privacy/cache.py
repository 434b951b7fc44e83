"""A small on-disk cache of accounting results, shared by every run on this machine.

Calibrating sigma (a root search over the PRV accountant) and composing a ledger's epsilon are
pure functions of their inputs, and the same inputs recur across runs, seeds and sweep cells. The
cache keys each value by its inputs, the accountant and Opacus's version, in one JSON file:
$FEDPEFT_CACHE_DIR, else $XDG_CACHE_HOME/fedpeft, else ~/.cache/fedpeft. A value is only ever
what this code computed; a node's ledger is still checked against epsilon before every round.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["cache_dir", "cached"]

SCHEMA = 1
_loaded: dict[Path, dict[str, float]] = {}


def cache_dir() -> Path:
    if env := os.environ.get("FEDPEFT_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedpeft"


def _file() -> Path:
    from importlib.metadata import version  # not `import opacus`: a cache hit need not load it

    return cache_dir() / f"accounting-v{SCHEMA}-opacus-{version('opacus')}.json"


def _entries(path: Path) -> dict[str, float]:
    if path not in _loaded:
        try:
            data = json.loads(path.read_text())
            _loaded[path] = {k: float(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError, TypeError):  # missing or unreadable: start empty
            _loaded[path] = {}
    return _loaded[path]


def cached(key: str, compute) -> float:  # noqa: ANN001 - a () -> float
    """The cached value of `key`, or `compute()` stored under it (best effort: an unwritable cache
    directory only costs the recomputation)."""
    path = _file()
    entries = _entries(path)
    if key in entries:
        return entries[key]
    value = float(compute())
    entries[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # merge what other processes wrote meanwhile
            merged = {**json.loads(path.read_text()), **entries}
        except (OSError, ValueError):
            merged = dict(entries)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(merged, handle)
        os.replace(tmp, path)
    except OSError:
        pass
    return value
