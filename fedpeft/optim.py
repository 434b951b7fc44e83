"""Local optimizers and their learning-rate schedules: what turns a client's gradient into a step.

`train.optimizer` is sgd | momentum | adam | adamw (torch's own update rules, with `train.momentum`,
`train.betas`, `train.weight_decay`), and `train.schedule` (constant | linear | cosine, after
`train.warmup` linear warm-up steps) sets each step's learning rate, over one round's local steps or
over the whole run (`train.schedule_over`). Under DP-SGD the optimizer only ever sees Opacus's
clipped, noised mean gradient (DPOptimizer clips and noises, then calls it): any function of a DP
output is DP with the same epsilon, so the choice of optimizer costs no privacy (docs/privacy.md).

Optimizer state (momentum, Adam's moments) starts fresh every round by default: stateless clients,
as in the papers. `train.optimizer_state = keep` keeps it on the client between its rounds; it is
the node's and never sent.

The reference path (fedpeft.client) runs torch.optim's optimizers; the cohort executor runs
`StackedOptimizer`, the same update rules on [K, ...] stacks of K clients' tensors, each client with
its own step count. tests/test_optim.py checks one against the other, and both against a hand loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedpeft.config import OPTIMIZERS, SCHEDULES, TrainConfig

__all__ = ["LocalOptimizer", "OptimizerState", "StackedOptimizer", "load_torch_state", "torch_state"]

# per tensor name, torch's per-parameter state ({"momentum_buffer"} or {"step", "exp_avg", "exp_avg_sq"})
OptimizerState = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LocalOptimizer:
    """One client's optimizer and schedule for a round (built from the spec's [train] section).

    `steps` is the local steps of a round and `rounds` the run's rounds: a schedule over the run
    runs over `rounds * steps` steps, indexed by the round number (public), not by how often the
    client took part."""

    name: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: int = 0
    schedule_over: str = "round"
    steps: int = 1
    rounds: int = 1
    keep_state: bool = False

    @classmethod
    def from_spec(cls, train: TrainConfig, rounds: int) -> LocalOptimizer:
        """The optimizer the spec's [train] section asks for, in a run of `rounds` rounds."""
        b1, b2 = train.betas
        return cls(
            train.optimizer, train.lr, train.momentum, (b1, b2), 1e-8, train.weight_decay, train.schedule,
            train.warmup, train.schedule_over, train.local_steps, rounds, train.optimizer_state == "keep",
        )  # fmt: skip

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.name!r})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")

    # ---- the schedule -------------------------------------------------------------------------
    @property
    def horizon(self) -> int:
        """Steps the schedule runs over."""
        return self.steps * (self.rounds if self.schedule_over == "run" else 1)

    def lr_at(self, round_num: int, step: int) -> float:
        """The learning rate of local step `step` (0-based) of round `round_num` (1-based)."""
        t = step + ((round_num - 1) * self.steps if self.schedule_over == "run" else 0)
        if t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        progress = (t - self.warmup) / max(self.horizon - self.warmup, 1)
        if self.schedule == "linear":
            return self.lr * (1.0 - progress)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    # ---- the reference path: torch's own optimizers ------------------------------------------
    def build(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """torch.optim's optimizer with these settings (the learning rate is set before each step)."""
        wd = self.weight_decay
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=wd)
        if self.name == "momentum":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=wd)
        klass = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return klass(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=wd)

    # ---- what the server can bound without seeing the client's data (fedpeft.validation) -------
    @property
    def stateful(self) -> bool:
        return self.name != "sgd"

    def gradient_weight(self) -> float:
        """sgd and momentum: the largest weight any one step's gradient carries in a round's change
        (the change is sum_i w_i g_i): the largest learning rate, over (1 - momentum) with momentum."""
        lr_max = max(self.lr_at(r, s) for r in self._rounds() for s in range(self.steps))
        return lr_max / (1.0 - self.momentum) if self.name == "momentum" else lr_max

    def adam_ratio_bound(self) -> float:
        """adam and adamw: the largest |m_hat / sqrt(v_hat)| of any coordinate at any step a client
        can reach, whatever its gradients (Cauchy-Schwarz on the moments' geometric sums): each
        coordinate moves by at most lr_t times this per step."""
        b1, b2 = self.betas
        gamma = b1 * b1 / b2
        last = self.steps * (self.rounds if self.keep_state else 1)
        best, geometric = 0.0, 0.0
        for t in range(1, last + 1):
            geometric = geometric * gamma + 1.0  # sum_{k < t} gamma^k
            ratio = (1 - b1) / math.sqrt(1 - b2) * math.sqrt(geometric) * math.sqrt(1 - b2**t) / (1 - b1**t)
            best = max(best, ratio)
        return best

    def lr_sum(self) -> float:
        """The largest sum of one round's learning rates, over the rounds."""
        return max(sum(self.lr_at(r, s) for s in range(self.steps)) for r in self._rounds())

    def _rounds(self) -> range:
        return range(1, (self.rounds if self.schedule_over == "run" else 1) + 1)


