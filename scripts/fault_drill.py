"""Fault drill: one bad node must neither end a federation nor get a bad update aggregated.

    .venv/bin/python scripts/fault_drill.py [--rounds 3] [--out docs/benchmarks/fault-drill.json]

A small federation (tiny random BERT, synthetic data, 4 clients on 4 nodes, DP-SGD at epsilon 8,
the default update bound) runs in process with the real ClientApp behind fedpeft.flower.local's
grid, once clean and once per fault kind. Node 103 (client 3, rank 4 of 8) is the bad one: its
train replies are tampered with in every round (malformed records, hostile numbers, hostile
tensors), or it crashes, goes silent past the timeout, or an impostor claims its partition. The
drill counts federations that ended with an exception (must be 0), rounds in which a tampered
update was aggregated (must be 0), and prints each run's final accuracy beside the clean run's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from fedpeft.build import public_size  # noqa: E402
from fedpeft.client import DPSGD, train_client  # noqa: E402
from fedpeft.config import Spec  # noqa: E402
from fedpeft.federation import Federation  # noqa: E402
from fedpeft.flower import wire  # noqa: E402
from fedpeft.flower.executor import FlowerExecutor  # noqa: E402
from fedpeft.flower.local import LocalGrid  # noqa: E402
from fedpeft.state import LORA_A, LORA_B, AdapterState, ClientUpdate, kind_of  # noqa: E402
from fedpeft.validation import at_rank, change_and_bound, expected_reply, noise_ratio, outlier_factor, padding  # noqa: E402

BAD_NODE, BAD_CLIENT = 103, 3
DRILL_SPEC = {
    "name": "drill", "federation.clients": 4, "federation.clients_per_round": 4, "federation.timeout": 1.0,
    "model.name": "tiny-bert", "model.max_length": 24, "model.client_ranks": "8,8,8,4", "data.name": "synthetic",
    "data.partition": "iid", "data.test_size": 300, "strategy.name": "fedavg", "privacy.epsilon": 8.0,
    "train.local_steps": 5, "train.batch_size": 16, "train.lr": 0.5,
    "federation.node_ids": [100, 101, 102, 103],  # bound, as scripts/deploy_local.py binds its nodes
}  # fmt: skip
Tamper = Callable[[Message, Message], Message]


def _content(reply: Message) -> RecordDict:
    return reply.content.copy() if not reply.has_error() else RecordDict()


def _replace(reply: Message, request: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=request)


def _status(refused: object) -> Tamper:
    def tamper(request: Message, reply: Message) -> Message:
        content = _content(reply)
        content[wire.STATUS] = ConfigRecord({} if refused is None else {wire.REFUSED: refused})
        return _replace(reply, request, content)

    return tamper


def _metric(key: str, value: object) -> Tamper:
    """Set (or, with value None, drop) one metric of the bad client."""

    def tamper(request: Message, reply: Message) -> Message:
        content = _content(reply)
        metrics = dict(content[wire.metrics_key(BAD_CLIENT)].items())
        metrics.pop(key, None)
        if value is not None:
            metrics[key] = value
        content[wire.metrics_key(BAD_CLIENT)] = MetricRecord(metrics)
        return _replace(reply, request, content)

    return tamper


def _drop_metrics(request: Message, reply: Message) -> Message:
    content = _content(reply)
    del content[wire.metrics_key(BAD_CLIENT)]
    return _replace(reply, request, content)


def _tensors(change: Callable[[dict, dict], dict]) -> Tamper:
    """Rewrite the bad client's uploaded tensors from (uploaded, sent)."""

    def tamper(request: Message, reply: Message) -> Message:
        content = _content(reply)
        sent = wire.from_record(request.content[wire.ADAPTER])
        upload = wire.from_record(content[wire.update_key(BAD_CLIENT)])
        content[wire.update_key(BAD_CLIENT)] = ArrayRecord({k: v.contiguous() for k, v in change(upload, sent).items()})
        return _replace(reply, request, content)

    return tamper


def scale_change(upload: dict, sent: dict, factor: float, rank: int | None) -> dict:
    """The client's change from where it started, times `factor` (a scaled, finite attack)."""
    start = {n: at_rank(sent[n], kind_of(n), rank) for n in upload}
    return {n: start[n] + factor * (t - start[n]) for n, t in upload.items()}


