"""Assembly: spec -> strategy, model, data, plan, budgets, executor.

One assembly for every way of running: the in-process `Federation`, the Flower ServerApp and the
Flower ClientApp all build their parts here, so a node trains exactly what the server plans.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.adapters import AdaptedModel
from fedpeft.catalog import check_names
from fedpeft.client import LocalTraining
from fedpeft.config import ConfigError, Spec
from fedpeft.data import FederatedData, TokenizedData, load_raw, prepare
from fedpeft.executors import EXECUTORS, Executor
from fedpeft.optim import LocalOptimizer
from fedpeft.privacy.accounting import ClientBudget, calibrate_budget
from fedpeft.state import HEAD, AdapterState, kind_of
from fedpeft.strategies import Strategy, make_strategy

__all__ = [
    "Parts",
    "build_parts",
    "client_budget",
    "client_budgets",
    "public_size",
    "make_executor",
    "make_plan",
]


def make_plan(spec: Spec, strategy: Strategy, state: AdapterState) -> LocalTraining:
    """What every client does in a round: the strategy's trainable and uploaded tensors, the
    tensors it keeps locally, and the spec's local optimizer and schedule."""
    trains = set(strategy.trains) | ({HEAD} if spec.model.train_head else set())
    return LocalTraining(
        steps=spec.train.local_steps,
        batch_size=spec.train.batch_size,
        lr=spec.train.lr,
        trains=frozenset(trains),
        uploads=tuple(strategy.uploads(state, spec.model.train_head)),
        keeps=tuple(n for n in state.tensors if kind_of(n) in strategy.personal),
        optimizer=LocalOptimizer.from_spec(spec.train, spec.federation.rounds),
    )


def client_budget(spec: Spec, client_id: int, num_examples: int) -> ClientBudget:
    """A client's DP-SGD budget, calibrated for the worst case: it trains in every round. A
    client computes its own from the spec and its data size alone (Flower nodes do)."""
    priv = spec.privacy
    return calibrate_budget(
        client_id, num_examples, spec.train.batch_size, spec.federation.rounds, spec.train.local_steps,
        priv.epsilon, priv.delta, priv.accountant,
    )  # fmt: skip


def client_budgets(spec: Spec, clients: list[TokenizedData]) -> list[ClientBudget | None] | None:
    """Every client's budget (None when privacy is off), on its public size (`public_size`)."""
    if not spec.privacy.enabled:
        return None
    return [client_budget(spec, cid, public_size(spec, cid, len(c))) for cid, c in enumerate(clients)]


def public_size(spec: Spec, cid: int, bundled: int) -> int:
    """Client `cid`'s public size as the server knows it: what federation.public_sizes binds for a node's
    data-file, else its bundled partition's size (`bundled`)."""
    sizes = spec.federation.public_sizes
    return sizes[cid] if 0 <= cid < len(sizes) and sizes[cid] > 0 else bundled


def make_executor(
    spec: Spec, model: AdaptedModel, clients: list, num_labels: int, budgets: list[ClientBudget | None] | None
) -> Executor:
    """The in-process executor the spec asks for (`federation.executor`), over `clients`' data."""
    return EXECUTORS.get(spec.federation.executor)(spec, model, clients, num_labels, budgets)


@dataclass
class Parts:
    """What both the server and a Flower node build from a spec."""

    spec: Spec
    strategy: Strategy
    model: AdaptedModel
    data: FederatedData
    plan: LocalTraining


def build_parts(spec: Spec) -> Parts:
    """The strategy, the model with its adapter, the data (test split and every client's
    partition) and the clients' plan."""
    check_names(spec)
    strategy = make_strategy(spec.strategy.name, spec.strategy.kwargs)
    fed = spec.federation
    raw = load_raw(spec.data)
    model = AdaptedModel(spec.model, num_labels=len(raw.label_names), seed=fed.seed, device=fed.device)
    data = prepare(spec.data, fed.clients, model.tokenizer, spec.model.max_length, fed.seed, raw=raw)
    if spec.model.head_init == "public" and data.public is None:
        raise ConfigError(
            "model.head_init = public fits the head on the server's public examples: set data.public_size"
        )
    model.init_head(spec.model.head_init, data.label_names, data.public)
    return Parts(spec, strategy, model, data, make_plan(spec, strategy, model.state()))
