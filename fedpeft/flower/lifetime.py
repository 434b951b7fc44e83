"""A node's privacy ledger over its data's lifetime, not one Flower run's (issue 31).

Each run keeps its own per-client ledger (fedpeft.flower.node.ClientRecords, under run-<id>/), so a
server that started K runs against one node would otherwise obtain K budgets. This ledger is keyed
by the data itself and holds every run's mechanisms on it: the lifetime epsilon is Opacus's
accountant on all of them composed (heterogeneous sigma, q and steps: the history is the union), and
a round that would take it past the node's max-epsilon is refused.

    <state-dir>/lifetime.json        {"data": {KEY: {"digest", "runs": {RUN: {"history", "delta", ...}}}},
                                      "retired": [...]}: entries the operator reset, kept for the record
    <state-dir>/lifetime.lock        an exclusive file lock around every read-check-write
    <state-dir>/lifetime-audit.log   one line per reset: when, which data, the old and new digest

Keys: a data file is its resolved path (with its SHA-256 kept beside: changed content is refused
until the operator resets the entry); a bundled partition is the dataset, the partition's
parameters and the client index (the package's data is fixed per version).

A round is reserved before it trains (the run's history with the round's steps, under the lock) and
settled after (the run's ledger as it stands): two runs on one node cannot both pass the check with
the same budget, and a node that crashes mid-round keeps the reservation, never under-counting.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedpeft.config import ConfigError, Spec
from fedpeft.privacy.accounting import Entry, epsilon
from fedpeft.runfiles import atomic_write

__all__ = ["DataKey", "Lifetime", "LifetimeRefusal", "bundled_key", "file_key", "ledger_command"]

LEDGER_FILE = "lifetime.json"
LOCK_FILE = "lifetime.lock"
AUDIT_FILE = "lifetime-audit.log"


@dataclass(frozen=True)
class DataKey:
    """What a lifetime entry is about: `key` names the data, `digest` pins its content."""

    key: str
    digest: str = ""


def file_key(path: str | Path) -> DataKey:
    """A node's data file: its resolved path, and the SHA-256 of its bytes."""
    resolved = Path(path).resolve()
    digest = hashlib.sha256()
    with resolved.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return DataKey(f"file:{resolved}", digest.hexdigest())


def bundled_key(spec: Spec, cid: int) -> DataKey:
    """Client `cid`'s partition of the spec's bundled dataset: what decides its rows."""
    data = spec.data
    params = json.dumps(
        {"data": vars(data), "clients": spec.federation.clients, "seed": spec.federation.seed},
        sort_keys=True, default=str,
    )  # fmt: skip
    return DataKey(f"bundled:{data.name}:client-{cid}:{hashlib.sha256(params.encode()).hexdigest()[:16]}")


class LifetimeRefusal(Exception):
    """A round this node's lifetime ledger does not allow; `category` is all the server is told."""

    def __init__(self, detail: str, category: str) -> None:
        super().__init__(detail)
        self.category = category


