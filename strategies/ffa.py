"""FFA-LoRA: A frozen at its shared seeded initialisation; clients train B; the server averages B.

Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024. With A
shared and frozen, B_avg A = sum_k p_k B_k A exactly, and DP noise has no cross-term
(B + xB)(A + xA). Its A is never re-oriented; FedSVD adds that.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.state import LORA_B

from .base import STRATEGIES, RobustCombine, Strategy


@STRATEGIES.register("ffa")
@dataclass(frozen=True)
class FFALoRA(RobustCombine, Strategy):
    """Options: robust (mean | median | trimmed-mean, see base.combine) and trim."""

    name = "ffa"
    trains = frozenset({LORA_B})

    def aggregate(self, state, updates, round_num, server_state):
        new = state.with_tensors({n: self.combine(updates, n) for n in updates[0].tensors})
        return new, dict(server_state), {}
