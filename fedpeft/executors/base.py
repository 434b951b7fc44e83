"""The executor contract: train these clients from this global adapter, return what came back.

An executor is the only part of a run that changes between in-process simulation, the cohort
engine and Flower: the round loop calls exactly the methods of `Executor` below. In-process
executors keep their clients' state (privacy ledgers, the tensors a strategy keeps on the client,
each client's data and rank) in a `ClientStore`, held by composition; a Flower node lends its own
clients' state to that store for one round (`adopt`) and takes it back (`release`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Union

import torch

from fedpeft.catalog import EXECUTOR_NAMES
from fedpeft.client import LocalTraining
from fedpeft.data.base import TokenizedData
from fedpeft.optim import OptimizerState
from fedpeft.privacy.accounting import ClientBudget
from fedpeft.privacy.randomness import SecretKey, Seed
from fedpeft.registry import Registry
from fedpeft.state import AdapterState, ClientUpdate

if TYPE_CHECKING:
    from fedpeft.adapters import AdaptedModel
    from fedpeft.config import Spec

__all__ = [
    "ClientFailure", "ClientResult", "ClientStore", "Executor", "EXECUTORS", "ExecutorFactory", "SecureSum",
]  # fmt: skip


@dataclass(frozen=True)
class ClientFailure:
    """A sampled client that sent no update: it refused (privacy budget) or failed."""

    client_id: int
    reason: str
    refused: bool = False


@dataclass
class SecureSum(ClientUpdate):
    """A round under secure aggregation: only the clients' aggregate reached the server, as one
    update. `tensors`: what was sent + the weighted mean of the members' changes (under
    distributed client-level DP, the unweighted mean of their clipped, noised changes);
    `num_examples`: the sum of their weights; `members`: the clients inside it, with the public
    metrics each reported in the clear (epsilon, sigma); `noise_shares`: under distributed
    client-level DP, how many clients were asked to add a share of the noise."""

    members: dict[int, dict[str, float]] = field(default_factory=dict)
    noise_shares: int = 0


ClientResult = Union[ClientUpdate, ClientFailure]
Scores = dict[str, float]


class Executor(Protocol):
    """Everything the round loop asks of whoever trains the clients."""

    @property
    def noise(self) -> str:
        """Where the clients' Poisson batches and DP noise come from: "seeded" (from the seeds the
        loop passes) or "secret" (drawn by the clients, unknown to the server)."""

    def run_round(
        self,
        round_num: int,
        client_ids: list[int],
        global_state: AdapterState,
        plan: LocalTraining,
        seeds: dict[int, int],
        on_client: Callable[[int], None] | None = None,
    ) -> list[ClientResult]:
        """Train each client in `client_ids` (seeded by `seeds[cid]`) and return their results,
        in the order of `client_ids`."""

    def evaluate_personal(
        self, global_state: AdapterState, plan: LocalTraining, evaluate: Callable[[AdapterState], Scores]
    ) -> list[Scores]:
        """Scores of the personalised models (the global adapter with each trained client's kept
        tensors) for strategies whose clients keep part of the adapter. In-process executors apply
        `evaluate` to each; remote ones ask the nodes that hold the kept tensors."""

    def client_states(self) -> dict:
        """Per-client state that must survive rounds (privacy ledgers), for checkpoints."""

    def load_client_states(self, states: dict) -> None:
        """Restore what `client_states` returned."""


# (spec, model, clients' data, number of labels, budgets) -> an executor over those clients
ExecutorFactory = Callable[["Spec", "AdaptedModel", list[TokenizedData], int, "list[ClientBudget | None] | None"], Any]
EXECUTORS: Registry[ExecutorFactory] = Registry("executor", EXECUTOR_NAMES)


class ClientStore:
    """What an in-process executor keeps for its clients between rounds: each client's data, rank,
    privacy ledger (None when privacy is off), the tensors its strategy keeps on the client
    (FedSA's B) and, with train.optimizer_state = keep, its optimizer state. Checkpointed through
    `client_states()`."""

    def __init__(
        self,
        data: list[TokenizedData],
        budgets: list[ClientBudget | None] | None,
        ranks: list[int | None] | None = None,
    ) -> None:
        self._bundled = list(data)  # what `release` restores
        self.data = list(data)
        self.budgets = budgets
        self.ranks = list(ranks) if ranks else [None] * len(data)
        self.personal: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer: dict[int, OptimizerState] = {}  # kept optimizer state (never sent)

    def optimizer_state(self, cid: int, keep: bool) -> OptimizerState | None:
        """Client `cid`'s kept optimizer state, to be updated in place by its training; None when the
        plan does not keep state (a fresh optimizer every round)."""
        return self.optimizer.setdefault(cid, {}) if keep else None

    def budget(self, cid: int) -> ClientBudget | None:
        return self.budgets[cid] if self.budgets is not None else None

    def start_state(self, cid: int, global_state: AdapterState) -> AdapterState:
        """Where client `cid` starts: the global adapter with its own kept tensors in place."""
        return global_state.with_tensors(self.personal[cid]) if cid in self.personal else global_state

    def keep(self, cid: int, tensors: dict[str, torch.Tensor]) -> None:
        """Client `cid` keeps `tensors` for its next round (nothing when the strategy keeps nothing)."""
        if tensors:
            self.personal[cid] = tensors

    # -- a client's state lent from outside (a Flower node's own ledger, tensors and data) --------
    def adopt(
        self,
        cid: int,
        budget: ClientBudget | None,
        personal: dict[str, torch.Tensor],
        data: TokenizedData | None = None,
        optimizer: OptimizerState | None = None,
    ) -> None:
        """Take in client `cid` as its holder left it: its ledger (ignored when privacy is off),
        its kept tensors, optionally its own data instead of its bundled partition, and its kept
        optimizer state."""
        if self.budgets is not None:
            self.budgets[cid] = budget
        self.personal.pop(cid, None)
        self.keep(cid, personal)
        self.data[cid] = data if data is not None else self._bundled[cid]
        self.optimizer[cid] = dict(optimizer or {})

    def release(self, cid: int) -> tuple[ClientBudget | None, dict[str, torch.Tensor], OptimizerState]:
        """Give client `cid` back to its holder: its ledger, kept tensors and kept optimizer state as
        they are now. The store forgets its kept tensors, optimizer state and lent data."""
        self.data[cid] = self._bundled[cid]
        return self.budget(cid), self.personal.pop(cid, {}), self.optimizer.pop(cid, {})

    # -- checkpoints and evaluation -----------------------------------------------------------------
    def client_states(self) -> dict:
        return {
            "budgets": [b.to_dict() for b in self.budgets] if self.budgets is not None else None,
            "personal": self.personal,
            "optimizer": self.optimizer,
        }

    def load_client_states(self, states: dict) -> None:
        if states.get("budgets") is not None:
            self.budgets = [ClientBudget.from_dict(b) for b in states["budgets"]]
        self.personal = dict(states.get("personal") or {})
        self.optimizer = dict(states.get("optimizer") or {})

    def evaluate_personal(self, global_state: AdapterState, evaluate: Callable[[AdapterState], Scores]) -> list[Scores]:
        return [evaluate(global_state.with_tensors(t)) for _, t in sorted(self.personal.items())]


class InProcess:
    """The part of the executor contract every in-process executor shares: its `store`, and where
    its clients' randomness comes from (`secret`: drawn here from the OS, the loop's seeds unused)."""

    store: ClientStore
    secret: bool = False

    @property
    def noise(self) -> str:
        return "secret" if self.secret else "seeded"

    def seed(self, cid: int, seeds: dict[int, int]) -> Seed:
        """Client `cid`'s randomness for this round: the loop's seed, or a fresh secret key."""
        return SecretKey.draw() if self.secret else seeds[cid]

    @property
    def budgets(self) -> list[ClientBudget | None] | None:
        return self.store.budgets

    def evaluate_personal(
        self, global_state: AdapterState, plan: LocalTraining, evaluate: Callable[[AdapterState], Scores]
    ) -> list[Scores]:
        return self.store.evaluate_personal(global_state, evaluate)

    def client_states(self) -> dict:
        return self.store.client_states()

    def load_client_states(self, states: dict) -> None:
        self.store.load_client_states(states)
