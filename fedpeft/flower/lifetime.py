"""A node's privacy ledger over its data's lifetime, not one Flower run's (issues 31, 44).

Each run keeps its own per-client ledger (fedpeft.flower.node.ClientRecords, under run-<id>/); this
ledger is keyed by the data itself and holds every mechanism ever run on it, so K runs do not get K
budgets: the lifetime epsilon is Opacus's accountant on all of them composed, and a round that
would take it past the node's max-epsilon is refused.

    <state-dir>/lifetime.json        {"version": 2, "data": {ENTRY: {"paths", "digests", "rows", "records":
                                      {"RUN/client-C": {"history", "delta", "accountant"}}, "inherited"}}, "retired"}
    <state-dir>/lifetime.prev.json   the same, written after it: what a torn ledger is recovered from
    <state-dir>/lifetime.lock        an exclusive file lock around every read-check-write
    <state-dir>/lifetime-audit.log   one line per change of data, merge, reset, forget or recovery

A client's data belongs to the entry that knows its path, its SHA-256, or any of its rows (a
fingerprint per example of a data file; a bundled partition's row ids). So a hard link or copy of a
file is the same data; a grown or edited file too (its history is inherited: every row is charged
what the old rows spent, conservatively, logged on the node only, never refused); partitions whose
rows overlap compose; data matching several entries merges them. Records are per (run, client).
A round is reserved before it trains (under the lock) and settled after, so two runs cannot both
pass the check with one budget and a crash mid-round never under-counts. `fedpeft node ledger
--reset DATA` restarts the per-run view but keeps composing the history ("inherited"); only
`--forget`, the operator's word that the data shares no row with what was spent, drops it (audited).
A torn ledger is recovered from its copy and the per-run ledgers on disk, never started afresh.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft.config import ConfigError
from fedpeft.privacy.accounting import Entry, epsilon
from fedpeft.runfiles import atomic_write, wait_for_lock

__all__ = ["DataKey", "Lifetime", "LifetimeRefusal", "bundled_key", "file_key", "ledger_command", "row_prints"]

log = logging.getLogger("fedpeft")

LEDGER_FILE = "lifetime.json"
BACKUP_FILE = "lifetime.prev.json"
LOCK_FILE = "lifetime.lock"
AUDIT_FILE = "lifetime-audit.log"


@dataclass(frozen=True)
class DataKey:
    """What a lifetime entry is about: `key` names the data (a path, or a bundled partition), `digest`
    pins a file's bytes, `rows` fingerprints its examples."""

    key: str
    digest: str = ""
    rows: frozenset[str] = field(default_factory=frozenset)


def row_prints(texts: Iterable[str], labels: Iterable[int]) -> frozenset[str]:
    """A 64-bit fingerprint per example (text and label): kept on the node only, to find overlaps."""
    return frozenset(
        hashlib.blake2b(f"{y}\0{t}".encode(), digest_size=8).hexdigest() for t, y in zip(texts, labels, strict=True)
    )


def file_key(path: str | Path, rows: frozenset[str] = frozenset()) -> DataKey:
    """A node's data file: its resolved path, the SHA-256 of its bytes, and its examples' prints."""
    resolved = Path(path).resolve()
    digest = hashlib.sha256()
    with resolved.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return DataKey(f"file:{resolved}", digest.hexdigest(), rows)


def bundled_key(dataset: str, cid: int, rows: Iterable[int]) -> DataKey:
    """Client `cid`'s partition of a bundled dataset: the rows it holds decide which entry it is."""
    return DataKey(f"bundled:{dataset}:client-{cid}", "", frozenset(f"{dataset}#{r}" for r in rows))


def record_id(run: str, cid: int) -> str:
    return f"{run}/client-{cid}"


class LifetimeRefusal(Exception):
    """A round this node's lifetime ledger does not allow; `category` is all the server is told."""

    def __init__(self, detail: str, category: str) -> None:
        super().__init__(detail)
        self.category = category


