"""FlexLoRA: the truncated SVD of the exact average, each client keeps its top r_k components.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024. The server forms the exact weighted average dW* = sum_k p_k B_k A_k and
redistributes its truncated SVD: B = U S, A = V^T (top r), so a client of rank r_k receives the
best rank-r_k approximation of dW*. Dense-free here: the SVD runs on the stacked factors (thin QR
+ a Kr x Kr SVD).

Heterogeneous ranks (shared with HetLoRA): a client of rank r_k holds the first r_k rows of A and
columns of B; the rest are zero and stay zero while it trains (their gradients vanish and any
noise on them is projected away), so factors travel zero-padded to r and every layer computes
W0 x + (alpha / r) B A x on every client.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.state import LORA_A, LORA_B, a_name, b_name

from .base import STRATEGIES, Strategy, average_head, weights
from .linalg import factored_svd, frob_norm_sq, stack_factors


@STRATEGIES.register("flexlora")
@dataclass(frozen=True)
class FlexLoRA(Strategy):
    name = "flexlora"
    trains = frozenset({LORA_A, LORA_B})
    sum_only = False

    def aggregate(self, state, updates, round_num, server_state):
        p = weights(updates)
        new = average_head(updates)
        kept = []
        for layer in state.layers:
            na, nb = a_name(layer), b_name(layer)
            u, v = stack_factors([x.tensors[nb] for x in updates], [x.tensors[na] for x in updates], p)
            left, s, right = factored_svd(u, v, state.rank)
            new[nb], new[na] = (left * s).float(), right.float()
            total = float(frob_norm_sq(u, v))
            kept.append(float((s**2).sum()) / total if total > 0 else 1.0)
        return state.with_tensors(new), dict(server_state), {"energy_kept": sum(kept) / len(kept)}