def _scaled(factor: float) -> Tamper:
    return _tensors(lambda up, sent: scale_change(up, sent, factor, rank=4))  # client 3's rank


def _first(change: Callable[[torch.Tensor], torch.Tensor]) -> Tamper:
    def edit(up: dict, sent: dict) -> dict:
        name = next(n for n in sorted(up) if ".lora_" in n)
        return {**up, name: change(up[name])}

    return _tensors(edit)


def _padded(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    padding(t, LORA_A if t.shape[0] == 8 else LORA_B, 4).fill_(0.01)  # past client 3's rank 4
    return t


def _forged_scores(request: Message, reply: Message) -> Message:
    """A FedSA node's evaluate reply with 30 clients it does not hold at accuracy 1.0 and its own
    client's accuracy 1e300 (before: summary.json reported 0.9685 against a clean 0.7217)."""
    content = _content(reply)
    for cid in range(1000, 1030):
        content[wire.metrics_key(cid)] = MetricRecord({"accuracy": 1.0, "loss": 0.0})
    content[wire.metrics_key(BAD_CLIENT)] = MetricRecord({"accuracy": 1e300, "loss": 0.0})
    return _replace(reply, request, content)


def _count_scores(executor: FlowerExecutor) -> list[tuple[int, bool]]:
    """Record each personalised evaluation's (scores read, any outside [0, 1])."""
    read: list[tuple[int, bool]] = []
    inner = executor.evaluate_personal

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        scores = inner(*args, **kwargs)
        read.append((len(scores), any(not 0 <= s["accuracy"] <= 1 for s in scores)))
        return scores

    executor.evaluate_personal = counted
    return read


def _missing_tensor(up: dict, sent: dict) -> dict:
    return {n: t for i, (n, t) in enumerate(sorted(up.items())) if i}


def _then(*tampers: Tamper) -> Tamper:
    def tamper(request: Message, reply: Message) -> Message:
        for t in tampers:
            reply = t(request, reply)
        return reply

    return tamper


# a node that lies about its own numbers to widen the bound it is checked against (one example, no
# sigma: before the server checked replies against what it expects, 12.4 -> 2,812), sending an
# inflated flip that only the wider bound would let through
_LYING = _then(_metric(wire.NUM_EXAMPLES, 1), _metric("sigma", None), _scaled(-200.0))
_ALL_PADDED = _tensors(lambda up, sent: {n: _padded(t) if ".lora_" in n else t for n, t in up.items()})


FAULTS: dict[str, Tamper | str] = {
    "status without refused": _status(None),
    "refused not JSON": _status("{not json"),
    "refused a JSON list": _status("[1, 2]"),
    "metrics record missing": _drop_metrics,
    "num_examples missing": _metric(wire.NUM_EXAMPLES, None),
    "num_examples NaN": _metric(wire.NUM_EXAMPLES, math.nan),
    "num_examples inf": _metric(wire.NUM_EXAMPLES, math.inf),
    "num_examples 1e12": _metric(wire.NUM_EXAMPLES, 10**12),
    "num_examples a float": _metric(wire.NUM_EXAMPLES, 3.5),
    "num_examples zero": _metric(wire.NUM_EXAMPLES, 0),
    "epsilon NaN": _metric("epsilon", math.nan),
    "epsilon negative": _metric("epsilon", -1.0),
    "rank out of range": _metric(wire.RANK, 99),
    "update NaN": _first(lambda t: t.fill_(math.nan)),
    "update inf": _first(lambda t: t.fill_(math.inf)),
    "update wrong shape": _first(lambda t: t[:, :-1].clone()),
    "update wrong dtype": _first(lambda t: t.double()),
    "update tensor missing": _tensors(_missing_tensor),
    "update x10": _scaled(10.0),
    "update x1e6": _scaled(1e6),
    "padded components non-zero": _first(_padded),
    "lies: 1 example, no sigma, x-200": _LYING,
    "rank lie: claims 8, padding full": _then(_ALL_PADDED, _metric(wire.RANK, 8)),
    "rank left out, padding full": _then(_ALL_PADDED, _metric(wire.RANK, None)),
    "sigma lie: sigma_max, -5.5x": "sigma lie",
    "metric key with a newline and escapes": _metric("x\n\x1b[31mround 9: client 0: accepted\x1b[0m", 1.0),
    "metric key of 200 kB": _metric("k" * 200_000, 1.0),
    "forged evaluation (FedSA)": "forged evaluation",
    "crash": "crash",
    "silent past the timeout": "silent",
    "duplicate identity": "impostor",
    "impostor connects first": "impostor first",
    "first claims 0 of 1 (all)": "all of one",
}


ATTACKS = ("inflated flip", "directed flip", "flip at the edge", "directed at the edge")
# (strategy.robust, federation.outlier_norm): the plain mean unfiltered, and each rule behind the
# default norm filter under DP (outlier_norm 0 = auto = 1.5)
DEFENCES = (("mean", math.inf), ("mean", 0.0), ("median", 0.0), ("centered-clip", 0.0))


class AttackExecutor:
    """An in-process executor whose client 3 attacks every round (the others and client 3's own
    draws are as in a clean run of the same seed, so the two differ only in what client 3 sends):

    - `x10`: ten times its real change (outside the bound: must be dropped);
    - `inflated flip`: its real (noised) change, negated and scaled to 0.99 of the norm bound the
      server holds it to, the largest flip the bound lets through;
    - `directed flip`: the node runs its DP-SGD with the noise left out (clipped, noise-free: the
      direction of its data's gradient), negates that change and scales it to 0.99 of the bound,
      spending on direction the norm an honest client spends on noise;
    - `flip at the edge`, `directed at the edge`: the same two, scaled instead to 0.99 of what the
      norm filter (federation.outlier_norm) lets through given the other clients' norms this round
      (an attacker that knows the filter and the honest norms, which DP makes predictable)."""

    def __init__(self, fed: Federation, attack: str) -> None:
        self.fed, self.inner, self.attack = fed, fed.executor, attack

    def __getattr__(self, name: str):  # noqa: ANN204 - the rest of the executor contract
        return getattr(self.inner, name)

    def run_round(self, round_num, client_ids, global_state, plan, seeds, on_client=None):  # noqa: ANN001, ANN201
        results = self.inner.run_round(round_num, client_ids, global_state, plan, seeds, on_client)
        sent, bad = dict(global_state.tensors), next((r for r in results if r.client_id == BAD_CLIENT), None)
        if bad is None or not hasattr(bad, "tensors"):
            return results
        if self.attack == "x10":
            bad.tensors = scale_change(bad.tensors, sent, 10.0, bad.rank)
            return results
        probe = copy.copy(bad)
        if self.attack.startswith("directed"):
            probe.tensors = self._clean_change(round_num, global_state, plan, seeds)
        fed, uploads = self.fed, list(self.fed.plan.uploads)
        expect = expected_reply(fed.spec, fed.plan, self.inner.store, BAD_CLIENT)
        norm, bound = change_and_bound(probe, uploads, global_state, fed._limits, expect)
        if self.attack.endswith("edge"):  # the filter's median with client 3 on top: the next two's mean
            others = sorted(
                noise_ratio(r, uploads, global_state, r.metrics.get("sigma")) for r in results if r is not bad
            )
            edge = outlier_factor(fed.spec) * (others[-2] + others[-1]) / 2
            own = noise_ratio(probe, uploads, global_state, bad.metrics.get("sigma"))
            target = min(bound, norm * edge / own)
        else:
            target = bound
        bad.tensors = scale_change(probe.tensors, sent, -0.99 * target / norm, bad.rank)
        return results

    def _clean_change(self, round_num, global_state, plan, seeds):  # noqa: ANN001, ANN202
        store, budget = self.inner.store, self.inner.store.budget(BAD_CLIENT)
        update = train_client(
            self.inner.model, store.start_state(BAD_CLIENT, global_state), store.data[BAD_CLIENT], plan,
            client_id=BAD_CLIENT, seed=seeds[BAD_CLIENT] + 1, dp=DPSGD(0.0, self.inner.clip, budget.size or None),
            rank=store.ranks[BAD_CLIENT], round_num=round_num,
        )  # fmt: skip
        return update.tensors


def attack_runs(spec: Spec, runs: list[tuple[str, str | None]], out: Path, log: Callable[[str], None] = print) -> list:
    """In process, seeded: one federation per (defence, attack or None for clean). Each row: the
    accuracy after the last round, the mean over the last three, and how often client 3 was aggregated."""
    rows = []
    for (robust, outlier), attack in runs:
        run_spec = spec.with_flat({"strategy.robust": robust, "federation.outlier_norm": outlier})
        defence = defence_name(robust, outlier)
        fed = Federation.build(run_spec)
        if attack is not None:
            fed.executor = AttackExecutor(fed, attack)
        tic = time.perf_counter()
        result = fed.run(
            out / f"{defence}-{attack or 'clean'}-{spec.federation.seed}".replace(" ", "-").replace(",", "")
        )
        scored = [r["accuracy"] for r in result.history if r["accuracy"] is not None]
        rows.append({
            "defence": defence, "attack": attack or "(clean)", "seed": spec.federation.seed,
            "accuracy": scored[-1], "accuracy_last3": sum(scored[-3:]) / len(scored[-3:]),
            "client_3_aggregated": sum(BAD_CLIENT in r["clients"] for r in result.history),
            "seconds": time.perf_counter() - tic,
        })  # fmt: skip
        r = rows[-1]
        log(f"seed {r['seed']} {defence:30s} {r['attack']:20s} accuracy {r['accuracy']:.4f} last3 "
            f"{r['accuracy_last3']:.4f} client 3 aggregated {r['client_3_aggregated']}x ({r['seconds']:.0f} s)")  # fmt: skip
    return rows


def defence_name(robust: str, outlier: float) -> str:
    return f"{robust}, " + ("no norm filter" if math.isinf(outlier) else f"norm filter {outlier or 'auto'}")


def scaled_client_accuracy(rounds: int, spec: Spec | None = None) -> dict:
    """In process, seeded: the final accuracy clean, with client 3 of 4 scaled x10 under the
    default update bound and norm filter, and with both off (what the attack does unchecked)."""
    spec = spec or drill_spec(rounds)
    out = {}
    with tempfile.TemporaryDirectory(prefix="fedpeft-drill-") as tmp:
        for label, off, attack in (("clean", 0.0, False), ("x10, default checks", 0.0, True),
                                   ("x10, bound and filter off", math.inf, True)):  # fmt: skip
            fed = Federation.build(spec.with_flat({"federation.update_bound": off, "federation.outlier_norm": off}))
            if attack:
                fed.executor = AttackExecutor(fed, "x10")
            result = fed.run(Path(tmp) / label.replace(" ", "-").replace(",", ""))
            out[label] = {
                "accuracy": result.history[-1]["accuracy"],
                "client_3_aggregated": sum(BAD_CLIENT in r["clients"] for r in result.history),
            }
    return out


def drill_spec(rounds: int) -> Spec:
    return Spec().with_flat({**DRILL_SPEC, "federation.rounds": rounds})


def run_one(spec: Spec, fault: str | None, out: Path, attack: Callable[[Federation], Tamper] | None = None) -> dict:
    """One federation through the real ClientApp with node 103 doing `fault` (or, from `attack`, a
    tamper made once the federation is built: one that needs the server's public numbers)."""
    grid = LocalGrid(4, state_dir=out / "nodes")
    kind = FAULTS.get(fault) if fault else None
    if kind == "crash":
        grid.crash.add(BAD_NODE)
    elif kind == "silent":
        grid.silent.add(BAD_NODE)
    elif kind == "impostor":
        grid.add_node(200, BAD_CLIENT)  # claims partition 3, already held by node 103
    elif kind == "impostor first":
        grid.add_node(50, BAD_CLIENT)  # asked before node 103: claims partition 3 first
    elif kind == "all of one":
        grid.add_node(50, 0, num_partitions=1)  # asked first: claims every client
    elif kind == "sigma lie":
        attack = _sigma_lie
    elif kind == "forged evaluation":  # FedSA: the nodes score their personalised models
        spec = spec.with_flat({"strategy.name": "fedsa"})
        grid.tamper_evaluate[BAD_NODE] = _forged_scores
    elif kind is not None:
        grid.tamper[BAD_NODE] = kind
    row = {"fault": fault or "(clean)", "ended": False, "bad_aggregated": 0, "accuracy": None, "dropped": ""}
    try:
        fed = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0))
        if attack is not None:
            grid.tamper[BAD_NODE] = attack(fed)
        read = _count_scores(fed.executor)
        result = fed.run(out / "run")
    except Exception as exc:  # the drill's failure: a fault that ended the federation
        row.update(ended=True, error=f"{type(exc).__name__}: {exc}"[:300])
        return row
    history = result.history
    row["accuracy"] = history[-1]["accuracy"]
    row["client_3_aggregated"] = sum(BAD_CLIENT in r["clients"] for r in history)
    scored = [r["accuracy"] for r in history if r["accuracy"] is not None]
    row["accuracy_last3"] = sum(scored[-3:]) / len(scored[-3:])
    impostor = {"impostor": 200, "impostor first": 50, "all of one": 50}.get(kind)
    if (fault is not None or attack is not None) and impostor is None:  # every round's reply from node 103 was bad
        row["bad_aggregated"] = sum(BAD_CLIENT in r["clients"] for r in history)
        row["dropped"] = history[-1]["dropped"].get(str(BAD_CLIENT), "")[:140]
    if kind == "forged evaluation":  # evaluations that read a score past the 4 clients', or outside [0, 1]
        row["bad_aggregated"] = sum(n > 4 or bad for n, bad in read)
        row["dropped"] = f"{sum(n for n, _ in read)} scores read in {len(read)} evaluations"
    if impostor is not None:  # the impostor must never have been asked to train
        row["bad_aggregated"] = sum(1 for nid, t in grid.calls if nid == impostor and t == "train")
        row["dropped"] = "impostor refused" if not row["bad_aggregated"] else "impostor trained"
    return row


