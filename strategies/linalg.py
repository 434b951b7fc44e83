"""Factored linear algebra for LoRA aggregation: nothing here forms a d_out x d_in product.

A sum of rank-r terms sum_k w_k B_k A_k is kept as one pair of stacked factors
U = [w_1 B_1, ..., w_K B_K] (d_out x Kr) and V = [A_1; ...; A_K] (Kr x d_in), so U V is the sum.
"""

from __future__ import annotations

import torch

__all__ = ["stack_factors", "factored_svd", "refactor", "frob_inner", "frob_norm_sq"]


def stack_factors(
    bs: list[torch.Tensor], as_: list[torch.Tensor], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U V = sum_k weights[k] * bs[k] @ as_[k], in float64."""
    u = torch.cat([w * b.double() for w, b in zip(weights, bs, strict=True)], dim=1)
    v = torch.cat([a.double() for a in as_], dim=0)
    return u, v


def factored_svd(u: torch.Tensor, v: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of the product U V from the factors: thin QR of U and V^T, then an SVD of
    the small k x k core. Returns (left d_out x rank, singular values, right^T rank x d_in);
    zero-padded when U V has fewer than `rank` components. O((d_out + d_in) k^2)."""
    q_u, r_u = torch.linalg.qr(u)
    q_v, r_v = torch.linalg.qr(v.T)
    w, s, zh = torch.linalg.svd(r_u @ r_v.T)
    k = min(rank, s.numel())
    left, right = q_u @ w[:, :k], (q_v @ zh[:k].T).T
    if k < rank:  # pad with zero components so every layer keeps the model's rank
        left = torch.cat([left, left.new_zeros(left.shape[0], rank - k)], dim=1)
        right = torch.cat([right, right.new_zeros(rank - k, right.shape[1])], dim=0)
        s = torch.cat([s[:k], s.new_zeros(rank - k)])
    return left, s[:rank], right


def refactor(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_new, A_new) with B_new A_new = B A, orthonormal rows in A_new, B_new = U S (FedSVD).

    Computed in float64, returned in B's dtype."""
    left, s, right = factored_svd(b.double(), a.double(), b.shape[1])
    return (left * s).to(b.dtype), right.to(a.dtype)


def frob_inner(u1: torch.Tensor, v1: torch.Tensor, u2: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """<U1 V1, U2 V2>_F = sum((U1^T U2) * (V1 V2^T)), batched over leading dims."""
    return ((u1.transpose(-1, -2) @ u2) * (v1 @ v2.transpose(-1, -2))).sum((-1, -2))


def frob_norm_sq(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """||U V||_F^2 from the factors."""
    return frob_inner(u, v, u, v)
