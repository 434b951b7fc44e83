"""An empirical privacy audit of a node's training: a game that must not tell D from D + a canary,
a white-box check of the noise the node draws, and a replay the server must not be able to do.

Everything runs on the real path a Flower node takes: the ClientApp, handed a train message, trains
its one client on its own data file with the node's secret randomness and replies through the wire
module. Each trial is an independent node (its own state dir).

1. The distinguishing game (D vs D + one canary example, `trials` per side). Every reply is scored
   by canary_gradient (<update - start, -g>, g the canary's gradient at the start adapter),
   canary_loss (minus the canary's loss under the update) and reply.<key> (every value the reply
   carries). The first half of the trials picks each score's threshold and direction; on the second
   half Clopper-Pearson bounds on the error rates give a lower bound on epsilon. With k statistics
   each bound is taken at confidence 1 - 0.05 / k (Bonferroni), so the audit as a whole fails a
   correct mechanism with probability at most 5%.
2. The noise check (`pairs` pairs, white-box): one step of plain SGD on all of D (q = 1, no dropout)
   sent twice with the same message. The clipped-gradient sum is the same in both, so the difference
   of the two updates times B / lr is the difference of two noise draws, N(0, 2 sigma^2 C^2) per
   coordinate at the sigma the claim requires. Its mean square over that is `noise_ratio` (1 for an
   honest node); a one-sided chi-square test on d x pairs degrees of freedom fails a node whose noise
   is too small (p < 0.05 / (k + 1)). Two identical updates (`identical_pairs`) mean the noise is not
   fresh at all.
3. The seed replay: for each pair the auditor also trains the message as a node that used the seeds
   the server sent would; a reply equal to that (`replay_matches`) is noise the server can remove.
   Neither 2's identical updates nor 3's matches can happen by chance with secret noise.

`fault` makes the node under audit deliberately broken (sigma / 2, / 4, / 10, or server-known seeds),
which measures the audit's own power: `fedpeft audit --fault sigma/2` must fail.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft.config import ConfigError, Spec

__all__ = [
    "AUDIT_SPEC", "FAULT_NAMES", "AuditResult", "audit", "clopper_pearson", "epsilon_lower_bound", "format_table",
    "noise_power",
]  # fmt: skip

# One client on a tiny random BERT and synthetic data: seconds per hundred trials on a CPU.
AUDIT_SPEC = {
    "name": "audit",
    "federation.rounds": 1,
    "federation.clients": 1,
    "federation.clients_per_round": 1,
    "model.name": "tiny-bert",
    "model.max_length": 16,
    "data.name": "synthetic",
    "data.partition": "iid",
    "data.test_size": 50,
    "strategy.name": "fedavg",
    "train.local_steps": 10,
    "train.batch_size": 32,  # = the size of D: q = 1, every step sees every example (the strongest game)
    "train.lr": 0.5,
    "privacy.clip": 1.0,
}
CANARY = {"text": "zqx zqx zqx canary zqx zqx", "label": 1}
ALPHA = 0.05  # the audit's false-failure rate, split over its statistics (Bonferroni)
FAULT_NAMES = ("sigma/2", "sigma/4", "sigma/10", "seeded")  # fedpeft.flower.audit_node.FAULTS


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a binomial rate."""
    from scipy.stats import beta

    alpha = 1 - confidence
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lo, hi


def epsilon_lower_bound(false_pos: int, false_neg: int, trials: int, delta: float, confidence: float = 0.95) -> float:
    """The epsilon any (epsilon, delta)-DP mechanism must have for a test with these error counts
    on `trials` trials per side, at the Clopper-Pearson bounds (0 when nothing is shown)."""
    fpr = clopper_pearson(false_pos, trials, confidence)[1]
    fnr = clopper_pearson(false_neg, trials, confidence)[1]
    bounds = [0.0]
    for a, b in ((fnr, fpr), (fpr, fnr)):
        if 1 - delta - a > 0 and b > 0:
            bounds.append(math.log((1 - delta - a) / b))
    return max(bounds)