def run_drill(
    rounds: int = 3, faults: list[str] | None = None, log: Callable[[str], None] = print, scaled: bool = True
) -> dict:
    spec = drill_spec(rounds)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-drill-") as tmp:
        for i, fault in enumerate([None, *(faults if faults is not None else FAULTS)]):
            tic = time.perf_counter()
            row = run_one(spec, fault, Path(tmp) / f"run-{i}")
            row["seconds"] = time.perf_counter() - tic
            rows.append(row)
            acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
            log(f"{row['fault']:32s} ended {row['ended']!s:5s} bad aggregated {row['bad_aggregated']}  accuracy {acc}"
                f"  {row['dropped'] or row.get('error', '')}")  # fmt: skip
    clean = rows[0]["accuracy"]
    scaled = scaled_client_accuracy(rounds) if scaled else {}
    for label, r in scaled.items():
        log(
            f"in process, seeded: {label:20s} accuracy {r['accuracy']:.4f}  client 3 aggregated {r['client_3_aggregated']}x"
        )
    return {
        "scaled_client_in_process": scaled,
        "spec": spec.to_dict(),
        "faults_injected": len(rows) - 1,
        "federations_ended": sum(r["ended"] for r in rows),
        "bad_updates_aggregated": sum(r["bad_aggregated"] for r in rows),
        "clean_accuracy": clean,
        "largest_accuracy_gap": max(abs(r["accuracy"] - clean) for r in rows if r["accuracy"] is not None),
        "runs": rows,
    }


