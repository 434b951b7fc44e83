"""Opacus's DP-SGD optimizer with the node's own noise source and non-finite gradients made harmless.

`NodeDPOptimizer` is Opacus's DPOptimizer with two changes, both inside the step:

- the Gaussian noise comes from a `fedpeft.privacy.randomness.Source`: a ChaCha20 keystream under
  the node's secret key, or (seeded runs) the same torch generator Opacus would use, draw for draw;
- an example whose per-example gradient has a NaN or an infinity contributes zero instead. Without
  this one overflowing example turns the clipped sum, and so the whole update, into NaN: a visible,
  non-DP signal about one example. Zero is a function of that example alone, with norm 0 <= C, so
  the sensitivity of the clipped sum is unchanged.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from fedpeft.privacy.randomness import Source

__all__ = ["NodeDPOptimizer", "zero_non_finite"]


def zero_non_finite(grad_samples: list[torch.Tensor]) -> int:
    """Zero, in place, every example's rows in all `grad_samples` (each [batch, ...]) where any of
    them is not finite; return how many examples that was."""
    if not grad_samples or len(grad_samples[0]) == 0:
        return 0
    bad = torch.zeros(len(grad_samples[0]), dtype=torch.bool, device=grad_samples[0].device)
    for g in grad_samples:
        bad |= ~torch.isfinite(g.reshape(len(g), -1)).all(dim=1).to(bad.device)
    if bad.any():
        for g in grad_samples:
            g[bad.to(g.device)] = 0
    return int(bad.sum())


class NodeDPOptimizer(DPOptimizer):
    """DPOptimizer drawing its noise from `source`, and zeroing non-finite per-example gradients."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, source: Source, **kwargs) -> None:  # noqa: ANN003
        super().__init__(optimizer, **kwargs)
        self.source = source

    def clip_and_accumulate(self) -> None:
        for p in self.params:
            if isinstance(p.grad_sample, list):  # several backward passes: one tensor to clean
                p.grad_sample = torch.cat(p.grad_sample, dim=0)
        zero_non_finite([p.grad_sample for p in self.params])
        super().clip_and_accumulate()

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            if std == 0:  # as Opacus: no draw at all
                noise = torch.zeros_like(p.summed_grad)
            else:
                noise = self.source.normal(std, p.summed_grad.shape, self.secure_mode, p.summed_grad.device)
            p.grad = (p.summed_grad + noise.to(p.summed_grad.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)
