"""In-process, one client after another on one shared model: the reference executor."""

from __future__ import annotations

from collections.abc import Callable

from fedpeft.adapters import AdaptedModel
from fedpeft.client import ClientRefused, LocalTraining, client_round
from fedpeft.data.base import TokenizedData
from fedpeft.executors.base import EXECUTORS, ClientFailure, ClientResult, ClientStore, InProcess
from fedpeft.privacy.accounting import ClientBudget
from fedpeft.state import AdapterState

__all__ = ["SequentialExecutor"]


class SequentialExecutor(InProcess):
    """Trains sampled clients one at a time, each from the global adapter, on the same model.

    What clients keep between rounds lives in its `store` (privacy ledgers, the tensors a strategy
    keeps on the client, each client's data and rank). Exceptions other than a budget refusal
    propagate: in-process they are bugs, not client failures.
    """

    def __init__(
        self,
        model: AdaptedModel,
        clients: list[TokenizedData],
        budgets: list[ClientBudget | None] | None,
        clip: float,
        ranks: list[int | None] | None = None,
        secret: bool = False,
    ) -> None:
        self.model = model
        self.store = ClientStore(clients, budgets, ranks)
        self.clip = clip
        self.secret = secret

    def run_round(
        self,
        round_num: int,
        client_ids: list[int],
        global_state: AdapterState,
        plan: LocalTraining,
        seeds: dict[int, int],
        on_client: Callable[[int], None] | None = None,
    ) -> list[ClientResult]:
        store = self.store
        results: list[ClientResult] = []
        for cid in client_ids:
            try:
                update = client_round(
                    self.model, store.start_state(cid, global_state), store.data[cid], plan,
                    client_id=cid, seed=self.seed(cid, seeds), budget=store.budget(cid), clip=self.clip,
                    rank=store.ranks[cid], secure=self.secret, round_num=round_num,
                    optimizer_state=store.optimizer_state(cid, plan.local_optimizer.keep_state),
                )  # fmt: skip
                if plan.keeps:
                    store.keep(cid, self.model.tensors(list(plan.keeps)))
                results.append(update)
            except ClientRefused as exc:
                results.append(ClientFailure(cid, str(exc), refused=True))
            if on_client is not None:
                on_client(cid)
        return results


@EXECUTORS.register("sequential")
def _sequential(spec, model, clients, num_labels, budgets):  # noqa: ANN001, ANN202
    from fedpeft.config import client_rank

    ranks = [client_rank(spec.model, cid) for cid in range(len(clients))]
    return SequentialExecutor(model, clients, budgets, spec.privacy.clip, ranks, secret=spec.privacy.noise == "secret")
