"""The executor contract: train these clients from this global adapter, return what came back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Union

from fedpeft.client import LocalTraining
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
