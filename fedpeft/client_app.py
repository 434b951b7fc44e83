"""Flower ClientApp: a node trains its client(s) with the same executors as `fedpeft simulate`.

The node learns everything from the server's message (the spec travels with it) and from its own
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
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.adapters import AdaptedModel
from fedpeft.client import LocalTraining, evaluate
from fedpeft.config import ConfigError, Spec
from fedpeft.data import TokenizedData, load_file, tokenize
from fedpeft.executors import ClientFailure, Executor
from fedpeft.executors.flower import NUM_PARTITIONS, PARTITION_ID, from_record, node_clients, spec_from_json, to_record
from fedpeft.federation import atomic_write, build_parts, client_budget, make_executor
from fedpeft.privacy.accounting import ClientBudget
from fedpeft.state import AdapterState

__all__ = ["app"]

app = ClientApp()

LEDGER = "fedpeft.ledger.{}"  # per client: ConfigRecord in context.state, {"budget": JSON}
PERSONAL = "fedpeft.personal.{}"  # per client: ArrayRecord in context.state


@dataclass
class _Worker:
    """What a node builds once per spec: the model, the clients' data, the test split, the plan,
    an executor, and the adapter a client starts from (for tensors the server never sends)."""

    spec: Spec
    model: AdaptedModel
    clients: list[TokenizedData]
    test: TokenizedData
    plan: LocalTraining
    template: AdapterState
    executor: Executor
    label_names: tuple[str, ...]
    files: dict[str, TokenizedData] = field(default_factory=dict)  # data-file -> its examples

    def data_file(self, path: str) -> TokenizedData:
        if path not in self.files:
            raw = load_file(path, self.label_names)
            self.files[path] = tokenize(raw, self.model.tokenizer, self.spec.model.max_length)
        return self.files[path]


_cache: dict[str, _Worker] = {}


def _worker(spec_json: str) -> _Worker:
    if spec_json not in _cache:
        _cache.clear()  # one federation at a time per process
        spec = spec_from_json(spec_json)
        strategy, model, data, plan = build_parts(spec)
        template, _ = strategy.init(model.state(), spec.federation.seed)
        budgets = [None] * spec.federation.clients if spec.privacy.enabled else None
        executor = make_executor(spec, model, data.clients, data.num_labels, budgets)
        # the worker's own list of partitions: train() lends a node's data file to the executor's
        # list for one round and restores it from this one
        _cache[spec_json] = _Worker(
            spec, model, list(data.clients), data.test, plan, template, executor, data.label_names
        )
    return _cache[spec_json]


def _partition_id(context: Context) -> int:
    if PARTITION_ID not in context.node_config:
        raise ConfigError(f"this node has no {PARTITION_ID} in its node config (--node-config '{PARTITION_ID}=K ...')")
    return int(context.node_config[PARTITION_ID])


def _partition(context: Context, spec: Spec) -> list[int]:
    """The clients this node holds."""
    k = _partition_id(context)
    n = int(context.node_config.get(NUM_PARTITIONS, spec.federation.clients))
    if not 0 <= k < n <= spec.federation.clients:
        raise ConfigError(
            f"node is partition {k} of {n}, but the federation has {spec.federation.clients} clients "
            "(need 0 <= partition-id < num-partitions <= federation.clients)"
        )
    return node_clients(k, n, spec.federation.clients)


class _NodeState:
    """A client's ledger and kept tensors: in context.state, and under state-dir when configured."""

    def __init__(self, context: Context, cid: int) -> None:
        self.context = context
        self.cid = cid
        state_dir = context.node_config.get("state-dir")
        self.dir = Path(str(state_dir)) / f"run-{context.run_id}" if state_dir else None

    def _file(self, suffix: str) -> Path:
        assert self.dir is not None
        return self.dir / f"client-{self.cid}{suffix}"

    def budget(self) -> dict | None:
        if self.dir is not None and self._file(".json").is_file():  # disk outlives a node restart
            return json.loads(self._file(".json").read_text())["budget"]
        if LEDGER.format(self.cid) in self.context.state:
            return json.loads(str(self.context.state[LEDGER.format(self.cid)]["budget"]))
        return None

    def personal(self) -> dict[str, torch.Tensor]:
        if self.dir is not None and self._file("-personal.pt").is_file():
            return torch.load(self._file("-personal.pt"), weights_only=True)
        if PERSONAL.format(self.cid) in self.context.state:
            return from_record(self.context.state[PERSONAL.format(self.cid)])
        return {}

    def save(self, budget: ClientBudget | None, personal: dict[str, torch.Tensor]) -> None:
        if budget is not None:
            self.context.state[LEDGER.format(self.cid)] = ConfigRecord({"budget": json.dumps(budget.to_dict())})
        if personal:
            self.context.state[PERSONAL.format(self.cid)] = to_record(personal)
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if budget is not None:
            atomic_write(
                self._file(".json"), lambda p: p.write_text(json.dumps({"budget": budget.to_dict()}, indent=1))
            )
        if personal:
            atomic_write(self._file("-personal.pt"), lambda p: torch.save(personal, p))