class Lifetime:
    """The lifetime ledger of one node's state dir."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @contextmanager
    def _held(self, timeout: float = 120.0) -> Iterator[dict]:
        """The ledger, loaded under an exclusive lock and written back (atomically) when the block ends."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / LOCK_FILE).open("a+") as handle:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.root / LOCK_FILE} held for over {timeout:g} s") from None
                    time.sleep(0.05)
            try:
                book = self.read()
                before = json.dumps(book, sort_keys=True)
                yield book
                if json.dumps(book, sort_keys=True) != before:
                    text = json.dumps(book, indent=1, sort_keys=True) + "\n"
                    atomic_write(self.root / LEDGER_FILE, lambda p: p.write_text(text))
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read(self) -> dict:
        path = self.root / LEDGER_FILE
        if not path.is_file():
            return {"data": {}, "retired": []}
        try:
            book = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a lifetime ledger ({exc}); it is never rewritten: move it aside") from None
        if not isinstance(book, dict) or not isinstance(book.get("data"), dict):
            raise ValueError(f"{path} is not a lifetime ledger (no 'data' table); it is never rewritten: move it aside")
        book.setdefault("retired", [])
        return book

    @staticmethod
    def _entry(book: dict, data: DataKey) -> dict:
        entry = book["data"].setdefault(data.key, {"digest": data.digest, "runs": {}})
        if entry["digest"] != data.digest:
            raise LifetimeRefusal(
                f"{data.key.removeprefix('file:')} changed since this node's lifetime ledger recorded it "
                f"(sha256 {entry['digest'][:12]}... then, {data.digest[:12]}... now): its spending so far stands. "
                f"If this is new data, `fedpeft node ledger --reset {data.key.removeprefix('file:')}` starts a new entry",
                "policy",
            )
        return entry

    @staticmethod
    def spent(entry: dict, delta: float, accountant: str, run: str | None = None, history: list | None = None) -> float:
        """Epsilon at `delta` of every run's mechanisms on this data composed (run `run`'s replaced by
        `history` when given)."""
        runs = {rid: rec["history"] for rid, rec in entry["runs"].items()}
        if run is not None and history is not None:
            runs[run] = history
        total: dict[tuple[float, float], int] = {}  # composition commutes: one entry per mechanism
        for hist in runs.values():
            for s, q, n in hist:
                total[(float(s), float(q))] = total.get((float(s), float(q)), 0) + int(n)
        steps: tuple[Entry, ...] = tuple((s, q, n) for (s, q), n in sorted(total.items()))
        return epsilon(steps, delta, accountant)

    def reserve(
        self, data: DataKey, run: str, history: list, delta: float, accountant: str, max_epsilon: float
    ) -> None:
        """Record run `run`'s history with this round's steps (`history`) if the lifetime total at
        `delta` stays within `max_epsilon`; else LifetimeRefusal("budget exhausted")."""
        with self._held() as book:
            entry = self._entry(book, data)
            total = self.spent(entry, delta, accountant, run, history) if math.isfinite(max_epsilon) else 0.0
            if total > max_epsilon * (1 + 1e-9):
                raise LifetimeRefusal(
                    f"this round would take the lifetime epsilon of {data.key} to {total:.4g} at delta {delta:g}, "
                    f"past this node's max-epsilon {max_epsilon:g} (`fedpeft node ledger` lists its runs)",
                    "budget exhausted",
                )
            entry["runs"][run] = {"history": [list(e) for e in history], "delta": delta, "accountant": accountant}

    def settle(self, data: DataKey, run: str, history: list, delta: float, accountant: str) -> None:
        """Run `run`'s history as its own ledger now records it (after the round trained or not)."""
        with self._held() as book:
            entry = self._entry(book, data)
            entry["runs"][run] = {"history": [list(e) for e in history], "delta": delta, "accountant": accountant}

    def reset(self, name: str) -> dict:
        """Retire the entry for data `name` (a data file's path, or a key as `ledger` lists it): its
        record moves to "retired" and the audit log gets a line; the next run starts a new entry."""
        key = name if name.startswith(("file:", "bundled:")) else f"file:{Path(name).resolve()}"
        with self._held() as book:
            if key not in book["data"]:
                known = ", ".join(sorted(book["data"])) or "none"
                raise ConfigError(f"no lifetime entry for {name} in {self.root} (entries: {known})")
            entry = book["data"].pop(key)
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            path = Path(key.removeprefix("file:"))
            digest = file_key(path).digest if key.startswith("file:") and path.is_file() else "-"
            book["retired"].append({"key": key, "retired": now, **entry})
            line = f"{now} reset {key} digest {entry['digest'] or '-'} -> {digest} runs {sorted(entry['runs'])}\n"
            with (self.root / AUDIT_FILE).open("a") as audit:
                audit.write(line)
        return entry

    def table(self) -> list[dict]:
        """Per data entry: its runs and the lifetime epsilon at the smallest delta any run used."""
        rows = []
        for key, entry in sorted(self.read()["data"].items()):
            runs = entry["runs"]
            if not runs:
                continue
            delta = min(rec["delta"] for rec in runs.values())
            accountant = next(iter(runs.values()))["accountant"]
            per_run = {rid: self.spent({"runs": {rid: rec}}, delta, accountant) for rid, rec in runs.items()}
            rows.append({
                "key": key, "digest": entry["digest"], "delta": delta, "accountant": accountant,
                "epsilon": self.spent(entry, delta, accountant), "runs": per_run,
                "steps": {rid: sum(int(e[2]) for e in rec["history"]) for rid, rec in runs.items()},
            })  # fmt: skip
        return rows


def ledger_command(root: Path, reset: str | None) -> int:
    """`fedpeft node ledger`: each data's lifetime epsilon and the runs that spent it; or --reset."""
    if not Path(root).is_dir():
        raise ConfigError(f"{root} is not a directory: no node state there (--state-dir names the node's state-dir)")
    ledger = Lifetime(root)
    if reset is not None:
        entry = ledger.reset(reset)
        print(f"retired the entry for {reset}: runs {', '.join(sorted(entry['runs'])) or 'none'}; "
              f"audit line in {root / AUDIT_FILE}")  # fmt: skip
        return 0
    rows = ledger.table()
    if not rows:
        print(f"no lifetime ledger entries in {root}")
        return 0
    for row in rows:
        print(f"{row['key']}  epsilon {row['epsilon']:.4g} at delta {row['delta']:g} ({row['accountant']})"
              + (f"  sha256 {row['digest'][:16]}" if row["digest"] else ""))  # fmt: skip
        for rid, eps in sorted(row["runs"].items()):
            print(f"  run {rid}: {row['steps'][rid]} steps, epsilon {eps:.4g} alone")
    return 0
