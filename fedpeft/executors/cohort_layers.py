"""The cohort executor's layers: K clients' adapter tensors and heads applied per example, and the
grouping of a packed batch into buckets by length."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.families import FamilyLinear
from fedpeft.state import LORA_A, LORA_B, THETA

__all__ = ["CohortHead", "CohortLinear", "CohortLoRALinear", "CohortFamilyLinear", "length_buckets"]


def length_buckets(lengths: torch.Tensor, buckets: int | None, smallest: int = 16) -> list[torch.Tensor]:
    """Rows grouped by length (sorted, then cut into up to `buckets` equal groups, None: no limit,
    of at least `smallest`): each group is padded only to its own longest example, not the cohort's."""
    order = torch.argsort(lengths, stable=True)
    most = len(order) // smallest
    n = max(1, min(buckets, most) if buckets is not None else most)
    return [part for part in torch.tensor_split(order, n) if len(part)]


class CohortLinear(nn.Module):
    """A frozen linear layer plus K clients' adapter tensors, applied per example.

    `stacks[kind]` holds the clients' tensors of each kind the layer has ([K, ...]); before a
    forward the executor calls `expand(owner, trains)`, owner[i] being the client of example i of
    the packed batch: `leaves[kind]` [N, ...] are then per-example copies, leaves of the graph, so
    autograd returns each example's gradient."""

    kinds: tuple[str, ...] = ()

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.w0 = base.weight.detach().clone()
        self.stacks: dict[str, torch.Tensor] = {}
        self.leaves: dict[str, torch.Tensor] = {}

    def expand(self, owner: torch.Tensor, trains: frozenset[str] | set[str]) -> None:
        self.leaves = {k: self.stacks[k][owner].detach().requires_grad_(k in trains) for k in self.kinds}


class CohortLoRALinear(CohortLinear):
    """LoRA: `stacks[A]` [K, r, d_in] and `stacks[B]` [K, d_out, r]."""

    kinds = (LORA_A, LORA_B)

    def __init__(self, base: nn.Linear, scale: float, dropout: float = 0.0) -> None:
        super().__init__(base)
        self.scale = scale
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.leaves[LORA_A], self.leaves[LORA_B]
        h = torch.einsum("nld,nrd->nlr", F.dropout(x, self.dropout, self.training), a)
        return self.base(x) + torch.einsum("nlr,nor->nlo", h, b) * self.scale


class CohortFamilyLinear(CohortLinear):
    """A linear adapter family's layer (fedpeft.families) with `stacks[THETA]` [K, *theta's shape]."""

    kinds = (THETA,)

    def __init__(self, layer: FamilyLinear) -> None:
        super().__init__(layer.base_layer)
        self.layer = layer.requires_grad_(False)  # its frozen frames; its own theta is unused here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        x_in = F.dropout(x, layer.dropout, self.training)
        return self.base(x) + layer.scale * layer.batched(x_in, self.leaves[THETA])


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
