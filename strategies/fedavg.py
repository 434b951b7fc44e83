"""FedAvg on LoRA (FedIT): clients train A and B; the server averages each factor separately.
For a linear adapter family (fedpeft.families) it averages theta, which is exact.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (FedIT),
ICASSP 2024. Averaging the factors is not averaging the products: B_avg A_avg != sum_k p_k B_k A_k.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.state import LORA_A, LORA_B, THETA

from .base import STRATEGIES, RobustCombine, Strategy


@STRATEGIES.register("fedavg")
@dataclass(frozen=True)
class FedAvg(RobustCombine, Strategy):
    """Options: robust (mean | median | trimmed-mean | centered-clip, see base.combine) and trim."""

    name = "fedavg"
    trains = frozenset({LORA_A, LORA_B, THETA})
    combines_uploads = True

    def aggregate(self, state, updates, round_num, server_state):
        names = list(updates[0].tensors)
        new = state.with_tensors({n: self.combine(updates, n) for n in names})
        return new, dict(server_state), {}
