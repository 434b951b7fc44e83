"""HetLoRA: zero-padded factors averaged with norm weights; each client keeps its first r_k.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP
2024. Zero-padded factors are averaged with weights proportional to the Frobenius norm of each
client's update ||B_k A_k|| (sparsity-weighted aggregation); clients truncate to their rank (see
flexlora.py for how heterogeneous ranks travel). The paper's rank self-pruning is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpeft.state import LORA_A, LORA_B, a_name, b_name

from .base import STRATEGIES, Strategy, weights
from .linalg import frob_norm_sq


@STRATEGIES.register("hetlora")
@dataclass(frozen=True)
class HetLoRA(Strategy):
    name = "hetlora"
    trains = frozenset({LORA_A, LORA_B})
    sum_only = False

    def aggregate(self, state, updates, round_num, server_state):
        norms = torch.zeros(len(updates), dtype=torch.float64)
        for layer in state.layers:
            na, nb = a_name(layer), b_name(layer)
            for k, x in enumerate(updates):
                norms[k] += frob_norm_sq(x.tensors[nb].double(), x.tensors[na].double())
        norms = norms.sqrt()
        w = (norms / norms.sum()).tolist() if float(norms.sum()) > 0 else weights(updates)
        new = {
            n: sum(wk * x.tensors[n].double() for wk, x in zip(w, updates, strict=True)).float()
            for n in updates[0].tensors
        }
        return state.with_tensors(new), dict(server_state), {"weight_max": max(w)}
