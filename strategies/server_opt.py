"""Server optimizers (FedOpt): the round's combined upload minus the global adapter is a pseudo-gradient
the server steps on, with momentum (FedAvgM) or adaptive moments (FedAdam, FedYogi).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2, no bias correction, v
starts at tau^2); Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019 (FedAvgM). With Delta_t = combine(uploads) - x_t:

  avgm:  m = beta m + Delta                                    x += eta m
  adam:  m = b1 m + (1 - b1) Delta,  v = b2 v + (1 - b2) Delta^2        x += eta m / (sqrt(v) + tau)
  yogi:  m as adam,  v = v - (1 - b2) Delta^2 sign(v - Delta^2)         x += eta m / (sqrt(v) + tau)

At eta = 1 with avgm's beta = 0 the wrapped strategy is unchanged. It applies to strategies whose
server step combines the uploads tensor by tensor (fedavg, ffa, fedsa: `combines_uploads`):
re-factorising ones (fedsvd) change the basis of B every round, so a moment kept in the old basis
means nothing in the new one. Everything it uses is the aggregate, so under secure aggregation or
client-level DP it is post-processing of what the server may see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .base import Strategy

__all__ = ["SERVER_OPTIMIZERS", "ServerOptimizer", "ServerOptimized", "split_server_options"]

SERVER_OPTIMIZERS = ("none", "avgm", "adam", "yogi")
_PREFIX = "server_"


@dataclass(frozen=True)
class ServerOptimizer:
    """Strategy options `server_optimizer` (none | avgm | adam | yogi), `server_lr` (eta),
    `server_momentum` (avgm's beta), `server_betas` (adam/yogi's b1, b2) and `server_tau`."""

    optimizer: str = "none"
    lr: float = 1.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.99)
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)} (got {self.optimizer!r})")
        if self.lr <= 0:
            raise ValueError(f"server_lr must be > 0 (got {self.lr})")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1) (got {self.momentum})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"server_betas must be two numbers in [0, 1) (got {list(self.betas)})")
        if self.tau <= 0:
            raise ValueError(f"server_tau must be > 0 (got {self.tau})")

    def step(
        self, current: dict[str, torch.Tensor], combined: dict[str, torch.Tensor], state: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The new tensors and optimizer state from the global tensors and the strategy's combination
        of this round's uploads (inputs are not mutated)."""
        m_old, v_old = state.get("m", {}), state.get("v", {})
        out, m_new, v_new = {}, {}, {}
        for name, x in current.items():
            x64 = x.double()
            delta = combined[name].double() - x64
            m = m_old.get(name, torch.zeros_like(x64))
            if self.optimizer == "avgm":
                m = self.momentum * m + delta
                step = m
            else:
                b1, b2 = self.betas
                m = b1 * m + (1 - b1) * delta
                v = v_old.get(name, torch.full_like(x64, self.tau**2))
                sq = delta * delta
                v = b2 * v + (1 - b2) * sq if self.optimizer == "adam" else v - (1 - b2) * sq * torch.sign(v - sq)
                v_new[name] = v
                step = m / (v.sqrt() + self.tau)
            m_new[name] = m
            out[name] = (x64 + self.lr * step).to(x.dtype)
        return out, {"m": m_new, **({"v": v_new} if v_new else {})}


def split_server_options(options: dict[str, Any]) -> tuple[dict[str, Any], ServerOptimizer | None]:
    """The strategy's own options, and the server optimizer the `server_*` options ask for (None
    when there is none)."""
    own = {k: v for k, v in options.items() if not k.startswith(_PREFIX)}
    server = {k[len(_PREFIX) :]: v for k, v in options.items() if k.startswith(_PREFIX)}
    if not server:
        return own, None
    valid = {"optimizer", "lr", "momentum", "betas", "tau"}
    if unknown := set(server) - valid:
        raise ValueError(
            f"unknown server optimizer option(s) {sorted(_PREFIX + k for k in unknown)}; valid: "
            + ", ".join(sorted(_PREFIX + k for k in valid))
        )
    if "betas" in server:
        server["betas"] = tuple(float(b) for b in server["betas"])
    opt = ServerOptimizer(**server)
    return own, (opt if opt.optimizer != "none" else None)


@dataclass(frozen=True)
class ServerOptimized(Strategy):
    """`inner` with a server optimizer on the tensors it combines; everything else is the inner
    strategy's (what clients train and upload, its init, its metrics)."""

    inner: Strategy
    server: ServerOptimizer = field(default_factory=ServerOptimizer)

    def __post_init__(self) -> None:
        if not self.inner.combines_uploads:
            raise ValueError(
                f"a server optimizer steps on the combined uploads, tensor by tensor; strategy {self.inner.name!r} "
                "does more (it re-factorises or corrects the adapter), so its moments would lose their meaning: "
                "use it with fedavg, ffa or fedsa, or set strategy.server_optimizer = none"
            )
        for attr in ("name", "trains", "personal"):
            object.__setattr__(self, attr, getattr(self.inner, attr))

    @property
    def sum_only(self) -> bool:  # type: ignore[override]
        return self.inner.sum_only

    @property
    def combines_uploads(self) -> bool:  # type: ignore[override]
        return True

    def base_change_rank(self, num_updates: int, rank: int) -> int:
        return self.inner.base_change_rank(num_updates, rank)

    def uploads(self, state, train_head):  # noqa: ANN001, ANN201
        return self.inner.uploads(state, train_head)

    def init(self, state, seed):  # noqa: ANN001, ANN201
        return self.inner.init(state, seed)

    def aggregate(self, state, updates, round_num, server_state):  # noqa: ANN001, ANN201
        inner_state = {k: v for k, v in server_state.items() if k != "server_optimizer"}
        combined, inner_state, metrics = self.inner.aggregate(state, updates, round_num, inner_state)
        names = list(updates[0].tensors)
        current = {n: state.tensors[n] for n in names}
        stepped, opt_state = self.server.step(current, {n: combined.tensors[n] for n in names}, server_state.get(
            "server_optimizer", {}
        ))  # fmt: skip
        return combined.with_tensors(stepped), {**inner_state, "server_optimizer": opt_state}, metrics

    def options(self) -> dict[str, Any]:
        return {**self.inner.options(), **{f"{_PREFIX}{k}": v for k, v in vars(self.server).items()}}
