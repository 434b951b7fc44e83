"""An empirical privacy audit: can anyone who sees a node's reply tell D from D + one canary?

The distinguishing game runs on the real path a Flower node takes: the ClientApp, handed a train
message, trains its one client on its own data file (D, or D plus one canary example) with the
node's secret randomness, and replies through the wire module. Each trial is an independent node
(a fresh ledger). Every trial's reply is scored by

- canary_gradient: <update - start, -g>, g the canary's loss gradient at the start adapter (the
  direction one step on the canary moves the uploaded tensors);
- canary_loss: minus the canary's loss under the uploaded tensors;
- reply.<key>: every other value the reply carries (epsilon, sigma, num_examples, ...).

For each score the first half of the trials picks a threshold and a direction; on the second half,
Clopper-Pearson 95% bounds on the false-positive and false-negative rates give a lower bound on
epsilon: max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR)) at the bounds' worst. A
DP mechanism at (epsilon, delta) keeps it below epsilon with 95% confidence (per statistic). The
control (`no_noise`) runs the same path with privacy off: no clipping, no noise, diagnostics sent,
so its bounds show what the audit sees when there is a leak.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fedpeft.config import ConfigError, Spec

__all__ = ["AUDIT_SPEC", "AuditResult", "audit", "clopper_pearson", "epsilon_lower_bound", "format_table"]

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


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a binomial rate."""
    from scipy.stats import beta

    alpha = 1 - confidence
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lo, hi


def epsilon_lower_bound(false_pos: int, false_neg: int, trials: int, delta: float) -> float:
    """The epsilon any (epsilon, delta)-DP mechanism must have for a test with these error counts
    on `trials` trials per side, at the 95% Clopper-Pearson bounds (0 when nothing is shown)."""
    fpr = clopper_pearson(false_pos, trials)[1]
    fnr = clopper_pearson(false_neg, trials)[1]
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
    bounds: dict[str, float] = field(default_factory=dict)  # statistic -> epsilon lower bound
    accuracy: dict[str, float] = field(default_factory=dict)  # statistic -> held-out accuracy of its test

    def to_dict(self) -> dict:
        return {"claim": self.claim if math.isfinite(self.claim) else "control (no noise)", "delta": self.delta,
                "trials_per_side": self.trials, "bounds": self.bounds, "accuracy": self.accuracy}  # fmt: skip


