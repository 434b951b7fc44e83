"""Heterogeneous ranks: each client trains a LoRA of its own rank r_k <= r (the model's rank).

A client of rank r_k holds the first r_k rows of A and columns of B; the rest are zero and stay
zero while it trains (their gradients vanish and any noise on them is projected away), so factors
travel zero-padded to r and every layer computes W0 x + (alpha / r) B A x on every client. After
aggregation each client keeps the first r_k components of the global factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpeft.state import LORA_A, LORA_B
from strategies.base import STRATEGIES, Strategy, average_head, weights
from strategies.linalg import factored_svd, frob_norm_sq, stack_factors


@STRATEGIES.register("flexlora")
@dataclass(frozen=True)
class FlexLoRA(Strategy):
    """FlexLoRA: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous
    Tasks and Client Resources", NeurIPS 2024. The server forms the exact weighted average
    dW* = sum_k p_k B_k A_k and redistributes its truncated SVD: B = U S, A = V^T (top r), so a
    client of rank r_k receives the best rank-r_k approximation of dW*. Dense-free here: the SVD
    runs on the stacked factors (thin QR + a Kr x Kr SVD)."""

    name = "flexlora"
    trains = frozenset({LORA_A, LORA_B})
    sum_only = False

    def aggregate(self, state, updates, round_num, server_state):
        p = weights(updates)
        new = average_head(updates)
        kept = []
        for layer in state.layers:
            a_name, b_name = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
            u, v = stack_factors([x.tensors[b_name] for x in updates], [x.tensors[a_name] for x in updates], p)
            left, s, right = factored_svd(u, v, state.rank)
            new[b_name], new[a_name] = (left * s).float(), right.float()
            total = float(frob_norm_sq(u, v))
            kept.append(float((s**2).sum()) / total if total > 0 else 1.0)
        return state.with_tensors(new), dict(server_state), {"energy_kept": sum(kept) / len(kept)}


@STRATEGIES.register("hetlora")
@dataclass(frozen=True)
class HetLoRA(Strategy):
    """HetLoRA: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
    Models", EMNLP 2024. Zero-padded factors are averaged with weights proportional to the
    Frobenius norm of each client's update ||B_k A_k|| (sparsity-weighted aggregation); clients
    truncate to their rank. The paper's rank self-pruning is not implemented."""

    name = "hetlora"
    trains = frozenset({LORA_A, LORA_B})
    sum_only = False

    def aggregate(self, state, updates, round_num, server_state):
        norms = torch.zeros(len(updates), dtype=torch.float64)
        for layer in state.layers:
            a_name, b_name = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
            for k, x in enumerate(updates):
                norms[k] += frob_norm_sq(x.tensors[b_name].double(), x.tensors[a_name].double())
        norms = norms.sqrt()
        w = (norms / norms.sum()).tolist() if float(norms.sum()) > 0 else weights(updates)
        new = {
            n: sum(wk * x.tensors[n].double() for wk, x in zip(w, updates, strict=True)).float()
            for n in updates[0].tensors
        }
        return state.with_tensors(new), dict(server_state), {"weight_max": max(w)}
