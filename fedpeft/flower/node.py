"""What a Flower node holds: its clients, their node-kept state, and the worker that trains them.

A node learns everything from the server's message (the spec travels with it) and from its own
node config:

  partition-id    this node's index k (Flower's simulation sets it)
  num-partitions  the number of nodes N (Flower's simulation sets it); node k holds the clients
                  c with c % N == k: with N = federation.clients, client k alone; with fewer nodes
                  (one per GPU), a cohort of clients trained together (federation.executor = "cohort")
                  or one after another ("sequential")
  state-dir       optional: a directory where the node keeps its clients' privacy ledgers and
                  personal tensors on disk, so a restarted SuperNode does not forget what they spent
  data-file       optional, for a node that holds one client: the client's own examples (JSON
                  lines or CSV with text and label; see fedpeft.data.load_file) instead of its
                  partition of the spec's bundled dataset. Its sigma is calibrated on its own size.

Between rounds the node keeps each client's ledger and the tensors its strategy keeps locally
(FedSA's B) in Flower's node state (context.state), and on disk too when `state-dir` is set. Ledgers
are written before the updates leave the node: a reply that is lost never under-counts privacy spent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context

from fedpeft.adapters import AdaptedModel
from fedpeft.build import build_parts, client_budget, make_executor
from fedpeft.client import LocalTraining, evaluate
from fedpeft.config import ConfigError, Spec
from fedpeft.data import TokenizedData, load_file, tokenize
from fedpeft.executors.base import ClientResult, InProcess
from fedpeft.flower import wire
from fedpeft.privacy.accounting import ClientBudget
from fedpeft.runfiles import atomic_write
from fedpeft.state import AdapterState

__all__ = ["ClientRecords", "Node", "Worker", "partition"]

LEDGER = "fedpeft.ledger.{}"  # per client: ConfigRecord in context.state, {"budget": JSON}
PERSONAL = "fedpeft.personal.{}"  # per client: ArrayRecord in context.state
STATE_DIR = "state-dir"
DATA_FILE = "data-file"


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
    """One client's ledger and kept tensors: in context.state, and under state-dir when configured."""

    def __init__(self, context: Context, cid: int) -> None:
        self.context = context
        self.cid = cid
        state_dir = context.node_config.get(STATE_DIR)
        self.dir = Path(str(state_dir)) / f"run-{context.run_id}" if state_dir else None

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

    def save(self, budget: ClientBudget | None, personal: dict[str, torch.Tensor]) -> None:
        if budget is not None:
            self.context.state[LEDGER.format(self.cid)] = ConfigRecord({"budget": json.dumps(budget.to_dict())})
        if personal:
            self.context.state[PERSONAL.format(self.cid)] = wire.to_record(personal)
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if budget is not None:
            text = json.dumps({"budget": budget.to_dict()}, indent=1)
            atomic_write(self._file(".json"), lambda p: p.write_text(text))
        if personal:
            atomic_write(self._file("-personal.pt"), lambda p: torch.save(personal, p))


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

    @classmethod
    def build(cls, spec: Spec) -> Worker:
        parts = build_parts(spec)
        template, _ = parts.strategy.init(parts.model.state(), spec.federation.seed)
        budgets = [None] * spec.federation.clients if spec.privacy.enabled else None
        executor = make_executor(spec, parts.model, parts.data.clients, parts.data.num_labels, budgets)
        return cls(spec, parts.data.test, parts.plan, template, executor, parts.data.label_names, parts.model)

    def data_file(self, path: str) -> TokenizedData:
        if path not in self.files:
            raw = load_file(path, self.label_names)
            self.files[path] = tokenize(raw, self.model.tokenizer, self.spec.model.max_length)
        return self.files[path]

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

    def worker(self, spec_json: str) -> Worker:
        if self._worker is None or self._worker[0] != spec_json:
            self._worker = None  # one federation at a time: free the old model first
            self._worker = (spec_json, Worker.build(wire.spec_from_json(spec_json)))
        return self._worker[1]

    def train(self, request: wire.TrainRequest, context: Context) -> list[ClientResult]:
        """One round of this node's sampled clients: lend their ledgers, kept tensors and data to
        the executor's store, train (each checks its budget first), save before replying."""
        worker = self.worker(request.spec_json)
        spec, store = worker.spec, worker.executor.store
        mine = partition(context, spec)
        if not set(request.clients) <= set(mine):
            strays = sorted(set(request.clients) - set(mine))
            raise ConfigError(f"message for clients {strays} reached a node holding {mine}")
        data = worker.own_data(context, request.clients, mine)
        records = {cid: ClientRecords(context, cid) for cid in request.clients}
        for cid, rec in records.items():  # its ledger so far, or a new one calibrated on its own data
            budget = None
            if spec.privacy.enabled:
                size = len(data[cid]) if data[cid] is not None else len(store.data[cid])
                budget = rec.budget() or client_budget(spec, cid, size)
            store.adopt(cid, budget, rec.personal(), data[cid])
        start = worker.template.with_tensors(request.adapter)
        try:
            results = worker.executor.run_round(request.round, request.clients, start, worker.plan, request.seeds)
        finally:
            for cid, rec in records.items():  # ledgers hit the disk before any update leaves the node
                rec.save(*store.release(cid))
        return results

    def evaluate(self, spec_json: str, adapter: dict[str, torch.Tensor], context: Context) -> dict[int, dict]:
        """The global adapter with each of this node's clients' kept tensors, on the federation's test
        split; a client that has not trained yet has no personal model and is left out."""
        worker = self.worker(spec_json)
        state = worker.template.with_tensors(adapter)
        scores = {}
        for cid in partition(context, worker.spec):
            if personal := ClientRecords(context, cid).personal():
                batch = worker.spec.train.eval_batch_size
                scores[cid] = evaluate(worker.model, state.with_tensors(personal), worker.test, batch)
        return scores
