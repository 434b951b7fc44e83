"""Privacy accounting: a per-client ledger of (sigma, q, steps) and Opacus's accountants on it.

The ledger is the record; epsilon is pure math on it (Opacus RDP or PRV accountant), so a ledger
restored from a checkpoint gives the same epsilon. sigma is calibrated once, before round 1, for
the worst case in which the client trains in every round, so the target is never exceeded.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

from fedpeft.privacy.cache import cached

__all__ = ["epsilon", "calibrate_budget", "calibrate_sigma", "check_mechanism", "ClientBudget", "sample_rate"]

Entry = tuple[float, float, int]  # (noise multiplier sigma, sample rate q, steps)


def _accountant(name: str):  # noqa: ANN202
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=name)


def _compose(steps: tuple[Entry, ...], delta: float, accountant: str) -> float:
    acc = _accountant(accountant)
    acc.history = list(steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PRV's numerical warnings at q = 1 are harmless
        return float(acc.get_epsilon(delta=delta))


def check_mechanism(q: float, steps: int, delta: float, sigma: float | None = None) -> None:
    """ValueError, saying what to change, for inputs no accountant can take (a q of 0 or a step
    count of 0 would send a calibration searching forever)."""
    if not (isinstance(q, (int, float)) and 0 < q <= 1):
        raise ValueError(f"the sampling rate q must be in (0, 1] (got {q}): q = batch size / examples")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (got {steps!r})")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1) (got {delta}); it is usually below 1 / examples, e.g. 1e-5")
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0 (got {sigma}); sigma = 0 is no privacy (epsilon inf)")


@functools.lru_cache(maxsize=4096)
def epsilon(history: tuple[Entry, ...], delta: float, accountant: str = "prv") -> float:
    """Epsilon at `delta` of the composition of the DP-SGD steps in `history` (Opacus's
    accountant; cached in memory and on disk, fedpeft.privacy.cache)."""
    # A step at q = 0 samples no one and spends nothing; any other q must be a rate.
    for _, q, n in history:
        if n > 0 and q != 0:
            check_mechanism(q, int(n), delta)
    steps = tuple((float(s), float(q), int(n)) for s, q, n in history if n > 0 and q != 0)
    if not steps:
        return 0.0
    key = f"eps|{accountant}|{delta!r}|" + ";".join(f"{s!r},{q!r},{n}" for s, q, n in steps)
    return cached(key, lambda: _compose(steps, delta, accountant))


TOLERANCE = 0.01  # calibrated sigma spends between target - 0.01 and target, as Opacus's search


_solved: dict[tuple[float, float, int], dict[float, float]] = {}  # (target, delta, steps) -> {q: sigma}


def _bracket(target: float, delta: float, q: float, steps: int) -> tuple[float, float]:
    """A first guess (lo, hi) around the PRV sigma: 3% either side of a sigma already solved here
    for a nearby q (clients' sizes differ a little), else the RDP sigma (cheap, close above PRV's)
    and 80% of it. The search widens it where the guess is wrong."""
    from opacus.accountants.utils import get_noise_multiplier

    near = _solved.get((target, delta, steps), {})
    if near:
        q0 = min(near, key=lambda x: abs(math.log(x / q)))
        if abs(math.log(q0 / q)) < 0.25:
            return near[q0] / 1.03, near[q0] * 1.03
    rdp = float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                     accountant="rdp", epsilon_tolerance=TOLERANCE))  # fmt: skip
    return 0.8 * rdp, rdp


def _search_prv(target: float, delta: float, q: float, steps: int) -> float:
    """The PRV sigma by a bracketed root search: regula falsi (Illinois) on epsilon(sigma) - target,
    bracketed around a nearby solution or the RDP sigma; a handful of PRV evaluations instead of
    Opacus's doubling-then-bisection. Returns a sigma whose epsilon is within [target - TOLERANCE,
    target], never above."""

    def f(sigma: float) -> float:
        return epsilon(((sigma, q, steps),), delta, "prv") - target

    lo, hi = _bracket(target, delta, q, steps)
    f_hi = f(hi)
    while f_hi > 0:  # not high enough: widen upwards
        lo, hi = hi, hi * 1.25
        f_hi = f(hi)
    f_lo = f(lo)
    while f_lo <= 0:
        hi, f_hi = lo, f_lo
        if -f_hi <= TOLERANCE:
            return _remember(target, delta, q, steps, hi)
        lo *= 0.8
        f_lo = f(lo)
    w_lo, w_hi, side = f_lo, f_hi, 0  # Illinois: an end kept twice has its weight halved
    for _ in range(60):
        if -f_hi <= TOLERANCE:  # the true epsilon of hi, never a weight
            return _remember(target, delta, q, steps, hi)
        mid = (lo * w_hi - hi * w_lo) / (w_hi - w_lo)
        if not lo < mid < hi:
            mid = (lo + hi) / 2
        f_mid = f(mid)
        if f_mid > 0:
            lo, w_lo = mid, f_mid
            w_hi = w_hi / 2 if side == -1 else w_hi
            side = -1
        else:
            hi, f_hi, w_hi = mid, f_mid, f_mid
            w_lo = w_lo / 2 if side == 1 else w_lo
            side = 1
    return _remember(target, delta, q, steps, hi)


def _remember(target: float, delta: float, q: float, steps: int, sigma: float) -> float:
    _solved.setdefault((target, delta, steps), {})[q] = sigma
    return sigma


def _search(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    if accountant == "prv":
        return _search_prv(target, delta, q, steps)
    return float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                      accountant=accountant, epsilon_tolerance=TOLERANCE))  # fmt: skip


@functools.lru_cache(maxsize=1024)
def calibrate_sigma(target_epsilon: float, delta: float, q: float, steps: int, accountant: str = "prv") -> float:
    """Smallest sigma (to a 0.01 tolerance in epsilon) with epsilon(sigma, q, steps) <= target;
    computed once per distinct inputs on this machine (fedpeft.privacy.cache)."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target epsilon must be finite and > 0 (got {target_epsilon})")
    check_mechanism(q, steps, delta)
    key = f"sigma|{accountant}|{target_epsilon!r}|{delta!r}|{q!r}|{steps}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return cached(key, lambda: _search(target_epsilon, delta, q, steps, accountant))
        except ValueError as exc:
            raise ValueError(
                f"cannot reach epsilon={target_epsilon} at delta={delta} with q={q:.4g} over "
                f"{steps} steps ({exc}); raise privacy.epsilon, or lower rounds, local_steps or "
                "batch_size"
            ) from None


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate of a client: expected batch_size examples per step, at most all."""
    return min(1.0, batch_size / max(num_examples, 1))


@dataclass
class ClientBudget:
    """One client's DP-SGD parameters and its ledger of steps actually taken, across rounds."""

    client_id: int
    sigma: float
    q: float
    target_epsilon: float
    delta: float
    accountant: str = "prv"
    history: list[Entry] = field(default_factory=list)
    size: int = 0  # the public dataset size q was computed from (0: not recorded, the true size)

    def _with(self, steps: int) -> tuple[Entry, ...]:
        history = list(self.history)
        if history and history[-1][:2] == (self.sigma, self.q):
            history[-1] = (self.sigma, self.q, history[-1][2] + steps)
        elif steps:
            history.append((self.sigma, self.q, steps))
        return tuple(history)

    def history_after(self, steps: int) -> tuple[Entry, ...]:
        """The ledger's history with `steps` more steps at its sigma and q."""
        return self._with(steps)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    @property
    def epsilon(self) -> float:
        return epsilon(tuple(self.history), self.delta, self.accountant)

    def epsilon_after(self, steps: int) -> float:
        """Epsilon the client would have spent after `steps` more steps."""
        return epsilon(self._with(steps), self.delta, self.accountant)

    def allows(self, steps: int) -> bool:
        # Opacus's calibration leaves epsilon at most the target; a hair of slack absorbs
        # floating-point noise in the accountant, never a real overrun.
        return self.epsilon_after(steps) <= self.target_epsilon * (1 + 1e-9)

    def record(self, steps: int) -> None:
        self.history = list(self._with(steps))

    def to_dict(self) -> dict:
        return {**self.__dict__, "history": [list(e) for e in self.history]}

    @classmethod
    def from_dict(cls, data: dict) -> ClientBudget:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"not a privacy ledger: unknown field(s) {sorted(unknown)}")
        return cls(**{**data, "history": [tuple(e) for e in data["history"]]})


def calibrate_budget(
    client_id: int,
    num_examples: int,
    batch_size: int,
    rounds: int,
    local_steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str,
) -> ClientBudget:
    """One client's budget, its sigma calibrated for the worst case: it trains `local_steps` in
    every round. Needs nothing but the spec and the client's public size `num_examples`, so a client
    computes it alone and the result (q, sigma) is a function of public values."""
    q = sample_rate(batch_size, num_examples)
    sigma = calibrate_sigma(target_epsilon, delta, q, rounds * local_steps, accountant)
    return ClientBudget(client_id, sigma, q, target_epsilon, delta, accountant, size=num_examples)
