"""The files of a run: checkpoint.pt, rounds.jsonl, summary.json, written atomically.

A run directory holds, after every round, a checkpoint (everything a resume needs) and the
per-round log; at the end, summary.json and the PEFT adapter. Every write goes to a temporary
file first and is then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT", "ROUNDS", "SUMMARY", "atomic_write", "jsonable", "load_checkpoint", "save_checkpoint",
    "write_json", "write_rounds",
]  # fmt: skip

CHECKPOINT = "checkpoint.pt"
ROUNDS = "rounds.jsonl"
SUMMARY = "summary.json"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename tmp to `path`: `path` is either the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def jsonable(obj: Any) -> Any:
    """Make `obj` strict JSON: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(jsonable(obj), indent=2) + "\n"))


def write_rounds(out: Path, history: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(jsonable(r)) + "\n" for r in history)
    atomic_write(out / ROUNDS, functools.partial(Path.write_text, data=lines))


def save_checkpoint(out: Path, checkpoint: dict[str, Any]) -> None:
    atomic_write(out / CHECKPOINT, functools.partial(torch.save, checkpoint))


def load_checkpoint(out: Path) -> dict[str, Any]:
    return torch.load(out / CHECKPOINT, weights_only=False)
