"""The files of a run: checkpoint.pt, rounds.jsonl, summary.json, written atomically.

A run directory holds, after every round, a checkpoint (everything a resume needs) and the
per-round log; at the end, summary.json and the PEFT adapter. Every write goes to a temporary
file first and is then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from fedpeft.config import ConfigError

log = logging.getLogger("fedpeft")

__all__ = [
    "CHECKPOINT", "RESULT_FILES", "ROUNDS", "SUMMARY", "atomic_write", "jsonable", "load_checkpoint", "save_checkpoint",
    "write_json", "write_rounds",
]  # fmt: skip

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the one before: a resume falls back to it if the latest is unreadable
ROUNDS = "rounds.jsonl"
SUMMARY = "summary.json"
LOCK = ".lock"
# what a finished run leaves, whoever ran it (`fedpeft simulate`, the Flower ServerApp)
RESULT_FILES = (
    SUMMARY, ROUNDS, "accuracy.png", "adapter_config.json", "adapter_model.safetensors", "fedpeft_model.json",
)  # fmt: skip


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename tmp to `path`: `path` is either the old file or the whole new one.
    The temporary name is unique, so two writers never write into one temporary file."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def wait_for_lock(handle: IO, path: Path, timeout: float, holders: str, say_after: float = 1.0) -> None:
    """Take an exclusive flock on `handle` (the open file `path`), waiting at most `timeout` s
    (TimeoutError naming the file); a wait past `say_after` s is logged once, saying what it waits for."""
    start = time.monotonic()
    said = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            waited = time.monotonic() - start
            if waited > timeout:
                raise TimeoutError(f"{path} held for over {timeout:g} s (by {holders})") from None
            if not said and waited > say_after:
                said = True
                log.warning("waiting for %s, held by %s (at most %g s)", path, holders, timeout)
            time.sleep(0.05)


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold `out` for one run: a second run on the same directory fails at once, naming the holder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a directory: choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the run directory {out}: {exc.strerror or exc}; choose another --out") from None
    handle = (out / LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{out} is in use by another run ({holder}); wait for it or choose another --out") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        remove_stale_temporaries(out)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def check_out(out: Path, resume: bool) -> None:
    """Refuse to overwrite: `out` may hold an unfinished run only to resume it, and never a finished one."""
    if (out / SUMMARY).exists():
        raise ConfigError(f"{out} already holds a finished run; choose another --out")
    if resume and not has_checkpoint(out):
        raise ConfigError(f"nothing to resume in {out}: it holds no checkpoint")
    if not resume and has_checkpoint(out):
        raise ConfigError(f"{out} holds an unfinished run; add --resume to continue it, or choose another --out")


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
    """The new checkpoint, keeping the previous one beside it. A failed write (torch says RuntimeError
    for a full disk) is an OSError naming the file; the previous checkpoint is intact."""

    def write(tmp: Path) -> None:
        try:
            torch.save(checkpoint, tmp)
        except RuntimeError as exc:
            raise OSError(errno.EIO, f"could not write the checkpoint ({str(exc).splitlines()[0][:160]})",
                          str(out / CHECKPOINT)) from None  # fmt: skip

    if (out / CHECKPOINT).is_file():
        os.replace(out / CHECKPOINT, out / PREVIOUS)
    atomic_write(out / CHECKPOINT, write)


def remove_stale_temporaries(out: Path) -> None:
    """The temporary files of writes a killed run left in `out` (call with `out` locked: no writer is live)."""
    for name in (CHECKPOINT, PREVIOUS, ROUNDS, *RESULT_FILES):
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def has_checkpoint(out: Path) -> bool:
    return (out / CHECKPOINT).is_file() or (out / PREVIOUS).is_file()


def load_checkpoint(out: Path) -> dict[str, Any]:
    """The latest readable checkpoint: checkpoint.pt, else (it is torn or missing) the previous
    one, with a warning; a ConfigError naming the files when neither can be read."""
    errors = []
    for name in (CHECKPOINT, PREVIOUS):
        path = out / name
        if not path.is_file():
            errors.append(f"{path}: missing")
            continue
        try:
            checkpoint = torch.load(path, weights_only=False)
            if not isinstance(checkpoint, dict) or not {"spec", "progress", "client_states"} <= set(checkpoint):
                raise ValueError("not a fedpeft checkpoint")
        except Exception as exc:  # torn, truncated or foreign: say which and go on
            errors.append(f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
            continue
        if name == PREVIOUS:
            logging.getLogger("fedpeft").warning("%s; resuming from %s (one round earlier)", errors[-1], path)
        return checkpoint
    raise ConfigError("cannot resume: no readable checkpoint (" + "; ".join(errors) + ")")
