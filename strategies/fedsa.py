"""FedSA-LoRA: only A is shared; each client keeps its own B across rounds.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025.
The paper finds A learns general knowledge and B client-specific knowledge: the server averages
the A matrices only, and every client's B stays on the client (personalised models). The global
adapter's B is the shared initial B (zero): evaluation is of the personalised models.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.state import LORA_A, LORA_B

from .base import STRATEGIES, Strategy, weighted_mean


@STRATEGIES.register("fedsa")
@dataclass(frozen=True)
class FedSALoRA(Strategy):
    name = "fedsa"
    trains = frozenset({LORA_A, LORA_B})
    personal = frozenset({LORA_B})
    sum_only = True
    combines_uploads = True

    def aggregate(self, state, updates, round_num, server_state):
        new = state.with_tensors({n: weighted_mean(updates, n) for n in updates[0].tensors})
        return new, dict(server_state), {}
