"""The strategy contract: a pure server step on adapter tensors, no Flower, no model.

A strategy declares which LoRA factors clients train (A, B or both) and maps
(global AdapterState, client updates, round, its own state) -> (new global state, new state,
metrics). The classifier head, when the spec trains it, is averaged by every strategy alike.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from fedpeft.registry import Registry
from fedpeft.state import HEAD, AdapterState, ClientUpdate, kind_of

__all__ = ["Strategy", "STRATEGIES", "ROBUST", "RobustCombine", "combine", "weighted_mean", "make_strategy"]

# every name here is declared in fedpeft.catalog.STRATEGY_INFO too (torch-free, for `fedpeft list` and
# the spec checks; strategies import nothing above state and registry, so tests/test_catalog.py checks it)
STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def kaiming_a(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's default init of A: kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    bound = 1.0 / shape[1] ** 0.5
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).float()


def weights(updates: list[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum_j n_j over the clients of the round."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("client updates carry no examples")
    return [u.num_examples / total for u in updates]


def weighted_mean(updates: list[ClientUpdate], name: str) -> torch.Tensor:
    """sum_k p_k * tensor_k, accumulated in float64, returned as float32."""
    out = torch.zeros_like(updates[0].tensors[name], dtype=torch.float64)
    for p, update in zip(weights(updates), updates, strict=True):
        out += p * update.tensors[name].double()
    return out.float()


ROBUST = ("mean", "median", "trimmed-mean", "centered-clip")


def combine(updates: list[ClientUpdate], name: str, how: str = "mean", trim: float = 0.2) -> torch.Tensor:
    """One tensor from every client's: the weighted mean (`mean`), or, robust to a few outlying
    clients, the coordinate-wise median (`median`, as Flower's FedMedian: the mean of the two middle
    values for an even count) or trimmed mean (`trimmed-mean`: drop `trimmed_count(trim, K)` values
    at each end of every coordinate, average the rest, as Flower's FedTrimmedAvg, except that a
    positive trim drops at least one per side), or centred clipping (`centered-clip`, see
    `centered_clip`). Robust ones ignore the examples' weights, as Flower's do."""
    if how == "mean":
        return weighted_mean(updates, name)
    stacked = torch.stack([u.tensors[name].double() for u in updates])
    if how == "centered-clip":
        return centered_clip(stacked).float()
    ordered, k = stacked.sort(dim=0).values, len(updates)
    if how == "median":
        return _middle(ordered).float()
    cut = trimmed_count(trim, k)
    return ordered[cut : k - cut].mean(dim=0).float()


def _middle(ordered: torch.Tensor) -> torch.Tensor:
    """The median along dim 0 of sorted values: the mean of the two middle ones for an even count."""
    k = ordered.shape[0]
    return (ordered[(k - 1) // 2] + ordered[k // 2]) / 2


def centered_clip(stacked: torch.Tensor) -> torch.Tensor:
    """Centred clipping (Karimireddy, He and Jaggi, ICML 2021) started at the coordinate-wise median
    m: m + mean_k clip_tau(x_k - m), where clip_tau scales a deviation down to norm tau and tau is
    the median of the K deviations' norms. The result lies within tau of the median, a client's own
    term adds at most tau / K however far it lies, and half the clients or more are never clipped;
    unlike a coordinate-wise rule it sees each client's whole tensor, so a deviation spread thinly
    over many coordinates (each inside the others' range) is clipped as a whole."""
    centre = _middle(stacked.sort(dim=0).values)
    deviations = stacked - centre
    norms = deviations.flatten(1).norm(dim=1)
    tau = _middle(norms.sort().values)
    scale = torch.where(norms > tau, tau / norms.clamp_min(1e-300), torch.ones_like(norms))
    return centre + (deviations * scale.view(-1, *[1] * (stacked.dim() - 1))).mean(dim=0)


def trimmed_count(trim: float, k: int) -> int:
    """How many of k values a trimmed mean drops at each end: int(trim * k) as scipy's trim_mean,
    but at least one when trim > 0 (at k = 4 and trim 0.2, int(0.8) = 0 would trim nothing and an
    attacker would pass untouched), and never so many that nothing is left (k = 2 keeps both: their
    mean is their median)."""
    if trim <= 0:
        return 0
    return min(max(1, int(trim * k)), (k - 1) // 2)


@dataclasses.dataclass(frozen=True)
class RobustCombine:
    """Options `robust` (mean | median | trimmed-mean | centered-clip, see `combine`) and `trim`, for
    strategies whose server step combines each uploaded tensor alone (fedavg, ffa, fedsvd). Only the
    mean is a sum, so only then is the strategy sum-only (secure aggregation possible)."""

    robust: str = "mean"
    trim: float = 0.2

    def __post_init__(self) -> None:
        if self.robust not in ROBUST:
            raise ValueError(f"robust must be one of {', '.join(ROBUST)} (got {self.robust!r})")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5) (got {self.trim})")

    @property
    def sum_only(self) -> bool:
        return self.robust == "mean"

    def combine(self, updates: list[ClientUpdate], name: str) -> torch.Tensor:
        return combine(updates, name, self.robust, self.trim)


def average_head(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """The weighted mean of every uploaded tensor that is not a LoRA factor (the trained head)."""
    return {n: weighted_mean(updates, n) for n in updates[0].tensors if kind_of(n) == HEAD}


class Strategy(ABC):
    """Base of server strategies. Subclasses are dataclasses whose fields are their options."""

    name: ClassVar[str]
    trains: ClassVar[frozenset[str]]  # LoRA factor kinds the clients train: subset of {A, B}
    sum_only: ClassVar[bool]  # server step needs only sum_k p_k * upload_k (secure aggregation ok)
    personal: ClassVar[frozenset[str]] = frozenset()  # kinds each client keeps across rounds, never sent
    # the server step combines the uploads tensor by tensor and nothing more, so a server optimizer
    # (strategies.server_opt) can step on combined - global
    combines_uploads: ClassVar[bool] = False
    # Whether the server step treats every upload alike, and so is right for every adapter family
    # (fedpeft.families), is declared with the name in fedpeft.catalog (STRATEGY_INFO.any_family).

    def base_change_rank(self, num_updates: int, rank: int) -> int:
        """Rank of the factored change to each frozen base weight that one aggregation of
        `num_updates` updates at LoRA rank `rank` sends to clients (0: the base never changes).
        The round loop measures the bytes clients download from it."""
        return 0

    def uploads(self, state: AdapterState, train_head: bool) -> list[str]:
        """Names of the tensors a client sends back."""
        kinds = (set(self.trains) - set(self.personal)) | ({HEAD} if train_head else set())
        return [n for n in state.tensors if kind_of(n) in kinds]

    def init(self, state: AdapterState, seed: int) -> tuple[AdapterState, dict[str, Any]]:
        """The global adapter and the strategy's own state before round 1 (both checkpointed).
        Strategies that change the base weights add their BASE tensors here."""
        return state, {"seed": seed}

    @abstractmethod
    def aggregate(
        self, state: AdapterState, updates: list[ClientUpdate], round_num: int, server_state: dict[str, Any]
    ) -> tuple[AdapterState, dict[str, Any], dict[str, float]]:
        """One server step. Must not mutate its inputs."""

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


def make_strategy(name: str, options: dict[str, Any] | None = None) -> Strategy:
    """Build a registered strategy; unknown names and options are errors naming the valid ones.
    The `server_*` options add a server optimizer around it (strategies.server_opt)."""
    from .server_opt import ServerOptimized, split_server_options

    klass = STRATEGIES.get(name)
    options, server = split_server_options(dict(options or {}))
    valid = {f.name for f in dataclasses.fields(klass)} if dataclasses.is_dataclass(klass) else set()
    unknown = set(options) - valid
    if unknown:
        raise ValueError(
            f"strategy {name!r} has no option(s) {sorted(unknown)}; valid: {', '.join(sorted(valid)) or '(none)'}"
        )
    strategy = klass(**options)
    return ServerOptimized(strategy, server) if server is not None else strategy
