"""FedEx-LoRA: average A and B, and fold the residual of that average into the frozen base weights.

Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", ACL 2025. B_avg A_avg != sum_k p_k B_k A_k; the residual
R = sum_k p_k B_k A_k - B_avg A_avg (rank <= (K+1) r) is added, scaled by s = alpha / r, to every
client's W0, so the global model's effective weight W0 + s B_avg A_avg + s R is exactly the
weighted average of the clients' effective weights. R travels factored; the base weights become
state, and a client that skipped rounds receives the residuals it missed. W0 is d_out x d_in
(nn.Linear layout): no transpose (the public code's transpose is wrong for non-square layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpeft.state import LORA_A, LORA_B, a_name, b_name, base_name

from .base import STRATEGIES, Strategy, weighted_mean, weights
from .linalg import stack_factors


def add_base_deltas(state):
    """The state with a zero base-weight change for every adapted layer (if not there yet)."""
    zeros = {}
    for layer in state.layers:
        if base_name(layer) not in state.tensors:
            zeros[base_name(layer)] = torch.zeros(state.B(layer).shape[0], state.A(layer).shape[1])
    return state.with_tensors(zeros, new=True)


@STRATEGIES.register("fedex")
@dataclass(frozen=True)
class FedExLoRA(Strategy):
    name = "fedex"
    trains = frozenset({LORA_A, LORA_B})
    sum_only = False

    def init(self, state, seed):
        return add_base_deltas(state), {"seed": seed}

    def base_change_rank(self, num_updates, rank):
        return (num_updates + 1) * rank  # [p_1 B_1 .. p_K B_K, -B_avg]

    def aggregate(self, state, updates, round_num, server_state):
        averaged = {n: weighted_mean(updates, n) for n in updates[0].tensors}
        new = state.with_tensors(averaged)
        p = weights(updates)
        deltas = {}
        for layer in state.layers:
            na, nb = a_name(layer), b_name(layer)
            # R = [p_1 B_1 .. p_K B_K, -B_avg] [A_1; ..; A_K; A_avg], then scaled into W0
            u, v = stack_factors(
                [u_.tensors[nb] for u_ in updates] + [new.tensors[nb]],
                [u_.tensors[na] for u_ in updates] + [new.tensors[na]],
                p + [-1.0],
            )
            deltas[base_name(layer)] = (state.tensors[base_name(layer)].double() + state.scale * (u @ v)).float()
        new = new.with_tensors(deltas)
        return new, dict(server_state), {}
