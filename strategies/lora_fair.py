"""LoRA-FAIR: average A and B, then correct B on the server towards the ideal update.

Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025. The server finds
    dB = argmin  1 - cos(dW*, (B_avg + dB) A_avg) + lambda * ||dB||_F^2 / ||B_avg||_F^2,
    dW* = sum_k p_k B_k A_k,
and broadcasts A_avg and B_avg + dB; W0 never changes. It needs every client's factors (not
secure-aggregation compatible). The paper writes the regulariser as lambda * ||dB||^2; the cosine
is scale-free, so in absolute units lambda would mean nothing without the scale of B (at this
project's ||B|| ~ 0.01, lambda = 0.01 would act as 0; with B x 100 the correction would vanish).
Relative to ||B_avg||^2 the objective, and so dB / ||B_avg||, does not change when every B_k is
scaled (tested); lambda weighs the squared relative size of the correction against the cosine.

Choices where the paper leaves room (the official code was not available): the cosine is over
the flattened matrices; dB starts at zero; Adam runs `steps` steps on dB / rms(B_avg), so the
step size does not depend on the scale of B (the objective is unchanged); dW* stays factored, so
every cosine is computed from r x Kr products, never from a d_out x d_in matrix. Layers of the
same shape are optimised together; Adam is per-coordinate and the objective separable, so this is
the same as optimising each layer alone. solver = "ridge" is a deterministic variant (not the
paper's): a Frobenius loss instead of the cosine, with the closed form
    dB = (dW* - B_avg A_avg) A_avg^T (A_avg A_avg^T + lambda I)^-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpeft.state import LORA_A, LORA_B, a_name, b_name

from .base import STRATEGIES, Strategy, weighted_mean, weights
from .linalg import frob_inner, frob_norm_sq, stack_factors


def cosine(u, v, b, a):  # noqa: ANN001, ANN201
    """cos(U V, B A) over flattened matrices, batched; 0 where either is zero."""
    denom = torch.sqrt(frob_norm_sq(u, v) * frob_norm_sq(b, a))
    return torch.where(denom > 0, frob_inner(u, v, b, a) / denom.clamp_min(1e-300), torch.zeros_like(denom))


@STRATEGIES.register("lora-fair")
@dataclass(frozen=True)
class LoRAFAIR(Strategy):
    """Options: lam (lambda, the paper's ~0.01), steps and lr of Adam, solver ("cosine" | "ridge")."""

    lam: float = 0.01
    steps: int = 200
    lr: float = 0.01
    solver: str = "cosine"

    name = "lora-fair"
    trains = frozenset({LORA_A, LORA_B})
    sum_only = False

    def __post_init__(self) -> None:
        if self.lam < 0 or self.steps < 0 or self.lr <= 0:
            raise ValueError("lora-fair needs lam >= 0, steps >= 0 and lr > 0")
        if self.solver not in ("cosine", "ridge"):
            raise ValueError(f"lora-fair solver must be cosine or ridge (got {self.solver!r})")

    def aggregate(self, state, updates, round_num, server_state):
        averaged = {n: weighted_mean(updates, n) for n in updates[0].tensors}
        new = state.with_tensors(averaged)
        p = weights(updates)
        groups: dict[tuple, list[str]] = {}
        for layer in state.layers:
            groups.setdefault((tuple(state.A(layer).shape), tuple(state.B(layer).shape)), []).append(layer)
        corrected, before, after = {}, [], []
        for layers in groups.values():
            stacks = [
                stack_factors(
                    [x.tensors[b_name(layer)] for x in updates],
                    [x.tensors[a_name(layer)] for x in updates],
                    p,
                )
                for layer in layers
            ]
            u = torch.stack([s[0] for s in stacks])  # [L, d_out, Kr]
            v = torch.stack([s[1] for s in stacks])  # [L, Kr, d_in]
            b = torch.stack([new.B(layer).double() for layer in layers])
            a = torch.stack([new.A(layer).double() for layer in layers])
            db = self._ridge(u, v, b, a) if self.solver == "ridge" else self._cosine(u, v, b, a)
            before.append(cosine(u, v, b, a))
            after.append(cosine(u, v, b + db, a))
            for i, layer in enumerate(layers):
                corrected[b_name(layer)] = (b[i] + db[i]).float()
        new = new.with_tensors(corrected)
        metrics = {"cos_before": float(torch.cat(before).mean()), "cos_after": float(torch.cat(after).mean())}
        return new, dict(server_state), metrics

    def _cosine(self, u, v, b, a):  # noqa: ANN001, ANN202
        scale = b.pow(2).mean((-1, -2), keepdim=True).sqrt()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        b_sq = scale.pow(2).flatten() * b[0].numel()  # ||B_avg||^2 per layer (1 per entry where B_avg = 0)
        x = torch.zeros_like(b, requires_grad=True)
        optimizer = torch.optim.Adam([x], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                optimizer.zero_grad()
                db = scale * x
                loss = (1 - cosine(u, v, b + db, a) + self.lam * db.pow(2).sum((-1, -2)) / b_sq).sum()
                loss.backward()
                optimizer.step()
        return (scale * x).detach()

    def _ridge(self, u, v, b, a):  # noqa: ANN001, ANN202
        gram = a @ a.transpose(-1, -2)  # [L, r, r]
        rhs = u @ (v @ a.transpose(-1, -2)) - b @ gram  # (dW* - B A) A^T, from factors
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
        return torch.linalg.solve(gram + self.lam * eye, rhs.transpose(-1, -2)).transpose(-1, -2)
