"""What a finished run reports (summary.json), and the server's own privacy accounting.

The summary's epsilon is the server's: from each client's public sigma and sampling rate (the spec
and the client's public size) and the DP-SGD steps of every update that reached the server, never
from what a node says. A node's reported epsilon is kept beside it; a disagreement is logged.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from fedpeft.build import public_size
from fedpeft.privacy.accounting import epsilon, sample_rate
from fedpeft.privacy.client_level import randomness
from fedpeft.state import kind_of

if TYPE_CHECKING:
    from fedpeft.federation import Federation

__all__ = ["nan_mean", "run_summary", "server_epsilons"]

log = logging.getLogger("fedpeft")


def server_epsilons(fed: Federation, steps: dict[int, int]) -> dict[int, float] | None:
    """Each client's epsilon for this run by the server's accounting (None when DP-SGD is off): its
    sigma and q from the spec and its public size, composed over `steps`, the steps of every update
    of it that reached the server (an honest node spends exactly these; it reports the same)."""
    if fed.sigmas is None:
        return None
    priv, batch = fed.spec.privacy, fed.plan.batch_size
    sizes = {cid: public_size(fed.spec, cid, len(fed.data.clients[cid])) for cid in steps}
    return {
        cid: epsilon(((fed.sigmas[cid], sample_rate(batch, sizes[cid]), n),), priv.delta, priv.accountant)
        for cid, n in sorted(steps.items())
    }


def run_summary(
    fed: Federation, history: list[dict[str, Any]], steps: dict[int, int], reported: dict[int, float], elapsed: float
) -> dict[str, Any]:
    """summary.json's contents (a causal LM's scores and generations are added by the caller)."""
    spec = fed.spec
    epsilons = server_epsilons(fed, steps) or {}
    for cid, eps in sorted(reported.items()):
        if cid in epsilons and not math.isclose(eps, epsilons[cid], rel_tol=1e-6):
            log.warning("client %d reported epsilon %.6g; the server's accounting gives %.6g (reported)", cid, eps,
                        epsilons[cid])  # fmt: skip
    last = history[-1]
    whole = [r for r in history if r["accuracy"] is not None and r.get("scored_on", "whole") == "whole"]
    return {
        "name": spec.name,
        "strategy": spec.strategy.name,
        "adapter": spec.model.adapter,
        # per client: every tensor of the kinds it trains (the head too, when the spec trains it)
        "trained_parameters": sum(
            t.numel() for n, t in fed.model.state().tensors.items() if kind_of(n) in fed.plan.trains
        ),
        "rounds": len(history),
        "accuracy": last["accuracy"],
        "loss": last["loss"],
        # a classifier's macro-F1 and Matthews correlation on the test split after the last round
        "f1_macro": last.get("f1_macro"),
        "mcc": last.get("mcc"),
        # over the rounds scored on the whole test split (subset scores are not comparable)
        "best_accuracy": max(r["accuracy"] for r in whole),
        # the mean of the last three: less of one round's luck than the final
        "accuracy_last3": nan_mean([r["accuracy"] for r in whole[-3:]]),
        "accuracy_last3_rounds": [r["round"] for r in whole[-3:]],
        "adapter_change": last.get("adapter_change"),
        "majority_rate": fed.data.majority_rate,
        "epsilon": (max(epsilons.values()) if epsilons else 0.0) if spec.privacy.enabled else None,
        "epsilon_per_client": {str(k): v for k, v in sorted(epsilons.items())} if spec.privacy.enabled else None,
        "epsilon_reported_per_client": {str(k): v for k, v in sorted(reported.items())}
        if spec.privacy.enabled
        else None,
        "target_epsilon": spec.privacy.epsilon if spec.privacy.enabled else None,
        # client-level DP-FedAvg: epsilon of the whole run for any one client's data, and its z
        "client_epsilon": last.get("client_epsilon"),
        "client_target_epsilon": spec.privacy.client_epsilon if fed.client_dp is not None else None,
        "client_noise_multiplier": fed.client_dp.noise_multiplier if fed.client_dp is not None else None,
        "delta": spec.privacy.delta if spec.privacy.enabled else None,
        "sigma_per_client": fed.sigmas,
        "noise": fed.executor.noise if spec.privacy.enabled else None,  # the clients' batches and DP noise
        # per mechanism: "seeded" (reproducible from the spec, the simulator's guarantee) or "secret" (never sent)
        "randomness": randomness(fed.executor.noise if spec.privacy.enabled else None, fed.client_dp, spec),
        "seed": spec.federation.seed,
        "clients": [len(c) for c in fed.data.clients],
        "test_examples": len(fed.data.test),
        "bytes_up": sum(r["bytes_up"] for r in history),
        "bytes_down": sum(r["bytes_down"] for r in history),
        "seconds": elapsed,
        "spec": spec.to_dict(),
    }


def nan_mean(values: list[float]) -> float | None:
    """The mean of the values that are not NaN (None when none is)."""
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else None