def defence_table(rounds: int, seeds: int, out: Path) -> dict:
    """Every defence clean and under the attacks inside the bound, paired by seed: the mean over
    seeds of the last three rounds' accuracy, and each attack's cost against the plain mean's clean
    run of the same seed (the honest reference), with its standard error."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-defences-") as tmp:
        for seed in range(seeds):
            spec = drill_spec(rounds).with_flat({"federation.seed": seed})
            rows += attack_runs(spec, [(d, a) for d in DEFENCES for a in (None, *ATTACKS)], Path(tmp))
            out.write_text(json.dumps({"rounds": rounds, "seeds": seed + 1, "runs": rows}, indent=2) + "\n")

    def last3(defence: str, attack: str) -> list[float]:
        return [r["accuracy_last3"] for r in rows if r["defence"] == defence and r["attack"] == attack]

    table, reference = {}, last3(defence_name(*DEFENCES[0]), "(clean)")
    for name in (defence_name(*d) for d in DEFENCES):
        for attack in ("(clean)", *ATTACKS):
            cost = [v - c for v, c in zip(last3(name, attack), reference, strict=True)]
            se = statistics.stdev(cost) / math.sqrt(len(cost)) if len(cost) > 1 else math.nan
            table[f"{name} / {attack}"] = t = {
                "last3": statistics.mean(last3(name, attack)), "cost": statistics.mean(cost), "cost_se": se,
                "worst_seed": min(cost),
            }  # fmt: skip
            print(f"{name:30s} {attack:20s} last3 {t['last3']:.4f}  vs clean mean {100 * t['cost']:+5.1f} "
                  f"+- {100 * se:.1f} points (worst seed {100 * t['worst_seed']:+.1f})")  # fmt: skip
    report = {"rounds": rounds, "seeds": seeds, "spec": drill_spec(rounds).to_dict(), "table": table, "runs": rows}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


# Attacks on the Flower path (the real ClientApp; node 103 tampers with its own reply, knowing only
# public values and its own change): what a remote node can do that an in-process client cannot is
# lie about the numbers its bound is computed from
def _sigma_lie(fed: Federation) -> Tamper:
    """Claim the largest honest sigma (the spec's, at q = 1: it would widen the bound and the filter's
    unit of noise when the server divided by the node's word) and send -5.5x its own change."""
    sigma_max = fed._limits.dp[3]
    return _then(_metric("sigma", sigma_max), _scaled(-5.5))


def _flip_at_bound(fed: Federation) -> Tamper:
    """Its own (noised) change, negated and scaled to 0.99 of the norm bound the server computes from
    public values (the spec and the client's public size), with its honest numbers."""

    def edit(up: dict, sent: dict) -> dict:
        known = (public_size(fed.spec, BAD_CLIENT, len(fed.data.clients[BAD_CLIENT])), fed.sigmas[BAD_CLIENT])
        expect = expected_reply(fed.spec, fed.plan, None, BAD_CLIENT, known)
        update = ClientUpdate(BAD_CLIENT, expect.num_examples or 1, up, {"sigma": known[1]}, rank=4)
        state = AdapterState(sent, fed.spec.model.rank, fed.spec.model.alpha, ())
        norm, bound = change_and_bound(update, list(fed.plan.uploads), state, fed._limits, expect)
        return scale_change(up, sent, -0.99 * bound / norm, rank=4)

    return _tensors(edit)


FLOWER_ATTACKS: dict[str, Callable[[Federation], Tamper]] = {
    "sigma lie, -5.5x": _sigma_lie,
    "flip at the bound": _flip_at_bound,
    "flip -1.4x (under the filter)": lambda fed: _scaled(-1.4),
}


def flower_defence_table(rounds: int, repeats: int, out: Path) -> dict:
    """Every defence clean and under each Flower-path attack, `repeats` times (federation.seed =
    repeat; the nodes' noise is secret, so runs are not paired: each cost is the difference of means,
    with its standard error from both arms)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-flower-defences-") as tmp:
        for seed in range(repeats):
            for robust, outlier in DEFENCES:
                spec = drill_spec(rounds).with_flat(
                    {"federation.seed": seed, "strategy.robust": robust, "federation.outlier_norm": outlier}
                )
                for attack in (None, *FLOWER_ATTACKS):
                    tic = time.perf_counter()
                    where = Path(tmp) / f"{seed}-{robust}-{outlier}-{attack}".replace(" ", "-").replace(",", "")
                    row = run_one(spec, None, where, FLOWER_ATTACKS.get(attack or ""))
                    row.update(defence=defence_name(robust, outlier), attack=attack or "(clean)", seed=seed,
                               seconds=time.perf_counter() - tic)  # fmt: skip
                    rows.append(row)
                    acc = "-" if row["accuracy"] is None else f"{row['accuracy_last3']:.4f}"
                    print(f"repeat {seed} {row['defence']:30s} {row['attack']:30s} last3 {acc} client 3 aggregated "
                          f"{row.get('client_3_aggregated')}/{rounds} ({row['seconds']:.0f} s) {row['dropped'][:80]}",
                          flush=True)  # fmt: skip
                out.write_text(json.dumps({"rounds": rounds, "repeats": seed + 1, "runs": rows}, indent=2) + "\n")

    def last3(defence: str, attack: str) -> list[float]:
        return [r["accuracy_last3"] for r in rows if r["defence"] == defence and r["attack"] == attack]

    def aggregated(defence: str, attack: str) -> int:
        return sum(r.get("client_3_aggregated", 0) for r in rows if r["defence"] == defence and r["attack"] == attack)

    table, reference = {}, last3(defence_name(*DEFENCES[1]), "(clean)")  # the default's clean runs
    for name in (defence_name(*d) for d in DEFENCES):
        for attack in ("(clean)", *FLOWER_ATTACKS):
            arm = last3(name, attack)
            se = math.sqrt(statistics.variance(arm) / len(arm) + statistics.variance(reference) / len(reference))
            table[f"{name} / {attack}"] = t = {
                "last3": statistics.mean(arm), "cost": statistics.mean(arm) - statistics.mean(reference), "cost_se": se,
                "client_3_aggregated": aggregated(name, attack),
                "rounds": rounds * len(arm),
            }  # fmt: skip
            agg = f" client 3 aggregated {t['client_3_aggregated']}/{t['rounds']}"
            print(f"{name:30s} {attack:30s} last3 {t['last3']:.4f}  vs the default's clean {100 * t['cost']:+5.1f} "
                  f"+- {100 * se:.1f} points{agg}")  # fmt: skip
    report = {"path": "Flower (LocalGrid + the real ClientApp)", "rounds": rounds, "repeats": repeats,
              "spec": drill_spec(rounds).to_dict(), "table": table, "runs": rows}  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "fault-drill.json"))
    parser.add_argument(
        "--quickstart-seeds", type=int, default=0,
        help="also measure one x10 client of four on the quickstart (MiniLM cut to 2 layers) over this many seeds",
    )  # fmt: skip
    parser.add_argument(
        "--defences", type=int, default=0, metavar="SEEDS",
        help="instead: every defence (strategy.robust) clean and under each attack inside the bound, "
        "over this many seeds, at --rounds; writes attack-defences.json beside --out",
    )  # fmt: skip
    parser.add_argument(
        "--flower-defences", type=int, default=0, metavar="REPEATS",
        help="instead: every defence clean and under each Flower-path attack (the sigma lie among them), "
        "through the real ClientApp, this many repeats, at --rounds; writes attack-defences-flower.json",
    )  # fmt: skip
    args = parser.parse_args()
    if args.rounds < 1 or min(args.defences, args.quickstart_seeds, args.flower_defences) < 0:
        parser.error("--rounds must be >= 1, --defences, --flower-defences and --quickstart-seeds >= 0")
    torch.set_num_threads(1)
    if args.flower_defences:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        target = Path(args.out).with_name("attack-defences-flower.json")
        flower_defence_table(args.rounds, args.flower_defences, target)
        return
    if args.defences:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        defence_table(args.rounds, args.defences, Path(args.out).with_name("attack-defences.json"))
        return
    if args.quickstart_seeds:
        from fedpeft.spec_io import default_spec

        rows = {}
        for seed in range(args.quickstart_seeds):
            spec = default_spec().with_flat({"model.layers": 2, "federation.seed": seed})
            rows[seed] = scaled_client_accuracy(spec.federation.rounds, spec=spec)
            print(f"quickstart (2 layers) seed {seed}: " + ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in rows[seed].items()),
                  flush=True)  # fmt: skip
        Path(args.out).with_name("fault-drill-quickstart.json").write_text(json.dumps(rows, indent=2) + "\n")
    report = run_drill(args.rounds)
    print(
        f"faults injected {report['faults_injected']}, federations ended {report['federations_ended']}, "
        f"bad updates aggregated {report['bad_updates_aggregated']}, clean accuracy {report['clean_accuracy']:.4f}, "
        f"largest accuracy gap {report['largest_accuracy_gap']:.4f} (secret noise: runs differ)"
    )
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(0 if report["federations_ended"] == 0 and report["bad_updates_aggregated"] == 0 else 1)


if __name__ == "__main__":
    main()
