"""The executor contract: train these clients from this global adapter, return what came back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Union

import torch

from fedpeft.client import LocalTraining
from fedpeft.privacy.accounting import ClientBudget
from fedpeft.state import AdapterState, ClientUpdate


@dataclass(frozen=True)
class ClientFailure:
    """A sampled client that sent no update: it refused (privacy budget) or failed."""

    client_id: int
    reason: str
    refused: bool = False


ClientResult = Union[ClientUpdate, ClientFailure]


class Executor(Protocol):
    def run_round(
        self,
        round_num: int,
        client_ids: list[int],
        global_state: AdapterState,
        plan: LocalTraining,
        seeds: dict[int, int],
        on_client: Callable[[int], None] | None = None,
    ) -> list[ClientResult]:
        """Train each client in `client_ids` (seeded by `seeds[cid]`) and return their results."""

    def client_states(self) -> dict:
        """Per-client state that must survive rounds (privacy ledgers), for checkpoints."""

    def load_client_states(self, states: dict) -> None:
        """Restore what `client_states` returned."""

    def personal_states(self) -> dict:
        """client id -> tensors it keeps locally (strategies with personal parts); may be empty."""


class ClientStateStore:
    """What in-process executors keep for their clients between rounds: privacy ledgers and the
    tensors a strategy keeps on the client (FedSA's B). Checkpointed through client_states()."""

    budgets: list[ClientBudget] | None
    personal: dict[int, dict[str, torch.Tensor]]

    def start_state(self, cid: int, global_state: AdapterState) -> AdapterState:
        """Where client `cid` starts: the global adapter with its own kept tensors in place."""
        return global_state.with_tensors(self.personal[cid]) if cid in self.personal else global_state

    def personal_states(self) -> dict[int, dict[str, torch.Tensor]]:
        return self.personal

    def client_states(self) -> dict:
        return {
            "budgets": [b.to_dict() for b in self.budgets] if self.budgets is not None else None,
            "personal": self.personal,
        }

    def load_client_states(self, states: dict) -> None:
        if states.get("budgets") is not None:
            self.budgets = [ClientBudget.from_dict(b) for b in states["budgets"]]
        self.personal = dict(states.get("personal") or {})
