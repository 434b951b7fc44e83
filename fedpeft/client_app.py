"""Flower ClientApp: a node trains its own client with the reference client code (fedpeft.client).

The node learns everything from the server's message (the spec travels with it) and from its own
node config:

  partition-id    which client of the federation this node is (Flower's simulation sets it)
  num-partitions  must equal federation.clients
  state-dir       optional: a directory where the node keeps its privacy ledger and personal
                  tensors on disk, so a restarted SuperNode does not forget what it has spent

Between rounds the node keeps its ledger and the tensors its strategy keeps locally (FedSA's B) in
Flower's node state (context.state), and on disk too when `state-dir` is set. The ledger is written
before the update leaves the node: a reply that is lost never under-counts privacy spent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.adapters import AdaptedModel
from fedpeft.client import ClientRefused, LocalTraining, client_round, evaluate
from fedpeft.config import ConfigError, Spec, client_rank
from fedpeft.data import DATASETS, TokenizedData, prepare
from fedpeft.executors.flower import NUM_PARTITIONS, PARTITION_ID, from_record, to_record
from fedpeft.federation import client_budget, make_plan
from fedpeft.privacy.accounting import ClientBudget
from fedpeft.state import AdapterState
from strategies import make_strategy

__all__ = ["app"]

app = ClientApp()

LEDGER = "fedpeft.ledger"  # ConfigRecord in context.state: {"budget": JSON}
PERSONAL = "fedpeft.personal"  # ArrayRecord in context.state


@dataclass
class _Worker:
    """What a node builds once per spec: the model, its own data, the test split, the plan, and
    the adapter a client starts from before any round (for tensors the server never sends)."""

    spec: Spec
    model: AdaptedModel
    clients: list[TokenizedData]
    test: TokenizedData
    plan: LocalTraining
    template: AdapterState


_cache: dict[str, _Worker] = {}


def _worker(spec_json: str) -> _Worker:
    if spec_json not in _cache:
        _cache.clear()  # one federation at a time per process
        spec = Spec.from_dict(json.loads(spec_json))
        fed = spec.federation
        raw = DATASETS.get(spec.data.name)()
        model = AdaptedModel(spec.model, num_labels=len(raw.label_names), seed=fed.seed, device=fed.device)
        data = prepare(spec.data, fed.clients, model.tokenizer, spec.model.max_length, fed.seed, raw=raw)
        strategy = make_strategy(spec.strategy.name, spec.strategy.kwargs)
        template, _ = strategy.init(model.state(), fed.seed)
        plan = make_plan(spec, strategy, template)
        _cache[spec_json] = _Worker(spec, model, data.clients, data.test, plan, template)
    return _cache[spec_json]


def _partition(context: Context, spec: Spec) -> int:
    config = context.node_config
    if PARTITION_ID not in config:
        raise ConfigError(f"this node has no {PARTITION_ID} in its node config (--node-config '{PARTITION_ID}=K ...')")
    cid = int(config[PARTITION_ID])
    parts = int(config.get(NUM_PARTITIONS, spec.federation.clients))
    if parts != spec.federation.clients or not 0 <= cid < parts:
        raise ConfigError(
            f"node holds partition {cid} of {parts}, but the federation has {spec.federation.clients} clients"
        )
    return cid


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
        if LEDGER in self.context.state:
            return json.loads(str(self.context.state[LEDGER]["budget"]))
        return None

    def personal(self) -> dict[str, torch.Tensor]:
        if self.dir is not None and self._file("-personal.pt").is_file():
            return torch.load(self._file("-personal.pt"), weights_only=True)
        if PERSONAL in self.context.state:
            return from_record(self.context.state[PERSONAL])
        return {}

    def save(self, budget: ClientBudget | None, personal: dict[str, torch.Tensor]) -> None:
        if budget is not None:
            self.context.state[LEDGER] = ConfigRecord({"budget": json.dumps(budget.to_dict())})
        if personal:
            self.context.state[PERSONAL] = to_record(personal)
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if budget is not None:
            _atomic(self._file(".json"), lambda p: p.write_text(json.dumps({"budget": budget.to_dict()}, indent=1)))
        if personal:
            _atomic(self._file("-personal.pt"), lambda p: torch.save(personal, p))


def _atomic(path: Path, write) -> None:  # noqa: ANN001
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _start_state(worker: _Worker, message: Message, personal: dict[str, torch.Tensor]) -> AdapterState:
    return worker.template.with_tensors(from_record(message.content["adapter"])).with_tensors(personal)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Which client this node is."""
    config = context.node_config
    if PARTITION_ID not in config:
        raise ConfigError(f"this node has no {PARTITION_ID} in its node config (--node-config '{PARTITION_ID}=K ...')")
    reply = ConfigRecord({PARTITION_ID: int(config[PARTITION_ID]), NUM_PARTITIONS: int(config.get(NUM_PARTITIONS, -1))})
    return Message(RecordDict({"config": reply}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round of this node's client: check its budget, train, record, reply with the upload."""
    config = message.content["config"]
    worker = _worker(str(config["spec"]))
    spec = worker.spec
    cid = _partition(context, spec)
    if int(config["client"]) != cid:
        raise ConfigError(f"message for client {config['client']} reached the node of client {cid}")
    store = _NodeState(context, cid)
    saved = store.budget()
    budget = None
    if spec.privacy.enabled:
        budget = ClientBudget.from_dict(saved) if saved else client_budget(spec, cid, len(worker.clients[cid]))
    personal = store.personal()
    try:
        update = client_round(
            worker.model, _start_state(worker, message, personal), worker.clients[cid], worker.plan,
            client_id=cid, seed=int(config["seed"]), budget=budget, clip=spec.privacy.clip,
            rank=client_rank(spec.model, cid),
        )  # fmt: skip
    except ClientRefused as exc:
        status = ConfigRecord({"refused": str(exc)})
        return Message(RecordDict({"status": status}), reply_to=message)
    kept = worker.model.tensors(list(worker.plan.keeps)) if worker.plan.keeps else {}
    store.save(budget, kept)  # before the update leaves the node
    metrics = {k: float(v) for k, v in update.metrics.items()}
    metrics["num_examples"] = update.num_examples
    if update.rank is not None:
        metrics["rank"] = update.rank
    content = RecordDict(
        {
            "update": to_record(dict(update.tensors)),
            "metrics": MetricRecord(metrics),
            "status": ConfigRecord({"refused": ""}),
        }
    )
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate_personal(message: Message, context: Context) -> Message:
    """The global adapter with this client's kept tensors, on the federation's test split. A node
    whose client has not trained yet has no personal model and answers with no metrics."""
    worker = _worker(str(message.content["config"]["spec"]))
    cid = _partition(context, worker.spec)
    personal = _NodeState(context, cid).personal()
    if not personal:
        return Message(RecordDict(), reply_to=message)
    scores = evaluate(
        worker.model, _start_state(worker, message, personal), worker.test, worker.spec.train.eval_batch_size
    )
    return Message(RecordDict({"metrics": MetricRecord(scores)}), reply_to=message)