def _upgrade(book: dict) -> dict:
    """A version-1 ledger (entries keyed by path, records by run) as version 2: nothing it held is lost."""
    if book.get("version") == 2:
        return book
    data = {}
    for key, entry in book.get("data", {}).items():
        data[key] = {"paths": [key], "digests": [d for d in [entry.get("digest", "")] if d], "rows": [],
                     "records": dict(entry.get("runs", {})), "inherited": []}  # fmt: skip
    return {"version": 2, "data": data, "retired": book.get("retired", [])}


def _valid(book: object) -> bool:
    return isinstance(book, dict) and isinstance(book.get("data"), dict)


class Lifetime:
    """The lifetime ledger of one node's state dir."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._recovered = False  # read() rebuilt a torn ledger: the next locked block writes it whole

    @contextmanager
    def _held(self, timeout: float = 120.0) -> Iterator[dict]:
        """The ledger, loaded under an exclusive lock and written back (atomically, then its copy)
        when the block ends."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / LOCK_FILE).open("a+") as handle:
            wait_for_lock(
                handle, self.root / LOCK_FILE, timeout, "a node training on this data or another ledger command"
            )
            try:
                book = self.read()
                before = json.dumps(book, sort_keys=True)
                yield book
                changed = json.dumps(book, sort_keys=True) != before or self._recovered
                if changed or not (self.root / BACKUP_FILE).is_file():
                    text = json.dumps(book, indent=1, sort_keys=True) + "\n"
                    atomic_write(self.root / LEDGER_FILE, lambda p: p.write_text(text))
                    atomic_write(self.root / BACKUP_FILE, lambda p: p.write_text(text))
                    self._recovered = False
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _load(path: Path) -> dict | None:
        try:
            book = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return _upgrade(book) if _valid(book) else None

    def read(self) -> dict:
        """The ledger; a torn one recovered from its kept copy and the per-run ledgers on disk."""
        path = self.root / LEDGER_FILE
        if not path.is_file():
            return {"version": 2, "data": {}, "retired": []}
        book = self._load(path)
        if book is not None:
            book.setdefault("retired", [])
            return book
        backup = self._load(self.root / BACKUP_FILE)
        runs = sorted(self.root.glob("run-*/client-*.json"))
        if backup is None and not runs:
            raise ValueError(
                f"{path} is torn and there is nothing to recover it from (no {BACKUP_FILE}, no per-run ledgers): "
                "restore it from a backup. Moving it aside would forget what this node's data has spent"
            )
        book = backup if backup is not None else {"version": 2, "data": {}, "retired": []}
        recovered, self._recovered = self._from_runs(book, runs), True
        log.warning("%s was torn: recovered from %s and %d per-run ledger(s) (%s)", path,
                    BACKUP_FILE if backup is not None else "no copy", len(runs), recovered)  # fmt: skip
        self._audit(f"recovered torn {LEDGER_FILE} from {BACKUP_FILE if backup is not None else '-'} and {len(runs)} run ledger(s)")  # fmt: skip
        return book

    @staticmethod
    def _from_runs(book: dict, runs: list[Path]) -> str:
        """Add to `book` every per-run ledger's history longer than what it holds (the run ledgers name
        their data's key); return a summary of what changed."""
        added = 0
        for path in runs:
            try:
                saved = json.loads(path.read_text())
                budget, key = saved["budget"], saved.get("data")
            except (OSError, ValueError, KeyError):
                continue
            if not key:
                continue
            cid = int(path.stem.removeprefix("client-"))
            rid = record_id(path.parent.name.removeprefix("run-"), cid)
            entry = next((e for eid, e in book["data"].items() if key in e["paths"] or eid == key), None)
            if entry is None:
                entry = book["data"].setdefault(
                    key, {"paths": [key], "digests": [], "rows": [], "records": {}, "inherited": []}
                )
            old = entry["records"].get(rid, {}).get("history", [])
            if sum(int(e[2]) for e in budget["history"]) > sum(int(e[2]) for e in old):
                entry["records"][rid] = {"history": budget["history"], "delta": budget["delta"],
                                         "accountant": budget["accountant"]}  # fmt: skip
                added += 1
        return f"{added} record(s) taken from run ledgers"

    def _audit(self, what: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / AUDIT_FILE).open("a") as audit:
            audit.write(f"{now} {what}\n")

    def _entry(self, book: dict, data: DataKey) -> dict:
        """The entry `data` belongs to (by path, digest or any shared row), merging every entry it
        matches; new data gets a new entry. A change of the data is logged here, never refused."""
        rows = data.rows
        hits = [
            eid for eid, e in book["data"].items()
            if data.key in e["paths"] or (data.digest and data.digest in e["digests"]) or not rows.isdisjoint(e["rows"])
        ]  # fmt: skip
        if not hits:
            book["data"][data.key] = {"paths": [], "digests": [], "rows": [], "records": {}, "inherited": []}
            hits = [data.key]
        eid, entry = hits[0], book["data"][hits[0]]
        for other in hits[1:]:  # the data spans several entries: one entry now, every history composed
            gone = book["data"].pop(other)
            for k in ("paths", "digests", "rows", "inherited"):
                entry[k] = sorted(set(entry[k]) | set(gone[k])) if k != "inherited" else entry[k] + gone[k]
            for rid, rec in gone["records"].items():
                entry["records"][rid if rid not in entry["records"] else f"{rid}@{other}"] = rec
            self._audit(f"merged {other} into {eid}: {data.key} shares its path, bytes or rows with both")
            log.warning("lifetime ledger: %s spans entries %s and %s; merged, their spending composed", data.key, eid, other)  # fmt: skip
        changed = bool(entry["digests"]) and data.digest and data.digest not in entry["digests"]
        if changed:
            self._audit(f"changed {data.key} sha256 {entry['digests'][-1][:16]} -> {data.digest[:16]}: history kept")
            log.warning("lifetime ledger: %s changed since it was recorded; its history carries over (every row "
                        "is charged what the old rows spent)", data.key.removeprefix("file:"))  # fmt: skip
        if data.key not in entry["paths"]:
            entry["paths"] = sorted({*entry["paths"], data.key})
        if data.digest and data.digest not in entry["digests"]:
            entry["digests"].append(data.digest)
        if not rows <= set(entry["rows"]):
            entry["rows"] = sorted(set(entry["rows"]) | rows)
        return entry

    @staticmethod
    def spent(entry: dict, delta: float, accountant: str, record: str | None = None, history: list | None = None) -> float:  # fmt: skip
        """Epsilon at `delta` of every mechanism on this data composed: its records (`record`'s replaced
        by `history` when given) and its inherited history."""
        histories = {rid: rec["history"] for rid, rec in entry.get("records", {}).items()}
        if record is not None and history is not None:
            histories[record] = history
        total: dict[tuple[float, float], int] = {}  # composition commutes: one entry per mechanism
        for hist in [*histories.values(), *(rec["history"] for rec in entry.get("inherited", []))]:
            for s, q, n in hist:
                total[(float(s), float(q))] = total.get((float(s), float(q)), 0) + int(n)
        steps: tuple[Entry, ...] = tuple((s, q, n) for (s, q), n in sorted(total.items()))
        return epsilon(steps, delta, accountant)

    def reserve(
        self, data: DataKey, run: str, history: list, delta: float, accountant: str, max_epsilon: float, cid: int = 0
    ) -> None:
        """Record run `run`'s client `cid` history with this round's steps (`history`) if the lifetime
        total at `delta` stays within `max_epsilon`; else LifetimeRefusal("budget exhausted")."""
        rid = record_id(run, cid)
        with self._held() as book:
            entry = self._entry(book, data)
            total = self.spent(entry, delta, accountant, rid, history) if math.isfinite(max_epsilon) else 0.0
            if total > max_epsilon * (1 + 1e-9):
                raise LifetimeRefusal(
                    f"this round would take the lifetime epsilon of {data.key} to {total:.4g} at delta {delta:g}, "
                    f"past this node's max-epsilon {max_epsilon:g} (`fedpeft node ledger` lists its runs)",
                    "budget exhausted",
                )
            entry["records"][rid] = {"history": [list(e) for e in history], "delta": delta, "accountant": accountant}

    def settle(self, data: DataKey, run: str, history: list, delta: float, accountant: str, cid: int = 0) -> None:
        """Run `run`'s client `cid` history as its own ledger now records it (after the round)."""
        with self._held() as book:
            entry = self._entry(book, data)
            entry["records"][record_id(run, cid)] = {
                "history": [list(e) for e in history], "delta": delta, "accountant": accountant,
            }  # fmt: skip

    def reset(self, name: str, forget: bool = False) -> dict:
        """Start data `name`'s entry afresh (a data file's path, or an entry as `ledger` lists it). Its
        records become inherited history, which still composes; with `forget` (the operator says the
        data now shares no row with what was spent) the entry moves to "retired" and stops counting."""
        key = name if name.startswith(("file:", "bundled:")) else f"file:{Path(name).resolve()}"
        with self._held() as book:
            eid = next((e for e, entry in book["data"].items() if e == key or key in entry["paths"]), None)
            if eid is None:
                known = ", ".join(sorted(book["data"])) or "none"
                raise ConfigError(f"no lifetime entry for {name} in {self.root} (entries: {known})")
            entry = book["data"][eid]
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if forget:
                book["retired"].append({"key": eid, "retired": now, **book["data"].pop(eid)})
                self._audit(f"FORGET {eid}: the operator says its data shares no row with what was spent; "
                            f"{len(entry['records']) + len(entry['inherited'])} record(s) no longer compose")  # fmt: skip
                log.warning("lifetime ledger: FORGOT %s on the operator's word that the data is disjoint", eid)
            else:
                entry["inherited"] += [{"from": rid, "reset": now, **rec} for rid, rec in sorted(entry["records"].items())]  # fmt: skip
                entry["records"] = {}
                self._audit(
                    f"reset {eid}: {len(entry['inherited'])} record(s) kept as inherited history (they compose)"
                )
        return entry

    def table(self) -> list[dict]:
        """Per data entry: its records and the lifetime epsilon at the smallest delta any used."""
        rows = []
        for key, entry in sorted(self.read()["data"].items()):
            recs = {**{f"{r['from']} (inherited)": r for r in entry["inherited"]}, **entry["records"]}
            if not recs:
                continue
            delta = min(rec["delta"] for rec in recs.values())
            accountant = next(iter(recs.values()))["accountant"]
            per_run = {rid: self.spent({"records": {rid: rec}}, delta, accountant) for rid, rec in recs.items()}
            rows.append({
                "key": key, "paths": entry["paths"], "digest": (entry["digests"] or [""])[-1], "delta": delta,
                "accountant": accountant, "epsilon": self.spent(entry, delta, accountant), "runs": per_run,
                "steps": {rid: sum(int(e[2]) for e in rec["history"]) for rid, rec in recs.items()},
            })  # fmt: skip
        return rows


