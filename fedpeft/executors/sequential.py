"""In-process, one client after another on one shared model: the reference executor."""

from __future__ import annotations

from collections.abc import Callable

from fedpeft.adapters import AdaptedModel
from fedpeft.client import ClientRefused, LocalTraining, client_round
from fedpeft.data.base import TokenizedData
from fedpeft.executors.base import ClientFailure, ClientResult
from fedpeft.privacy.accounting import ClientBudget
from fedpeft.state import AdapterState


class SequentialExecutor:
    """Trains sampled clients one at a time, each from the global adapter, on the same model.

    Clients' privacy ledgers live here (they are client state). Exceptions other than a budget
    refusal propagate: in-process they are bugs, not client failures.
    """

    def __init__(
        self,
        model: AdaptedModel,
        clients: list[TokenizedData],
        budgets: list[ClientBudget] | None,
        clip: float,
    ) -> None:
        self.model = model
        self.clients = clients
        self.budgets = budgets
        self.clip = clip

    def run_round(
        self,
        round_num: int,
        client_ids: list[int],
        global_state: AdapterState,
        plan: LocalTraining,
        seeds: dict[int, int],
        on_client: Callable[[int], None] | None = None,
    ) -> list[ClientResult]:
        results: list[ClientResult] = []
        for cid in client_ids:
            budget = self.budgets[cid] if self.budgets is not None else None
            try:
                results.append(
                    client_round(
                        self.model,
                        global_state,
                        self.clients[cid],
                        plan,
                        client_id=cid,
                        seed=seeds[cid],
                        budget=budget,
                        clip=self.clip,
                    )
                )
            except ClientRefused as exc:
                results.append(ClientFailure(cid, str(exc), refused=True))
            if on_client is not None:
                on_client(cid)
        return results

    def client_states(self) -> dict:
        return {"budgets": [b.to_dict() for b in self.budgets] if self.budgets is not None else None}

    def load_client_states(self, states: dict) -> None:
        if states.get("budgets") is not None:
            self.budgets = [ClientBudget.from_dict(b) for b in states["budgets"]]
