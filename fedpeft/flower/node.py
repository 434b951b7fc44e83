"""What a Flower node holds: its clients, their node-kept state, and the worker that trains them.

A node learns everything from the server's message (the spec travels with it) and from its own
node config:

  partition-id    this node's index k (Flower's simulation sets it)
  num-partitions  the number of nodes N (Flower's simulation sets it); node k holds the clients
                  c with c % N == k: with N = federation.clients, client k alone; with fewer nodes
                  (one per GPU), a cohort of clients trained together (federation.executor = "cohort")
                  or one after another ("sequential")
  state-dir       where the node keeps its clients' privacy ledgers and personal tensors on disk,
                  so a restart never resets a budget (required with data-file; otherwise under DP
                  $FEDPEFT_STATE_DIR, else $XDG_STATE_HOME/fedpeft, else ~/.local/state/fedpeft)
  data-file       optional, for a node that holds one client: its own examples (JSON lines or CSV
                  with text and label; fedpeft.data.load_file), not a partition of the bundled data
  public-size     with data-file under DP (required there): the dataset size the node declares
                  public; q, sigma and the aggregation weight are computed from it (docs/privacy.md)
  max-epsilon     the node's privacy policy (fedpeft.flower.policy): the most epsilon each of its
                  data may spend over its lifetime, all runs composed (fedpeft.flower.lifetime);
                  a spec asking more for one run is refused at once
  max-delta       ... and the largest delta it trains at
  allow-no-dp     false: it refuses a spec with privacy off
                  Defaults: with data-file, 10 / 1 over public-size / false; without, inf / 1 / true

Between rounds the node keeps each client's ledger, the tensors its strategy keeps locally
(FedSA's B) and, with train.optimizer_state = keep, its optimizer state, in Flower's node state
(context.state) and on disk; none of them is ever sent. Ledgers are written before the
updates leave the node: a reply that is lost never under-counts privacy spent. A saved ledger is
the record: the node keeps spending with its sigma and q (whatever the spec or the data say now),
never above its target, lowered to a spec's smaller one. Beside them the node's lifetime ledger
composes every run's spending on each of its data; a refusal tells the server a category only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context

from fedpeft.adapters import AdaptedModel
from fedpeft.build import build_parts, client_budget, make_executor
from fedpeft.client import LocalTraining, evaluate
from fedpeft.config import ConfigError, Spec
from fedpeft.data import TokenizedData, load_file, tokenize
from fedpeft.executors.base import ClientFailure, ClientResult, InProcess
from fedpeft.flower import wire
from fedpeft.flower.environment import runtime_install_warning
from fedpeft.flower.lifetime import DataKey, Lifetime, LifetimeRefusal, bundled_key, file_key, row_prints
from fedpeft.flower.policy import DATA_FILE, DATA_FILE_PROBLEM, NO_STATE_DIR, POLICY, PUBLIC_SIZE, REFUSALS, Policy
from fedpeft.optim import OptimizerState
from fedpeft.privacy.accounting import ClientBudget
from fedpeft.runfiles import atomic_write
from fedpeft.state import AdapterState

__all__ = ["ClientRecords", "Node", "Policy", "Worker", "default_state_dir", "partition"]  # Policy: flower.policy

log = logging.getLogger("fedpeft")

LEDGER = "fedpeft.ledger.{}"  # per client: ConfigRecord in context.state, {"budget": JSON}
PERSONAL = "fedpeft.personal.{}"  # per client: ArrayRecord in context.state
OPTIMIZER = "fedpeft.optimizer.{}"  # per client: ArrayRecord in context.state, "tensor|key" -> state tensor
STATE_DIR = "state-dir"


def default_state_dir() -> Path:
    """Where a node keeps its ledgers when its node config names no state-dir."""
    if env := os.environ.get("FEDPEFT_STATE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "fedpeft"


def partition_id(context: Context) -> int:
    if wire.PARTITION_ID not in context.node_config:
        raise ConfigError(
            f"this node has no {wire.PARTITION_ID} in its node config (--node-config '{wire.PARTITION_ID}=K ...')"
        )
    return int(context.node_config[wire.PARTITION_ID])


def partition(context: Context, spec: Spec) -> list[int]:
    """The clients this node holds."""
    k = partition_id(context)
    n = int(context.node_config.get(wire.NUM_PARTITIONS, spec.federation.clients))
    if not 0 <= k < n <= spec.federation.clients:
        raise ConfigError(
            f"node is partition {k} of {n}, but the federation has {spec.federation.clients} clients "
            "(need 0 <= partition-id < num-partitions <= federation.clients)"
        )
    return wire.node_clients(k, n, spec.federation.clients)


class ClientRecords:
    """One client's ledger, kept tensors and kept optimizer state: in context.state, and under
    state-dir when configured."""

    def __init__(self, context: Context, cid: int, spec: Spec) -> None:
        self.context = context
        self.cid = cid
        state_dir = context.node_config.get(STATE_DIR)
        if not state_dir and DATA_FILE in context.node_config:  # fail closed: never a silent fresh budget
            raise ConfigError(NO_STATE_DIR)
        self.root = Path(str(state_dir)) if state_dir else (default_state_dir() if spec.privacy.enabled else None)
        self.run = str(spec.federation.continues or context.run_id)  # a resumed run continues its first's
        self.dir = self.root / f"run-{self.run}" if self.root is not None else None

    def _file(self, suffix: str) -> Path:
        assert self.dir is not None
        return self.dir / f"client-{self.cid}{suffix}"

    def budget(self) -> ClientBudget | None:
        if self.dir is not None and self._file(".json").is_file():  # disk outlives a node restart
            return ClientBudget.from_dict(json.loads(self._file(".json").read_text())["budget"])
        if LEDGER.format(self.cid) in self.context.state:
            return ClientBudget.from_dict(json.loads(str(self.context.state[LEDGER.format(self.cid)]["budget"])))
        return None

    def personal(self) -> dict[str, torch.Tensor]:
        if self.dir is not None and self._file("-personal.pt").is_file():
            return torch.load(self._file("-personal.pt"), weights_only=True)
        if PERSONAL.format(self.cid) in self.context.state:
            return wire.from_record(self.context.state[PERSONAL.format(self.cid)])
        return {}

    def optimizer(self) -> OptimizerState:
        if self.dir is not None and self._file("-optimizer.pt").is_file():
            return torch.load(self._file("-optimizer.pt"), weights_only=True)
        if OPTIMIZER.format(self.cid) in self.context.state:
            out: OptimizerState = {}
            for flat, tensor in wire.from_record(self.context.state[OPTIMIZER.format(self.cid)]).items():
                name, _, key = flat.rpartition("|")
                out.setdefault(name, {})[key] = tensor
            return out
        return {}

    def save(self, budget: ClientBudget | None, personal: dict[str, torch.Tensor], optimizer: OptimizerState | None = None,
             data: str = "") -> None:  # fmt: skip
        """Keep the client's state; `data`: its lifetime key, beside the ledger (a torn lifetime
        ledger is rebuilt from these files)."""
        if optimizer:
            flat = {f"{name}|{key}": t for name, st in optimizer.items() for key, t in st.items()}
            self.context.state[OPTIMIZER.format(self.cid)] = wire.to_record(flat)
        if budget is not None:
            self.context.state[LEDGER.format(self.cid)] = ConfigRecord({"budget": json.dumps(budget.to_dict())})
        if personal:
            self.context.state[PERSONAL.format(self.cid)] = wire.to_record(personal)
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if budget is not None:
            text = json.dumps({"budget": budget.to_dict(), "data": data}, indent=1)
            atomic_write(self._file(".json"), lambda p: p.write_text(text))
        if personal:
            atomic_write(self._file("-personal.pt"), lambda p: torch.save(personal, p))
        if optimizer:
            atomic_write(self._file("-optimizer.pt"), lambda p: torch.save(optimizer, p))


@dataclass
class Worker:
    """What a node builds once per spec: the model, the clients' bundled partitions, the test split,
    the plan, an in-process executor, and the adapter a client starts from (for tensors the server
    never sends)."""

    spec: Spec
    test: TokenizedData
    plan: LocalTraining
    template: AdapterState
    executor: InProcess
    label_names: tuple[str, ...]
    model: AdaptedModel
    files: dict[str, TokenizedData] = field(default_factory=dict)  # data-file -> its examples
    warned: set[tuple[int, int, int]] = field(default_factory=set)
    keys: dict[str, DataKey] = field(default_factory=dict)  # data-file -> its lifetime key, hashed as loaded
    rows: tuple[tuple[int, ...], ...] = ()  # each bundled client's row ids (its lifetime key)
    seen: dict[str, tuple | None] = field(default_factory=dict)  # data-file -> (mtime, size) when loaded

    @classmethod
    def build(cls, spec: Spec) -> Worker:
        parts = build_parts(spec)
        template, _ = parts.strategy.init(parts.model.state(), spec.federation.seed)
        budgets = [None] * spec.federation.clients if spec.privacy.enabled else None
        executor = make_executor(spec, parts.model, parts.data.clients, parts.data.num_labels, budgets)
        executor.secret = spec.privacy.enabled  # under DP: secret batches and noise, whatever the spec says
        data = parts.data
        return cls(
            spec, data.test, parts.plan, template, executor, data.label_names, parts.model, rows=data.client_rows
        )

    def data_file(self, path: str) -> TokenizedData:
        """The node's data file, tokenized; read again (and hashed again) when it changed on disk."""
        stat = Path(path).stat() if Path(path).is_file() else None
        seen = (stat.st_mtime_ns, stat.st_size) if stat else None
        if path not in self.files or self.seen.get(path) != seen:
            try:
                raw = load_file(path, self.label_names)
            except ConfigError as exc:  # its text names rows, bytes and keys: this node's log only
                log.error("data-file: %s", exc)
                raise ConfigError(DATA_FILE_PROBLEM) from None
            self.files[path] = tokenize(raw, self.model.tokenizer, self.spec.model.max_length)
            self.keys[path], self.seen[path] = file_key(path, row_prints(raw.texts, raw.labels)), seen
        return self.files[path]

    def data_key(self, context: Context, cid: int) -> DataKey:
        """Which data client `cid` trains on, for the node's lifetime ledger."""
        if DATA_FILE in context.node_config:
            return self.keys[str(context.node_config[DATA_FILE])]
        return bundled_key(self.spec.data.name, cid, self.rows[cid] if self.rows else ())

    def public_size(self, context: Context, cid: int, data: TokenizedData | None) -> int:
        """The size client `cid` declares public: its bundled partition's (derived from the spec),
        or, for a node's own data file, the node config's public-size."""
        if data is None:
            return len(self.executor.store.data[cid])
        if PUBLIC_SIZE not in context.node_config:
            raise ConfigError(
                f"under DP a node with a {DATA_FILE} needs {PUBLIC_SIZE}=N in its node config: the dataset size "
                "it declares public (q, sigma and its aggregation weight are computed from it, never from "
                "the true size)"
            )
        size = int(context.node_config[PUBLIC_SIZE])
        if size < 1:
            raise ConfigError(f"{PUBLIC_SIZE} must be >= 1 (got {size})")
        if size != len(data) and (cid, size, len(data)) not in self.warned:
            self.warned.add((cid, size, len(data)))  # once: the node's log, not every round
            log.warning("client %d: public-size %d, %d examples in %s", cid, size, len(data), DATA_FILE)
        return size

    def budget(self, context: Context, cid: int, saved: ClientBudget | None, data: TokenizedData | None):  # noqa: ANN201
        """Client `cid`'s ledger: the saved one, kept as the record (its sigma and q; its target
        lowered to a smaller one the spec asks), or a new one calibrated on its public size. A
        ledger kept at another delta or accountant cannot be compared: a ClientFailure."""
        spec, priv = self.spec, self.spec.privacy
        if saved is None:
            return client_budget(spec, cid, self.public_size(context, cid, data))
        if (saved.delta, saved.accountant) != (priv.delta, priv.accountant):
            log.warning(
                "client %d refused: %s",
                cid,
                f"client {cid}'s ledger is kept at delta {saved.delta:g} ({saved.accountant}); the spec asks "
                f"delta {priv.delta:g} ({priv.accountant}): refused",
            )
            return ClientFailure(cid, POLICY, refused=True)
        if priv.epsilon < saved.target_epsilon:
            saved.target_epsilon = priv.epsilon
        return saved

    def own_data(self, context: Context, cids: list[int], mine: list[int]) -> dict[int, TokenizedData | None]:
        """Each client's data: the node's data-file, or None for its bundled partition."""
        if DATA_FILE not in context.node_config:
            return dict.fromkeys(cids)
        if len(mine) != 1:
            raise ConfigError("data-file needs a node that holds one client (num-partitions = federation.clients)")
        return dict.fromkeys(cids, self.data_file(str(context.node_config[DATA_FILE])))


