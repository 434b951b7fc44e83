"""FFA-LoRA: A frozen at its shared seeded initialisation; clients train B; the server averages B.

Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024. With A
shared and frozen, B_avg A = sum_k p_k B_k A exactly, and DP noise has no cross-term
(B + xB)(A + xA). Its A is never re-oriented; FedSVD adds that.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.state import LORA_B

from .base import STRATEGIES, Strategy, check_robust, combine


@STRATEGIES.register("ffa")
@dataclass(frozen=True)
class FFALoRA(Strategy):
    """Options: robust (mean | median | trimmed-mean, see base.combine) and trim."""

    robust: str = "mean"
    trim: float = 0.2

    name = "ffa"
    trains = frozenset({LORA_B})

    def __post_init__(self) -> None:
        check_robust(self.robust, self.trim)

    @property
    def sum_only(self) -> bool:
        return self.robust == "mean"

    def aggregate(self, state, updates, round_num, server_state):
        new = state.with_tensors({n: combine(updates, n, self.robust, self.trim) for n in updates[0].tensors})
        return new, dict(server_state), {}
