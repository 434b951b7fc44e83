"""FedSVD: clients train only B over a shared A; the server averages B and re-factors B_avg A.

Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA",
NeurIPS 2025. With A shared, B_avg A = sum_k p_k B_k A exactly; the re-factorisation
B_new A_new = B_avg A (A_new with orthonormal rows, all singular values in B_new) changes the
basis of the next round's B, never the model function. It runs on the factors: thin QR of B_avg
and A^T, then an r x r SVD, O((d_out + d_in) r^2), never forming the d_out x d_in product.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.state import LORA_B, a_name, b_name

from .base import STRATEGIES, RobustCombine, Strategy
from .linalg import refactor


@STRATEGIES.register("fedsvd")
@dataclass(frozen=True)
class FedSVD(RobustCombine, Strategy):
    """Options: refactor_period (re-factor every n rounds; the paper finds 1, 2, 5, 10 all work),
    min_norm (skip the re-factor of a layer whose ||B_avg|| is below it: no signal to orient),
    robust (mean | median | trimmed-mean | centered-clip: how the B's are combined, see base.combine) and trim."""

    refactor_period: int = 1
    min_norm: float = 1e-8

    name = "fedsvd"
    trains = frozenset({LORA_B})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.refactor_period < 1:
            raise ValueError(f"fedsvd refactor_period must be >= 1 (got {self.refactor_period})")

    def aggregate(self, state, updates, round_num, server_state):
        averaged = {n: self.combine(updates, n) for n in updates[0].tensors}
        new = state.with_tensors(averaged)
        refactored = skipped = 0
        if round_num % self.refactor_period == 0:
            factors = {}
            for layer in new.layers:
                b_avg, a_prev = new.B(layer), new.A(layer)
                if float(b_avg.norm()) < self.min_norm:
                    skipped += 1
                    continue
                b_new, a_new = refactor(b_avg, a_prev)
                factors[b_name(layer)] = b_new
                factors[a_name(layer)] = a_new
                refactored += 1
            new = new.with_tensors(factors)
        return new, dict(server_state), {"refactored_layers": refactored, "skipped_layers": skipped}
