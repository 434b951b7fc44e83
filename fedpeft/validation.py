"""What the server checks before an update may be aggregated."""

from __future__ import annotations

import torch

from fedpeft.state import AdapterState, ClientUpdate

__all__ = ["validate_update"]


def validate_update(update: ClientUpdate, expected: list[str], reference: AdapterState) -> str | None:
    """Why `update` must not be aggregated, or None if it is sound."""
    if set(update.tensors) != set(expected):
        missing, extra = set(expected) - set(update.tensors), set(update.tensors) - set(expected)
        return f"wrong tensors (missing {sorted(missing)[:2]}, unexpected {sorted(extra)[:2]})"
    if not (isinstance(update.num_examples, int) and update.num_examples > 0):
        return f"num_examples must be a positive integer (got {update.num_examples!r})"
    for name in expected:
        tensor, ref = update.tensors[name], reference.tensors[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != ref.shape:
            shape = getattr(tensor, "shape", type(tensor).__name__)
            return f"{name}: shape {tuple(shape)} != expected {tuple(ref.shape)}"
        if tensor.dtype != ref.dtype:
            return f"{name}: dtype {tensor.dtype} != expected {ref.dtype}"
        if not torch.isfinite(tensor).all():
            return f"{name}: non-finite values (NaN or inf)"
    return None