def _write_data(path: Path, texts: list[str], labels: list[int], canary: bool) -> None:
    rows = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)] + ([CANARY] if canary else [])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def audit(
    spec: Spec,
    trials: int,
    no_noise: bool = False,
    size: int = 32,
    on_trial: Callable[[int, int], None] | None = None,
) -> AuditResult:
    """Play the game `trials` times per side on `spec`'s client training (`size` examples in D)."""
    from flwr.app import Context, Message, MessageType, RecordDict

    from fedpeft.data import DATASETS
    from fedpeft.flower import client_app, wire
    from fedpeft.flower.local import outside_a_supernode, pushed
    from fedpeft.flower.node import Node

    if no_noise:
        spec = spec.with_flat({"privacy.epsilon": math.inf})
    outside_a_supernode(run_id=0)
    claim, delta = spec.privacy.epsilon, spec.privacy.delta
    node = Node()
    spec_json = wire.spec_to_json(spec)
    worker = node.worker(spec_json)
    app = client_app.make_app(node)
    raw = DATASETS.get(spec.data.name)()
    if len(raw.texts) <= size:
        raise ConfigError(f"the audit needs more than {size} examples; {spec.data.name} has {len(raw.texts)}")
    texts, labels = raw.texts[:size], raw.labels[:size]
    start = worker.template
    uploads = set(worker.plan.uploads)
    adapter = wire.to_record({n: t for n, t in start.tensors.items() if n not in worker.plan.keeps})
    canary_ids, canary_mask = worker.model.tokenizer.encode_batch([CANARY["text"]], spec.model.max_length)
    canary_label = torch.tensor([CANARY["label"]])

    def canary_loss(state) -> float:  # noqa: ANN001
        worker.model.load(state)
        with torch.no_grad():
            return float(F.cross_entropy(worker.model.forward(canary_ids, canary_mask), canary_label))

    # the canary's gradient at the start adapter, on the uploaded tensors
    worker.model.load(start)
    worker.model.module.eval()
    trained = worker.model.set_trainable(set(worker.plan.trains))
    params = dict(zip(trained, worker.model.trainable_parameters(), strict=True))
    loss = F.cross_entropy(worker.model.forward(canary_ids, canary_mask), canary_label)
    names = [n for n in trained if n in uploads]
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    direction = {n: -g.detach().cpu() for n, g in zip(names, grads, strict=True)}
    worker.model.set_trainable(set())

    scores: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fedpeft-audit-") as tmp:
        files = {False: Path(tmp) / "d.jsonl", True: Path(tmp) / "d-canary.jsonl"}
        for with_canary, path in files.items():
            _write_data(path, texts, labels, with_canary)
        for trial in range(2 * trials):
            with_canary = bool(trial % 2)  # interleaved, so drift cannot masquerade as a difference
            # each trial is its own world: its own state dir (no lifetime ledger across trials), and
            # the policy of a node that may train without DP (the control) and without a lifetime cap
            config = {wire.PARTITION_ID: 0, wire.NUM_PARTITIONS: 1, "data-file": str(files[with_canary]),
                      "public-size": size, "state-dir": str(Path(tmp) / f"ledgers-{trial}"),
                      "allow-no-dp": "true", "max-epsilon": math.inf}  # fmt: skip
            context = Context(run_id=trial, node_id=1, node_config=config, state=RecordDict(), run_config={})
            message = pushed(Message(wire.train_message(1, [0], spec_json, adapter, [trial]), 1, MessageType.TRAIN))
            reply = app(message, context)
            result = wire.read_train_reply(reply.content, 0, 1)
            values = {f"reply.{k}": float(v) for k, v in result.metrics.items()}
            values["reply.num_examples"] = float(result.num_examples)
            update = result.tensors
            values["canary_gradient"] = sum(
                float(((update[n] - start.tensors[n]) * direction[n]).sum()) for n in direction
            )
            values["canary_loss"] = -canary_loss(start.with_tensors(update))
            for key, value in values.items():
                scores.setdefault(key, ([], []))[int(with_canary)].append(value)
            if on_trial is not None:
                on_trial(trial + 1, 2 * trials)

    result = AuditResult(claim, delta, trials)
    half = trials // 2
    for key, (out, inn) in sorted(scores.items()):
        threshold, sign = _best_test(out[:half], inn[:half])
        fp, fn = _errors(out[half:], inn[half:], threshold, sign)
        m = trials - half
        result.bounds[key] = epsilon_lower_bound(fp, fn, m, delta)
        result.accuracy[key] = 1 - (fp + fn) / (2 * m)
    return result


def format_table(results: list[AuditResult]) -> str:
    """One row per statistic, one column per audited claim: the empirical epsilon lower bound."""
    keys = sorted({k for r in results for k in r.bounds})
    heads = [("control" if not math.isfinite(r.claim) else f"claim {r.claim:g}") for r in results]
    lines = [f"trials per side: {', '.join(str(r.trials) for r in results)}; delta {results[0].delta:g}; "
             "empirical epsilon lower bound (95% Clopper-Pearson) per statistic"]  # fmt: skip
    lines.append(f"{'statistic':24s}" + "".join(f"{h:>14s}" for h in heads))
    for key in keys:
        cells = "".join(f"{r.bounds[key]:14.2f}" if key in r.bounds else f"{'-':>14s}" for r in results)
        lines.append(f"{key:24s}{cells}")
    return "\n".join(lines)
