"""What the server checks before an update may be aggregated.

Every update is checked for its tensors (names, shapes, dtype, finite values), its numbers (an
integer aggregation weight no larger than the spec allows, finite epsilon and sigma, a rank within
the model's, zero padded components) and, where a bound applies, the size of its change: under
DP an honest DP-SGD client cannot move its upload farther than `optimizer_update_bound` from what it
was sent (for its optimizer), so anything farther is not an honest client's and is dropped.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedpeft.config import Spec, client_rank
from fedpeft.optim import LocalOptimizer
from fedpeft.privacy.accounting import calibrate_sigma, sample_rate
from fedpeft.state import LORA_A, LORA_B, AdapterState, ClientUpdate, kind_of

if TYPE_CHECKING:
    from fedpeft.client import LocalTraining
    from fedpeft.executors.base import ClientStore

__all__ = [
    "Expected",
    "UpdateLimits",
    "at_rank",
    "change_and_bound",
    "dp_update_bound",
    "noise_ratio",
    "norm_outliers",
    "optimizer_update_bound",
    "outlier_factor",
    "padding",
    "validate_update",
]

TAIL = 6.0  # standard deviations of slack: an honest client exceeds a bound with probability < 1e-8


def dp_update_bound(lr: float, steps: int, clip: float, sigma: float, expected_batch: float, numel: int) -> float:
    """The largest ||upload - sent|| an honest DP-SGD client reaches, but with probability < 1e-8.

    Each step adds lr * (sum of clipped per-example gradients + N(0, (sigma C)^2 I)) / E[B]. The
    clipped sums over all steps have norm <= C * (examples drawn), and S * E[B] + 6 sqrt(S E[B]) + 6
    bounds the Poisson total; the noise over S steps is N(0, S (sigma C)^2 I_d), whose norm is below
    sigma C sqrt(S) (sqrt(d) + 6) (Gaussian concentration). Projections (heterogeneous ranks) only
    shrink it.
    """
    total = steps * expected_batch
    drawn = total + TAIL * math.sqrt(total) + TAIL
    noise = sigma * math.sqrt(steps) * (math.sqrt(numel) + TAIL)
    return lr * clip * (drawn + noise) / expected_batch


def optimizer_update_bound(
    opt: LocalOptimizer, steps: int, clip: float, sigma: float, expected_batch: float, numel: int, start_norm: float
) -> float:
    """The largest ||upload - sent|| an honest client of optimizer `opt` reaches (but with
    probability < 1e-8), from public values: the spec's optimizer, steps, C, the client's sigma
    and expected batch, and the norm of what it was sent.

    sgd and momentum: a round's change is sum_i w_i g_i over noised mean gradients g_i with every
    w_i <= `opt.gradient_weight()` (lr, or lr / (1 - momentum)), so `dp_update_bound` at that lr
    holds; with kept momentum, over every step of the run (the buffer carries older gradients).
    adam and adamw: each coordinate moves at most lr_t * `opt.adam_ratio_bound()` per step, whatever
    the gradients: sqrt(numel) times the round's sum of learning rates (no noise term).
    Weight decay moves at most wd * ||p|| per unit of lr, and ||p|| <= ||sent|| + D, so
    D <= (D_grad + L wd ||sent||) / (1 - L wd) with L the total weight; inf when L wd >= 1.
    """
    if opt.name in ("adam", "adamw"):
        total = opt.lr_sum()
        grad_part = total * opt.adam_ratio_bound() * math.sqrt(numel)
    else:
        run_steps = steps * (opt.rounds if opt.keep_state and opt.name == "momentum" else 1)
        grad_part = dp_update_bound(opt.gradient_weight(), run_steps, clip, sigma, expected_batch, numel)
        total = opt.gradient_weight() * run_steps
    decay = total * opt.weight_decay
    if decay == 0:
        return grad_part
    return (grad_part + decay * start_norm) / (1 - decay) if decay < 1 else math.inf


@dataclass(frozen=True)
class Expected:
    """What the server knows of one client's reply before it arrives, from the spec and the
    client's public size, never from the reply: its aggregation weight (None where the server does
    not hold the client's size: a remote node), its rank (None: the model's, homogeneous) and its
    sigma (None: not known; under DP the reply must then carry one, at most the largest honest).
    The DP norm bound is computed from these, so a node cannot widen its own bound by what it says."""

    num_examples: int | None  # under DP with the size unknown: batch_size x local_steps (E[B] = batch_size)
    rank: int | None
    sigma: float | None
    expected_batch: float  # E[B] = min(batch_size, size): batch_size where the size is unknown
    private: bool = False  # under DP-SGD: a reply must carry its sigma
    max_epsilon: float = math.inf  # under DP-SGD: the spec's target; an honest ledger never reports more


def _differs(update: ClientUpdate, expect: Expected) -> str | None:
    """Why the reply's own numbers disagree with what the server expects, or None."""
    if update.rank != expect.rank:
        return f"rank {update.rank!r} != {expect.rank!r}, this client's rank in the spec"
    if expect.num_examples is not None and update.num_examples != expect.num_examples:
        return (f"num_examples {update.num_examples} != {expect.num_examples}, this client's weight "
                "(expected batch x local_steps: under DP a node with fewer examples than the batch cannot "
                "join a federation whose server does not hold its size)")  # fmt: skip
    sigma, dp = update.metrics.get("sigma"), expect.private
    if dp and sigma is None:
        return "sigma missing: under DP a reply carries its noise multiplier"
    if dp and expect.sigma is not None and not math.isclose(float(sigma), expect.sigma, rel_tol=1e-9):
        return (f"sigma {sigma!r} != {expect.sigma:.6g}, calibrated for this client from the spec and its public size "
                "(a data-file node's: federation.public_sizes)")  # fmt: skip
    eps = update.metrics.get("epsilon")
    if dp and (eps is None or not 0 < float(eps) <= expect.max_epsilon * (1 + 1e-6)):
        return f"epsilon {eps!r} is not in (0, {expect.max_epsilon:g}], the spec's target: no honest ledger reports it"
    return None