def _global(worker: _Worker, message: Message) -> AdapterState:
    return worker.template.with_tensors(from_record(message.content["adapter"]))


@app.query()
def query(message: Message, context: Context) -> Message:
    """Which partition this node is."""
    parts = int(context.node_config.get(NUM_PARTITIONS, -1))
    reply = ConfigRecord({PARTITION_ID: _partition_id(context), NUM_PARTITIONS: parts})
    return Message(RecordDict({"config": reply}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round of this node's sampled clients: load their ledgers and kept tensors, train them
    with the spec's executor (each checks its budget first), save, reply with every upload."""
    config = message.content["config"]
    worker = _worker(str(config["spec"]))
    spec, executor = worker.spec, worker.executor
    cids = [int(c) for c in config["clients"]]
    seeds = dict(zip(cids, (int(s) for s in config["seeds"]), strict=True))
    mine = set(_partition(context, spec))
    if not set(cids) <= mine:
        raise ConfigError(f"message for clients {sorted(set(cids) - mine)} reached a node holding {sorted(mine)}")
    # each client's data: its partition of the bundled dataset, or the node's own file
    data = {cid: worker.clients[cid] for cid in cids}
    if "data-file" in context.node_config:
        if len(mine) != 1:
            raise ConfigError("data-file needs a node that holds one client (num-partitions = federation.clients)")
        data = {cid: worker.data_file(str(context.node_config["data-file"])) for cid in cids}
    stores = {cid: _NodeState(context, cid) for cid in cids}
    for cid, store in stores.items():  # this node's view of its clients, as it left them
        if executor.budgets is not None:  # its ledger so far, or a new one calibrated on its own data
            saved = store.budget()
            budget = ClientBudget.from_dict(saved) if saved else client_budget(spec, cid, len(data[cid]))
            executor.budgets[cid] = budget
        executor.personal.pop(cid, None)
        if personal := store.personal():
            executor.personal[cid] = personal
        executor.clients[cid] = data[cid]
    try:
        results = executor.run_round(int(config["round"]), cids, _global(worker, message), worker.plan, seeds)
    finally:
        for cid in cids:  # the executor's list holds the bundled partitions again
            executor.clients[cid] = worker.clients[cid]
    content = RecordDict()
    refused = {}
    for result in results:
        cid = result.client_id
        stores[cid].save(
            executor.budgets[cid] if executor.budgets is not None else None, executor.personal.get(cid, {})
        )
        if isinstance(result, ClientFailure):
            refused[str(cid)] = result.reason
            continue
        metrics = {k: float(v) for k, v in result.metrics.items()}
        metrics["num_examples"] = result.num_examples
        if result.rank is not None:
            metrics["rank"] = result.rank
        content[f"update.{cid}"] = to_record(dict(result.tensors))
        content[f"metrics.{cid}"] = MetricRecord(metrics)
    content["status"] = ConfigRecord({"refused": json.dumps(refused)})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate_personal(message: Message, context: Context) -> Message:
    """The global adapter with each of this node's clients' kept tensors, on the federation's test
    split; a client that has not trained yet has no personal model and is left out."""
    worker = _worker(str(message.content["config"]["spec"]))
    state = _global(worker, message)
    content = RecordDict()
    for cid in _partition(context, worker.spec):
        personal = _NodeState(context, cid).personal()
        if personal:
            scores = evaluate(
                worker.model, state.with_tensors(personal), worker.test, worker.spec.train.eval_batch_size
            )
            content[f"metrics.{cid}"] = MetricRecord(scores)
    return Message(content, reply_to=message)