class StackedOptimizer:
    """torch's SGD / momentum / Adam / AdamW update rules on stacked [K, ...] parameters, client j
    owning row j and its own step count (its kept state may be older than another's)."""

    def __init__(
        self, opt: LocalOptimizer, params: list[torch.Tensor], names: list[str], kept: list[OptimizerState | None]
    ) -> None:
        self.opt, self.params, self.names = opt, params, names
        k = params[0].shape[0] if params else 0
        dev = params[0].device if params else torch.device("cpu")
        self.state: list[dict[str, torch.Tensor]] = []
        self.fresh = torch.tensor([not kept[j] for j in range(k)], device=dev)  # momentum: no buffer yet
        for p, name in zip(params, names, strict=True):
            state: dict[str, torch.Tensor] = {}
            rows = [(kept[j] or {}).get(name, {}) for j in range(k)]
            if opt.name == "momentum":
                state["momentum_buffer"] = _stack(rows, "momentum_buffer", p)
            elif opt.name in ("adam", "adamw"):
                state["step"] = torch.tensor([float(r.get("step", 0.0)) for r in rows], device=dev)
                state["exp_avg"] = _stack(rows, "exp_avg", p)
                state["exp_avg_sq"] = _stack(rows, "exp_avg_sq", p)
            self.state.append(state)

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        """One step of every client: `grads[i]` is [K, ...], client j's gradient in row j."""
        opt, wd = self.opt, self.opt.weight_decay
        for p, g, state in zip(self.params, grads, self.state, strict=True):
            if opt.name in ("sgd", "momentum") and wd:
                g = g + wd * p
            if opt.name == "sgd":
                p.sub_(lr * g)
            elif opt.name == "momentum":
                buf = state["momentum_buffer"]
                fresh = self.fresh.reshape((-1,) + (1,) * (p.dim() - 1))
                buf.copy_(torch.where(fresh, g, buf * opt.momentum + g))  # torch: the first buffer is g
                p.sub_(lr * buf)
            else:
                if opt.name == "adamw":
                    p.mul_(1 - lr * wd)
                elif wd:
                    g = g + wd * p
                b1, b2 = opt.betas
                state["step"] += 1
                t = state["step"].reshape((-1,) + (1,) * (p.dim() - 1))
                state["exp_avg"].lerp_(g, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (state["exp_avg_sq"].sqrt() / (1 - b2**t).sqrt()).add_(opt.eps)
                p.sub_(lr / (1 - b1**t) * state["exp_avg"] / denom)
        self.fresh.zero_()

    def client_state(self, j: int) -> OptimizerState:
        """Client j's state as torch's optimizers hold it (copies, on the CPU)."""
        out: OptimizerState = {}
        for name, state in zip(self.names, self.state, strict=True):
            if state:
                out[name] = {key: value[j].detach().to("cpu").clone() for key, value in state.items()}
        return out


def _stack(rows: list[dict[str, torch.Tensor]], key: str, like: torch.Tensor) -> torch.Tensor:
    """[K, ...] of each client's kept `key` (zeros where it has none)."""
    return torch.stack(
        [r[key].to(like.device, like.dtype) if key in r else torch.zeros_like(like[j]) for j, r in enumerate(rows)]
    )


def torch_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> OptimizerState:
    """A torch optimizer's per-parameter state by tensor name (copies, on the CPU)."""
    out: OptimizerState = {}
    for name, p in params.items():
        tensors = {k: v for k, v in optimizer.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
        if tensors:
            out[name] = {k: v.detach().to("cpu").clone() for k, v in tensors.items()}
    return out


def load_torch_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor], kept: OptimizerState) -> None:
    """Put a kept state (by tensor name) into a fresh torch optimizer."""
    for name, p in params.items():
        if name in kept:
            optimizer.state[p] = {k: v.to(p.device).clone() for k, v in kept[name].items()}