@dataclass(frozen=True)
class UpdateLimits:
    """The spec's limits on an update: the most examples a client can report (batch x steps), the
    model's rank, and the norm bound (None: none; `dp` computes it per update from the sigma and
    expected batch the server expects of that client, `Expected`)."""

    max_examples: int
    model_rank: int
    norm_bound: float | None = None
    dp: tuple[LocalOptimizer, int, float, float] | None = None  # (optimizer, steps, clip, largest honest sigma)

    def bound(
        self, update: ClientUpdate, numel: int, start_norm: float = 0.0, expect: Expected | None = None
    ) -> float | None:
        """The norm bound for `update`: from `expect` (the server's values) where given; else (a
        direct call, tests) from the update's own weight and sigma, capped at the largest honest."""
        if self.dp is None:
            return self.norm_bound
        opt, steps, clip, sigma_max = self.dp
        if expect is not None:
            sigma = min(expect.sigma if expect.sigma is not None else float(update.metrics["sigma"]), sigma_max)
            return optimizer_update_bound(opt, steps, clip, sigma, expect.expected_batch, numel, start_norm)
        sigma = min(float(update.metrics.get("sigma", sigma_max)), sigma_max)
        expected_batch = max(update.num_examples - 0.5, 0.5) / steps  # num_examples = round(E[B] * steps)
        return optimizer_update_bound(opt, steps, clip, sigma, expected_batch, numel, start_norm)


def padding(tensor: torch.Tensor, kind: str, rank: int | None) -> torch.Tensor | None:
    """The components of a LoRA factor past a client's `rank` (rows of A, columns of B), as a view;
    None for other tensors or when ranks are not heterogeneous."""
    if rank is None or kind not in (LORA_A, LORA_B):
        return None
    return tensor[rank:] if kind == LORA_A else tensor[:, rank:]


def at_rank(tensor: torch.Tensor, kind: str, rank: int | None) -> torch.Tensor:
    """What a client of `rank` starts from: the sent tensor with its padding zeroed (a copy)."""
    tensor = tensor.clone()
    if (padded := padding(tensor, kind, rank)) is not None:
        padded.zero_()
    return tensor


