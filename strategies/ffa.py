"""FFA-LoRA: A frozen at its shared seeded initialisation; clients train B; the server averages B.

Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024. With A
shared and frozen, B_avg A = sum_k p_k B_k A exactly, and DP noise has no cross-term
(B + xB)(A + xA). Its A is never re-oriented; FedSVD adds that.

Option init_a = "orthonormal" is an ablation for comparing with FedSVD: the shared A keeps its
row space but gets orthonormal rows (singular values 1, as FedSVD's A has after its first
re-factor, instead of kaiming-uniform's ~1/sqrt(3)). At one learning rate a step on B then moves
B A as far as FedSVD's does (about 3x FFA's default), so the comparison can tell the re-orientation
from the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpeft.state import LORA_B, a_name

from .base import STRATEGIES, RobustCombine, Strategy


@STRATEGIES.register("ffa")
@dataclass(frozen=True)
class FFALoRA(RobustCombine, Strategy):
    """Options: init_a (kaiming | orthonormal), robust (mean | median | trimmed-mean | centered-clip, see
    base.combine) and trim."""

    init_a: str = "kaiming"

    name = "ffa"
    trains = frozenset({LORA_B})
    combines_uploads = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_a not in ("kaiming", "orthonormal"):
            raise ValueError(f"ffa init_a must be kaiming or orthonormal (got {self.init_a!r})")

    def init(self, state, seed):
        state, server_state = super().init(state, seed)
        if self.init_a == "orthonormal":  # rows of A -> an orthonormal basis of the same row space
            a = {a_name(layer): orthonormal_rows(state.A(layer)) for layer in state.layers}
            state = state.with_tensors(a)
        return state, server_state

    def aggregate(self, state, updates, round_num, server_state):
        new = state.with_tensors({n: self.combine(updates, n) for n in updates[0].tensors})
        return new, dict(server_state), {}


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """Q^T from the thin QR of A^T: orthonormal rows spanning A's row space (signs follow A)."""
    q, r = torch.linalg.qr(a.double().T)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return (q * signs).T.float()
