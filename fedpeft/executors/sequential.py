"""In-process, one client after another on one shared model: the reference executor."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedpeft.adapters import AdaptedModel
from fedpeft.client import ClientRefused, LocalTraining, client_round
from fedpeft.data.base import TokenizedData
from fedpeft.executors.base import ClientFailure, ClientResult, ClientStateStore
from fedpeft.privacy.accounting import ClientBudget
from fedpeft.state import AdapterState


class SequentialExecutor(ClientStateStore):
    """Trains sampled clients one at a time, each from the global adapter, on the same model.

    What clients keep between rounds lives here: privacy ledgers, the tensors a strategy keeps
    on the client (FedSA's B), and each client's rank. Exceptions other than a budget refusal
    propagate: in-process they are bugs, not client failures.
    """

    def __init__(
        self,
        model: AdaptedModel,
        clients: list[TokenizedData],
        budgets: list[ClientBudget] | None,
        clip: float,
        ranks: list[int | None] | None = None,
    ) -> None:
        self.model = model
        self.clients = clients
        self.budgets = budgets
        self.clip = clip
        self.ranks = ranks or [None] * len(clients)
        self.personal: dict[int, dict[str, torch.Tensor]] = {}

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
                update = client_round(
                    self.model, self.start_state(cid, global_state), self.clients[cid], plan,
                    client_id=cid, seed=seeds[cid], budget=budget, clip=self.clip, rank=self.ranks[cid],
                )  # fmt: skip
                if plan.keeps:
                    self.personal[cid] = self.model.tensors(list(plan.keeps))
                results.append(update)
            except ClientRefused as exc:
                results.append(ClientFailure(cid, str(exc), refused=True))
            if on_client is not None:
                on_client(cid)
        return results
