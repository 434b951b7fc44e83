"""FLoRA: stack the clients' LoRA factors, merge the exact sum into the base, start a fresh LoRA.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024. Stacking [p_1 B_1 .. p_K B_K] [A_1; ..; A_K] is sum_k p_k B_k A_k
exactly (and allows heterogeneous ranks); it is merged, scaled by s = alpha / r, into every
client's W0, and each round starts from a new LoRA (A fresh from PEFT's initialisation, seeded by
round; B = 0). The merged delta travels factored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpeft.state import LORA_A, LORA_B, a_name, b_name, base_name

from .base import STRATEGIES, Strategy, average_head, kaiming_a, weights
from .fedex import add_base_deltas
from .linalg import stack_factors


@STRATEGIES.register("flora")
@dataclass(frozen=True)
class FLoRA(Strategy):
    name = "flora"
    trains = frozenset({LORA_A, LORA_B})
    sum_only = False

    def init(self, state, seed):
        return add_base_deltas(state), {"seed": seed}

    def base_change_rank(self, num_updates, rank):
        return num_updates * rank  # [p_1 B_1 .. p_K B_K]

    def aggregate(self, state, updates, round_num, server_state):
        p = weights(updates)
        generator = torch.Generator().manual_seed(int(server_state["seed"]) * 1_000_003 + round_num)
        new_tensors = average_head(updates)
        for layer in state.layers:
            na, nb = a_name(layer), b_name(layer)
            u, v = stack_factors([x.tensors[nb] for x in updates], [x.tensors[na] for x in updates], p)
            new_tensors[base_name(layer)] = (state.tensors[base_name(layer)].double() + state.scale * (u @ v)).float()
            new_tensors[na] = kaiming_a(tuple(state.A(layer).shape), generator)
            new_tensors[nb] = torch.zeros_like(state.B(layer))
        return state.with_tensors(new_tensors), dict(server_state), {}