class Node:
    """A node's runtime, held by its ClientApp: one worker (one federation at a time per process)
    and the three things a node does: say which partition it is, train, evaluate."""

    def __init__(self) -> None:
        self._worker: tuple[str, Worker] | None = None
        self._announced: set[Policy] = set()

    def worker(self, spec_json: str) -> Worker:
        if self._worker is None or self._worker[0] != spec_json:
            self._worker = None  # one federation at a time: free the old model first
            if warning := runtime_install_warning():
                log.warning(warning)
            self._worker = (spec_json, Worker.build(wire.spec_from_json(spec_json)))
        return self._worker[1]

    def train(self, request: wire.TrainRequest, context: Context) -> list[ClientResult]:
        """One round of this node's sampled clients: check the node's policy, lend their ledgers,
        kept tensors and data to the executor's store, train (each checks its budget first; batches
        and noise from secret randomness), save before replying."""
        worker = self.worker(request.spec_json)
        spec, store = worker.spec, worker.executor.store
        mine = partition(context, spec)
        if not set(request.clients) <= set(mine):
            strays = sorted(set(request.clients) - set(mine))
            raise ConfigError(f"message for clients {strays} reached a node holding {mine}")
        policy = Policy.of(context)
        if policy not in self._announced:  # once per policy: a real node's operator sees what it enforces
            self._announced.add(policy)
            log.log(logging.WARNING if policy.own_data else logging.INFO, policy.describe())
        if (why := policy.violation(spec)) is not None:
            log.warning("clients %s refused: %s", request.clients, why)
            return [ClientFailure(cid, POLICY, refused=True) for cid in request.clients]
        data = worker.own_data(context, request.clients, mine)
        records = {cid: ClientRecords(context, cid, spec) for cid in request.clients}
        failed: dict[int, ClientResult] = {}
        for cid, rec in records.items():  # its ledger so far, or a new one on its public size
            budget = worker.budget(context, cid, rec.budget(), data[cid]) if spec.privacy.enabled else None
            if budget is not None and not isinstance(budget, ClientFailure):
                budget = self._reserve(worker, context, rec, budget, policy)
            if isinstance(budget, ClientFailure):
                failed[cid] = budget
                continue
            store.adopt(cid, budget, rec.personal(), data[cid], rec.optimizer())
        training = [cid for cid in request.clients if cid not in failed]
        start = worker.template.with_tensors(request.adapter)
        try:
            plan, seeds = worker.plan, request.seeds  # seeds: privacy off only; under DP the executor draws its own
            trained = worker.executor.run_round(request.round, training, start, plan, seeds) if training else []
        finally:
            for cid in training:  # ledgers hit the disk before any update leaves the node
                budget, personal, optimizer = store.release(cid)
                key = worker.data_key(context, cid)
                records[cid].save(budget, personal, optimizer, key.key)
                if budget is not None and records[cid].root is not None:
                    lifetime = Lifetime(records[cid].root)
                    lifetime.settle(key, records[cid].run, budget.history, budget.delta, budget.accountant, cid)
        results = {r.client_id: r for r in trained} | failed
        for cid, result in results.items():  # the details stay in this log; wire sends the category only
            if isinstance(result, ClientFailure) and result.refused and result.reason not in REFUSALS:
                log.warning("client %d refused: %s", cid, result.reason)
        return [results[cid] for cid in request.clients]

    @staticmethod
    def _reserve(worker: Worker, context: Context, rec: ClientRecords, budget: ClientBudget, policy: Policy):  # noqa: ANN205
        """`budget`, once the node's lifetime ledger holds this round's steps on the client's data; a
        ClientFailure where the data's lifetime epsilon would pass max-epsilon."""
        if rec.root is None:
            return budget
        history = list(budget.history_after(worker.plan.steps))
        key, run = worker.data_key(context, rec.cid), rec.run
        try:
            Lifetime(rec.root).reserve(key, run, history, budget.delta, budget.accountant, policy.max_epsilon, rec.cid)
        except LifetimeRefusal as refusal:
            log.warning("client %d refused: %s", rec.cid, refusal)
            return ClientFailure(rec.cid, refusal.category, refused=True)
        return budget

    def evaluate(self, spec_json: str, adapter: dict[str, torch.Tensor], context: Context) -> dict[int, dict]:
        """The global adapter with each of this node's clients' kept tensors, on the federation's test
        split; a client that has not trained yet has no personal model and is left out."""
        worker = self.worker(spec_json)
        state = worker.template.with_tensors(adapter)
        scores = {}
        for cid in partition(context, worker.spec):
            if personal := ClientRecords(context, cid, worker.spec).personal():
                batch = worker.spec.train.eval_batch_size
                scores[cid] = evaluate(worker.model, state.with_tensors(personal), worker.test, batch)
        return scores
