"""What travels: the bytes of an upload and of a download, as the round log reports them.

LoRA factors travel at the receiving client's rank (HetLoRA's clients get a slice); strategies
that fold a change into the base weights (FedEx-LoRA, FLoRA) also send that change, factored, to
every client that missed it.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedpeft.state import LORA_A, LORA_B, AdapterState, ClientUpdate, kind_of

__all__ = ["base_change_bytes", "download_bytes", "tensor_bytes", "upload_bytes"]


def tensor_bytes(state: AdapterState, name: str, rank: int | None, full_rank: int) -> int:
    """Bytes of one tensor as it travels to or from a client of `rank`: LoRA factors at that rank."""
    fraction = rank / full_rank if rank is not None and kind_of(name) in (LORA_A, LORA_B) else 1.0
    return int(state.num_bytes([name]) * fraction)


def base_change_bytes(k: int, state: AdapterState) -> int:
    """Bytes of one aggregation's factored base-weight change of rank `k` (U [d_out, k] and
    V [k, d_in] per adapted layer, float32); 0 when k is 0."""
    return sum(k * (state.B(layer).shape[0] + state.A(layer).shape[1]) * 4 for layer in state.layers)


def upload_bytes(update: ClientUpdate, state: AdapterState, full_rank: int) -> int:
    """Bytes a client sent: every tensor of its update, at its rank."""
    return sum(tensor_bytes(state, name, update.rank, full_rank) for name in update.tensors)


def download_bytes(
    state: AdapterState, names: Iterable[str], rank: int | None, full_rank: int, missed: Iterable[float]
) -> int:
    """Bytes a sampled client received: `names` at its rank, plus the base-weight changes it `missed`."""
    return sum(tensor_bytes(state, name, rank, full_rank) for name in names) + int(sum(missed))