def ledger_command(root: Path, reset: str | None, forget: str | None = None) -> int:
    """`fedpeft node ledger`: each data's lifetime epsilon and the runs that spent it; --reset, --forget."""
    if not Path(root).is_dir():
        raise ConfigError(f"{root} is not a directory: no node state there (--state-dir names the node's state-dir)")
    ledger = Lifetime(root)
    if reset is not None or forget is not None:
        entry = ledger.reset(forget or reset, forget=forget is not None)
        if forget is not None:
            print(f"FORGOT the entry for {forget}: its spending no longer counts (audit line in {root / AUDIT_FILE})")
        else:
            print(f"reset the entry for {reset}: {len(entry['inherited'])} record(s) kept as inherited history, "
                  "which still composes; --forget drops it, only for data that shares no row with the old")  # fmt: skip
        return 0
    rows = ledger.table()
    if not rows:
        print(f"no lifetime ledger entries in {root}")
        return 0
    for row in rows:
        print(f"{row['key']}  epsilon {row['epsilon']:.4g} at delta {row['delta']:g} ({row['accountant']})"
              + (f"  sha256 {row['digest'][:16]}" if row["digest"] else ""))  # fmt: skip
        for other in (p for p in row["paths"] if p != row["key"]):
            print(f"  also {other}")
        for rid, eps in sorted(row["runs"].items()):
            print(f"  run {rid}: {row['steps'][rid]} steps, epsilon {eps:.4g} alone")
    return 0