def _errors(out: list[float], inn: list[float], threshold: float, sign: float) -> tuple[int, int]:
    """(false positives, false negatives) of `sign * score > threshold` means "canary in"."""
    fp = sum(sign * s > threshold for s in out)
    fn = sum(sign * s <= threshold for s in inn)
    return fp, fn


def _best_test(out: list[float], inn: list[float]) -> tuple[float, float]:
    """The threshold and direction with the fewest errors on the selection half."""
    best = (math.inf, 0.0, 1.0)
    for sign in (1.0, -1.0):
        candidates = sorted({sign * s for s in out + inn})
        for threshold in [candidates[0] - 1.0, *candidates]:
            fp, fn = _errors(out, inn, threshold, sign)
            if fp + fn < best[0]:
                best = (fp + fn, threshold, sign)
    return best[1], best[2]


@dataclass
class AuditResult:
    claim: float  # the epsilon the spec asks for (inf: the control)
    delta: float
    trials: int  # per side
    bounds: dict[str, float] = field(default_factory=dict)  # statistic -> epsilon lower bound (Bonferroni)
    accuracy: dict[str, float] = field(default_factory=dict)  # statistic -> held-out accuracy of its test
    fault: str | None = None  # the deliberately broken node audited, if any
    pairs: int = 0  # the noise check's pairs (0: not run)
    noise_ratio: float = math.nan  # observed / claimed noise variance (1: honest)
    noise_p: float = math.nan  # one-sided chi-square p-value of "the noise is at least the claim's"
    noise_df: int = 0
    identical_pairs: int = 0  # pairs whose two updates were equal: no fresh noise
    replay_matches: int = 0  # replies equal to the server's replay from the seeds it sent

    @property
    def statistics(self) -> int:
        return len(self.bounds) + (1 if self.pairs else 0)

    @property
    def failures(self) -> list[str]:
        """Why the audit fails the node (empty: it passes)."""
        if not math.isfinite(self.claim):
            return []
        why = [f"{k}: epsilon >= {v:.2f} > claim {self.claim:g}" for k, v in self.bounds.items() if v > self.claim]
        if self.pairs and self.noise_p < ALPHA / self.statistics:
            why.append(f"noise: variance {self.noise_ratio:.3g} x the claim's (p = {self.noise_p:.2g})")
        if self.identical_pairs:
            why.append(f"noise: {self.identical_pairs} of {self.pairs} pairs gave the same update twice")
        if self.replay_matches:
            why.append(f"seeds: {self.replay_matches} of {self.pairs} replies replayed from the server's seeds")
        return why

    def to_dict(self) -> dict:
        return {"claim": self.claim if math.isfinite(self.claim) else "control (no noise)", "delta": self.delta,
                "trials_per_side": self.trials, "bounds": self.bounds, "accuracy": self.accuracy,
                "fault": self.fault, "pairs": self.pairs, "noise_ratio": self.noise_ratio, "noise_p": self.noise_p,
                "noise_df": self.noise_df, "identical_pairs": self.identical_pairs,
                "replay_matches": self.replay_matches, "failures": self.failures}  # fmt: skip


def noise_power(df: int, statistics: int, spec: Spec, size: int) -> dict[str, float]:
    """The noise check's power: the sigma factor below which it fails a node with 95% probability,
    and the epsilon such a node really spends at the claim's q and steps."""
    from scipy.stats import chi2

    from fedpeft.build import client_budget
    from fedpeft.flower.audit_node import noise_check_spec
    from fedpeft.privacy.accounting import epsilon

    crit = float(chi2.ppf(ALPHA / statistics, df))  # fail below this sum of squares (variance ratio 1 scale)
    ratio = crit / float(chi2.ppf(0.95, df))  # a variance ratio this low is below crit 95% of the time
    one = noise_check_spec(spec, size)
    budget = client_budget(one, 0, size)  # calibrated for every round of the check's game, as the node does
    factor, steps = math.sqrt(ratio), one.federation.rounds * one.train.local_steps
    spent = epsilon(((budget.sigma * factor, budget.q, steps),), spec.privacy.delta, spec.privacy.accountant)
    return {"sigma_factor": factor, "epsilon_spent": spent}


