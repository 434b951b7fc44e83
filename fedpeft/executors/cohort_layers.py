"""The cohort executor's layers: K clients' LoRA factors and heads applied per example, and the
grouping of a packed batch into buckets by length."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CohortHead", "CohortLoRALinear", "length_buckets"]


def length_buckets(lengths: torch.Tensor, buckets: int | None, smallest: int = 16) -> list[torch.Tensor]:
    """Rows grouped by length (sorted, then cut into up to `buckets` equal groups, None: no limit,
    of at least `smallest`): each group is padded only to its own longest example, not the cohort's."""
    order = torch.argsort(lengths, stable=True)
    most = len(order) // smallest
    n = max(1, min(buckets, most) if buckets is not None else most)
    return [part for part in torch.tensor_split(order, n) if len(part)]


class CohortLoRALinear(nn.Module):
    """A frozen linear layer plus K clients' LoRA factors, applied per example.

    `a` [K, r, d_in] and `b` [K, d_out, r] are the clients' factors; before a forward the executor
    calls `expand(owner)`, owner[i] being the client of example i of the packed batch.
    """

    def __init__(self, base: nn.Linear, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.w0 = base.weight.detach().clone()
        self.scale = scale
        self.dropout = dropout
        self.a: torch.Tensor | None = None  # [K, r, d_in]
        self.b: torch.Tensor | None = None  # [K, d_out, r]
        self.a_e: torch.Tensor | None = None  # per-example copies, leaves of the graph: [N, r, d_in]
        self.b_e: torch.Tensor | None = None

    def expand(self, owner: torch.Tensor, train_a: bool, train_b: bool) -> None:
        """Per-example copies of the factors: example i uses client owner[i]'s A and B."""
        self.a_e = self.a[owner].detach().requires_grad_(train_a)  # [N, r, d_in]
        self.b_e = self.b[owner].detach().requires_grad_(train_b)  # [N, d_out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("nld,nrd->nlr", F.dropout(x, self.dropout, self.training), self.a_e)
        return self.base(x) + torch.einsum("nlr,nor->nlo", h, self.b_e) * self.scale


class CohortHead(nn.Module):
    """K clients' linear heads, applied per example (same packing as CohortLoRALinear)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight: torch.Tensor | None = None  # [K, labels, hidden]
        self.bias: torch.Tensor | None = None  # [K, labels]
        self.w_e: torch.Tensor | None = None
        self.b_e: torch.Tensor | None = None

    def expand(self, owner: torch.Tensor, train: bool) -> None:
        self.w_e = self.weight[owner].detach().requires_grad_(train)  # [N, labels, hidden]
        self.b_e = self.bias[owner].detach().requires_grad_(train)  # [N, labels]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nh,noh->no", pooled, self.w_e) + self.b_e