def _padding_is_zero(update: ClientUpdate) -> str | None:
    for name, tensor in update.tensors.items():
        padded = padding(tensor, kind_of(name), update.rank)
        if padded is not None and padded.numel() and bool(padded.ne(0).any()):
            return f"{name}: components past the client's rank {update.rank} are not zero"
    return None


def validate_update(
    update: ClientUpdate, expected: list[str], reference: AdapterState, limits: UpdateLimits | None = None,
    sum_noised: bool = False, expect: Expected | None = None,
) -> str | None:  # fmt: skip
    """Why `update` must not be aggregated, or None if it is sound. `reference`: what the client
    was sent (the global adapter).

    A securely aggregated mean (any update with `members`, fedpeft.executors.SecureSum) is checked
    against the loosest bound any honest member has: a convex combination of changes stays within
    the largest of their bounds. With `sum_noised` (distributed client-level DP noise inside it)
    only its form is checked. A mean that fails is dropped whole: no member can be singled out."""
    if hasattr(update, "members"):
        update = dataclasses.replace(update, num_examples=1, metrics={})
        limits, expect = None if sum_noised else limits, None
    if set(update.tensors) != set(expected):
        missing, extra = set(expected) - set(update.tensors), set(update.tensors) - set(expected)
        return f"wrong tensors (missing {sorted(missing)[:2]}, unexpected {sorted(extra)[:2]})"
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"num_examples must be a positive integer (got {n!r})"
    if limits is not None and n > limits.max_examples:
        return f"num_examples {n} > {limits.max_examples}, the most a client can use (batch_size x local_steps)"
    for key in ("epsilon", "sigma"):
        value = update.metrics.get(key)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            return f"{key} = {value!r} is not a finite number >= 0"
    for name in expected:
        tensor, ref = update.tensors[name], reference.tensors[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != ref.shape:
            shape = getattr(tensor, "shape", type(tensor).__name__)
            return f"{name}: shape {tuple(shape)} != expected {tuple(ref.shape)}"
        if tensor.dtype != ref.dtype:
            return f"{name}: dtype {tensor.dtype} != expected {ref.dtype}"
        if not torch.isfinite(tensor).all():
            return f"{name}: non-finite values (NaN or inf)"
    if expect is not None and (why := _differs(update, expect)):
        return why
    if update.rank is not None:
        model_rank = limits.model_rank if limits is not None else reference.rank
        if isinstance(update.rank, bool) or not 1 <= update.rank <= model_rank:
            return f"rank {update.rank!r} is not between 1 and the model's rank {model_rank}"
        if (why := _padding_is_zero(update)) is not None:
            return why
    if limits is not None:
        norm, bound = change_and_bound(update, expected, reference, limits, expect)
        if bound is not None and math.isfinite(bound) and norm > bound:
            return f"update norm {norm:.4g} > bound {bound:.4g} (federation.update_bound)"
    return None


def change_and_bound(
    update: ClientUpdate, expected: list[str], reference: AdapterState, limits: UpdateLimits, expect: Expected | None
) -> tuple[float, float | None]:
    """||upload - sent|| over the `expected` tensors, and the norm bound the server holds it to."""
    numel = sum(update.tensors[n].numel() for n in expected)
    sent = _sent(update, expected, reference)
    start_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in sent.values()))
    return _distance(update, sent), limits.bound(update, numel, start_norm, expect)


def change_norm(update: ClientUpdate, expected: list[str], reference: AdapterState) -> float:
    """||upload - sent|| over the `expected` tensors, what was sent taken at the client's rank."""
    return _distance(update, _sent(update, expected, reference))


def _sent(update: ClientUpdate, expected: list[str], reference: AdapterState) -> dict[str, torch.Tensor]:
    return {n: at_rank(reference.tensors[n], kind_of(n), update.rank).double() for n in expected}


def _distance(update: ClientUpdate, sent: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((update.tensors[n].double() - t).pow(2).sum()) for n, t in sent.items()))


OUTLIER_NORM_UNDER_DP = 1.5  # federation.outlier_norm = 0 (auto) under DP: see norm_outliers