def audit(
    spec: Spec,
    trials: int,
    no_noise: bool = False,
    size: int = 32,
    on_trial: Callable[[int, int], None] | None = None,
    pairs: int = 10,
    fault: str | None = None,
) -> AuditResult:
    """Play the game `trials` times per side on `spec`'s client training (`size` examples in D), then
    the noise check and the replay on `pairs` pairs (none for the control); `fault` breaks the node."""
    from fedpeft.data import load_raw
    from fedpeft.flower.audit_node import FAULTS, broken, game_scores, noise_check

    if fault is not None and fault not in FAULTS:
        raise ConfigError(f"unknown fault {fault!r}; valid: {', '.join(FAULTS)}")
    if no_noise:
        spec = spec.with_flat({"privacy.epsilon": math.inf})
    raw = load_raw(spec.data)
    if len(raw.texts) <= size:
        raise ConfigError(f"the audit needs more than {size} examples; {spec.data.name} has {len(raw.texts)}")
    texts, labels = raw.texts[:size], raw.labels[:size]
    result = AuditResult(spec.privacy.epsilon, spec.privacy.delta, trials, fault=fault)
    with tempfile.TemporaryDirectory(prefix="fedpeft-audit-") as tmp:
        with broken(fault):
            scores = game_scores(spec, trials, size, Path(tmp), texts, labels, CANARY, on_trial)
        if not no_noise and pairs:
            for key, value in noise_check(spec, pairs, size, Path(tmp), texts, labels, fault).items():
                setattr(result, key, value)
    half = trials // 2
    k = len(scores) + (1 if result.pairs else 0)
    for key, (out, inn) in sorted(scores.items()):
        threshold, sign = _best_test(out[:half], inn[:half])
        fp, fn = _errors(out[half:], inn[half:], threshold, sign)
        m = trials - half
        result.bounds[key] = epsilon_lower_bound(fp, fn, m, result.delta, 1 - ALPHA / k)
        result.accuracy[key] = 1 - (fp + fn) / (2 * m)
    return result


def format_table(results: list[AuditResult]) -> str:
    """One row per statistic, one column per audit: the empirical epsilon lower bound, then the noise
    check, the replay and the verdict."""
    keys = sorted({k for r in results for k in r.bounds})
    heads = [("control" if not math.isfinite(r.claim) else f"claim {r.claim:g}") + (f" {r.fault}" if r.fault else "")
             for r in results]  # fmt: skip
    lines = [f"trials per side: {', '.join(str(r.trials) for r in results)}; delta {results[0].delta:g}; "
             f"empirical epsilon lower bound per statistic (Clopper-Pearson at {1 - ALPHA:.0%} overall, Bonferroni)"]  # fmt: skip
    lines.append(f"{'statistic':24s}" + "".join(f"{h:>18s}" for h in heads))
    for key in keys:
        cells = "".join(f"{r.bounds[key]:18.2f}" if key in r.bounds else f"{'-':>18s}" for r in results)
        lines.append(f"{key:24s}{cells}")
    rows = [("noise variance / claim", lambda r: f"{r.noise_ratio:.3g}"), ("noise p (too small)", lambda r: f"{r.noise_p:.2g}"),
            ("identical pairs", lambda r: f"{r.identical_pairs}/{r.pairs}"), ("seed replays", lambda r: f"{r.replay_matches}/{r.pairs}"),
            ("verdict", lambda r: "control" if not math.isfinite(r.claim) else "FAIL" if r.failures else "pass")]  # fmt: skip
    for name, cell in rows:
        lines.append(
            f"{name:24s}" + "".join(f"{cell(r) if r.pairs or name == 'verdict' else '-':>18s}" for r in results)
        )
    return "\n".join(lines)
