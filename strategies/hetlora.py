"""HetLoRA: zero-padded factors averaged with norm weights; each client keeps its first r_k.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP
2024. Zero-padded factors are averaged with weights proportional to the Frobenius norm of each
client's update ||B_k A_k|| (sparsity-weighted aggregation); the trained head, like every
strategy's, is averaged by examples. Clients truncate to their rank (see
flexlora.py for how heterogeneous ranks travel). The paper's rank self-pruning is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpeft.state import LORA_A, LORA_B, a_name, b_name, kind_of

from .base import STRATEGIES, Strategy, average_head, weights
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
        # the norm weights are the paper's for the LoRA factors; the head is averaged by examples,
        # as every strategy averages it (base.py)
        new = {
            n: sum(wk * x.tensors[n].double() for wk, x in zip(w, updates, strict=True)).float()
            for n in updates[0].tensors
            if kind_of(n) in (LORA_A, LORA_B)
        }
        new.update(average_head(updates))
        return state.with_tensors(new), dict(server_state), {"weight_max": max(w)}