def norm_outliers(
    updates: list[ClientUpdate], expected: list[str], reference: AdapterState, sigmas: dict[int, float | None],
    factor: float,
) -> dict[int, str]:  # fmt: skip
    """Clients whose change is an outlier in norm, with why: ||upload - sent|| per unit of its noise,
    sigma_k sqrt(d_k) (d_k the numbers it sends at its rank; sqrt(d_k) without DP), above `factor`
    times the median of the round (at least 3 updates, else none).

    Under DP-SGD the noise dominates every honest change, so honest ratios agree to a few percent
    (each is about lr C sqrt(S) / E[B] times sqrt(1 + signal/noise)); the norm bound must admit the
    worst-case signal and lets one client send several times an honest norm. A change 1.5 times the
    round's median is then an attack, not a client; a median needs an honest majority."""
    if len(updates) < 3 or not math.isfinite(factor):
        return {}
    ratios = {u.client_id: noise_ratio(u, expected, reference, sigmas.get(u.client_id)) for u in updates}
    median = statistics.median(ratios.values())
    return {
        cid: f"change norm {r / median:.3g} x the round's median per unit of noise > federation.outlier_norm {factor:g}"
        for cid, r in ratios.items()
        if r > factor * median
    }


def outlier_factor(spec: Spec) -> float:
    """federation.outlier_norm, auto (0) resolved: OUTLIER_NORM_UNDER_DP under DP-SGD, else off (0). Off
    under client-level DP: a median rule lets one client decide which others enter the clipped sum."""
    factor = spec.federation.outlier_norm
    if spec.privacy.client_enabled:
        return 0.0
    return factor if factor else (OUTLIER_NORM_UNDER_DP if spec.privacy.enabled else 0.0)


def noise_ratio(update: ClientUpdate, expected: list[str], reference: AdapterState, sigma: float | None) -> float:
    """||upload - sent|| / (sigma sqrt(d)), d the numbers the client sends at its rank (sigma None: 1)."""
    sent = sum(update.tensors[n].numel() - _padded_count(update.tensors[n], kind_of(n), update.rank) for n in expected)
    return change_norm(update, expected, reference) / ((sigma or 1.0) * math.sqrt(max(sent, 1)))


def _padded_count(tensor: torch.Tensor, kind: str, rank: int | None) -> int:
    padded = padding(tensor, kind, rank)
    return 0 if padded is None else padded.numel()


def spec_limits(spec: Spec, plan: LocalTraining) -> UpdateLimits:
    """The spec's limits on any update: weight, rank, and the norm bound (auto under DP: what an
    honest DP-SGD client of the spec's optimizer can reach)."""
    bound = spec.federation.update_bound
    dp = None
    if bound == 0 and spec.privacy.enabled:
        priv, steps = spec.privacy, spec.federation.rounds * plan.steps
        # no honest client's sigma exceeds the one calibrated at q = 1 (no amplification)
        sigma_max = calibrate_sigma(priv.epsilon, priv.delta, 1.0, steps, priv.accountant)
        dp = (plan.local_optimizer, plan.steps, priv.clip, sigma_max)
    return UpdateLimits(plan.batch_size * plan.steps, spec.model.rank, bound if bound > 0 else None, dp)


def expected_reply(
    spec: Spec, plan: LocalTraining, store: ClientStore | None, cid: int, known: tuple[int, float] | None = None
) -> Expected:
    """What client `cid`'s reply must say, from the spec and the public sizes the server holds: the
    in-process `store`'s, or for a remote node `known` = (public size, sigma) the server derived itself
    (its bundled partition, or federation.public_sizes). Without either, under DP its weight must be
    batch_size x local_steps and its sigma at most the largest honest one."""
    dp, rank, eps = spec.privacy.enabled, client_rank(spec.model, cid), spec.privacy.epsilon
    if store is None and known is None:
        return Expected(plan.batch_size * plan.steps if dp else None, rank, None, float(plan.batch_size), dp, eps)
    budget = store.budget(cid) if store is not None else None
    if store is not None:
        size, sigma = (budget.size if budget is not None else 0) or len(store.data[cid]), budget and budget.sigma
    else:
        size, sigma = known  # type: ignore[misc]
    batch = sample_rate(plan.batch_size, size) * size
    return Expected(max(1, round(batch * plan.steps)), rank, sigma if dp else None, batch, dp, eps)
