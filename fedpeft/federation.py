"""The round loop: sample -> train -> validate -> aggregate -> evaluate -> account -> checkpoint -> log.

One loop for every way of running; only the executor changes. Every random choice derives from
(spec seed, round, client), never from a running RNG, so a run resumed from a checkpoint takes
exactly the path an uninterrupted run takes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.adapters import AdaptedModel
from fedpeft.client import LocalTraining, evaluate
from fedpeft.config import ConfigError, Spec, client_rank, spec_diff
from fedpeft.data import DATASETS, FederatedData, prepare
from fedpeft.executors import ClientFailure, Executor, SequentialExecutor
from fedpeft.models import MODELS
from fedpeft.privacy.accounting import ClientBudget, calibrate_budget
from fedpeft.state import BASE, HEAD, LORA_A, LORA_B, AdapterState, ClientUpdate, kind_of
from strategies import STRATEGIES, Strategy, make_strategy

__all__ = [
    "Federation",
    "RunResult",
    "check_names",
    "client_budget",
    "make_plan",
    "sample_clients",
    "seed_for",
    "validate_update",
]

log = logging.getLogger("fedpeft")

CHECKPOINT = "checkpoint.pt"
ROUNDS = "rounds.jsonl"
SUMMARY = "summary.json"
EXECUTORS = ("sequential", "cohort")


def seed_for(seed: int, *parts: int) -> int:
    """A 31-bit seed derived from the run seed and a path (round, client, purpose)."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


def sample_clients(seed: int, round_num: int, num_clients: int, per_round: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed_for(seed, round_num, 0))
    return sorted(torch.randperm(num_clients, generator=generator)[:per_round].tolist())


def make_plan(spec: Spec, strategy: Strategy, state: AdapterState) -> LocalTraining:
    """What every client does in a round: the strategy's trainable and uploaded tensors, the
    tensors it keeps locally, and the spec's local SGD."""
    trains = set(strategy.trains) | ({HEAD} if spec.model.train_head else set())
    return LocalTraining(
        steps=spec.train.local_steps,
        batch_size=spec.train.batch_size,
        lr=spec.train.lr,
        trains=frozenset(trains),
        uploads=tuple(strategy.uploads(state, spec.model.train_head)),
        keeps=tuple(n for n in state.tensors if kind_of(n) in strategy.personal),
    )


def client_budget(spec: Spec, client_id: int, num_examples: int) -> ClientBudget:
    """A client's DP-SGD budget, calibrated for the worst case: it trains in every round. A
    client computes its own from the spec and its data size alone (Flower nodes do)."""
    priv = spec.privacy
    return calibrate_budget(
        client_id, num_examples, spec.train.batch_size, spec.federation.rounds, spec.train.local_steps,
        priv.epsilon, priv.delta, priv.accountant,
    )  # fmt: skip


def build_parts(spec: Spec) -> tuple[Strategy, AdaptedModel, FederatedData, LocalTraining]:
    """What both the server and a Flower node build from a spec: the strategy, the model with its
    adapter, the data (test split and every client's partition) and the clients' plan."""
    check_names(spec)
    strategy = make_strategy(spec.strategy.name, spec.strategy.kwargs)
    fed = spec.federation
    raw = DATASETS.get(spec.data.name)()
    model = AdaptedModel(spec.model, num_labels=len(raw.label_names), seed=fed.seed, device=fed.device)
    data = prepare(spec.data, fed.clients, model.tokenizer, spec.model.max_length, fed.seed, raw=raw)
    return strategy, model, data, make_plan(spec, strategy, model.state())


def make_executor(
    spec: Spec, model: AdaptedModel, clients: list, num_labels: int, budgets: list[ClientBudget | None] | None
) -> Executor:
    """The in-process executor the spec asks for (`federation.executor`), over `clients`' data."""
    fed = spec.federation
    ranks = [client_rank(spec.model, cid) for cid in range(fed.clients)]
    if fed.executor == "cohort":
        from fedpeft.executors.cohort import CohortExecutor

        return CohortExecutor(
            spec.model, num_labels, fed.seed, clients, budgets, spec.privacy.clip, ranks,
            device=model.device, chunk=fed.cohort_chunk,
        )  # fmt: skip
    return SequentialExecutor(model, clients, budgets, spec.privacy.clip, ranks)


def check_names(spec: Spec) -> None:
    """Unknown registry names fail before any work, each listing the valid ones."""
    MODELS.get(spec.model.name)
    DATASETS.get(spec.data.name)
    STRATEGIES.get(spec.strategy.name)
    if spec.federation.executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {spec.federation.executor!r}; valid: {', '.join(EXECUTORS)}")


def validate_update(update: ClientUpdate, expected: list[str], reference: AdapterState) -> str | None:
    """Why `update` must not be aggregated, or None if it is sound."""
    if set(update.tensors) != set(expected):
        missing, extra = set(expected) - set(update.tensors), set(update.tensors) - set(expected)
        return f"wrong tensors (missing {sorted(missing)[:2]}, unexpected {sorted(extra)[:2]})"
    if not (isinstance(update.num_examples, int) and update.num_examples > 0):
        return f"num_examples must be a positive integer (got {update.num_examples!r})"
    for name in expected:
        tensor, ref = update.tensors[name], reference.tensors[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != ref.shape:
            shape = getattr(tensor, "shape", type(tensor).__name__)
            return f"{name}: shape {tuple(shape)} != expected {tuple(ref.shape)}"
        if tensor.dtype != ref.dtype:
            return f"{name}: dtype {tensor.dtype} != expected {ref.dtype}"
        if not torch.isfinite(tensor).all():
            return f"{name}: non-finite values (NaN or inf)"
    return None


@dataclass
class _Progress:
    """Everything a resumed run needs besides the spec and the clients' own state."""

    state: AdapterState
    server_state: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    epsilons: dict[int, float] = field(default_factory=dict)  # latest epsilon reported per client
    base_bytes: list[float] = field(default_factory=list)  # factored base-weight change, per round
    last_sync: dict[int, int] = field(default_factory=dict)  # client -> rounds of base changes it has
    elapsed: float = 0.0


@dataclass
class RunResult:
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    state: AdapterState


@dataclass
class Callbacks:
    """Optional progress hooks; the loop itself never prints."""

    on_round_start: Callable[[int, list[int]], None] | None = None
    on_client_done: Callable[[int, int], None] | None = None
    on_round_end: Callable[[dict[str, Any]], None] | None = None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


@dataclass
class Federation:
    """A federation built from a spec: model, data, strategy, client budgets, executor."""

    spec: Spec
    model: AdaptedModel
    data: FederatedData
    strategy: Strategy
    executor: Executor
    plan: LocalTraining
    sigmas: list[float] | None = field(default=None)

    @classmethod
    def build(cls, spec: Spec, executor: Executor | None = None) -> Federation:
        """Validate names and options, load the model and data, calibrate sigma per client."""
        strategy, model, data, plan = build_parts(spec)
        budgets = None
        if spec.privacy.enabled:
            budgets = [client_budget(spec, cid, len(c)) for cid, c in enumerate(data.clients)]
        if executor is None:
            executor = make_executor(spec, model, data.clients, data.num_labels, budgets)
        sigmas = [b.sigma for b in budgets] if budgets else None
        return cls(spec, model, data, strategy, executor, plan, sigmas)

    # ---------------------------------------------------------------------------------------
    def run(self, out: Path, resume: bool = False, callbacks: Callbacks | None = None) -> RunResult:
        """Run (or resume) all rounds, writing rounds.jsonl and a checkpoint after each round and
        summary.json plus the PEFT adapter at the end. A run that fails or is interrupted before
        its first checkpoint leaves no directory behind (unless `out` existed before)."""
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            return self._run(out, resume, callbacks or Callbacks())
        except BaseException:
            if created and not (out / CHECKPOINT).is_file():
                shutil.rmtree(out, ignore_errors=True)  # no round finished: nothing worth keeping
            raise

    def _run(self, out: Path, resume: bool, callbacks: Callbacks) -> RunResult:
        spec, fed = self.spec, self.spec.federation
        if resume:
            ckpt = torch.load(out / CHECKPOINT, weights_only=False)
            _check_same_spec(Spec.from_dict(ckpt["spec"]), spec)
            run = _Progress(**ckpt["progress"])
            self.executor.load_client_states(ckpt["client_states"])
        else:
            state, server_state = self.strategy.init(self.model.state(), fed.seed)
            run = _Progress(state=state, server_state=server_state)

        for rnd in range(len(run.history) + 1, fed.rounds + 1):
            tic = time.perf_counter()
            # sample
            sampled = sample_clients(fed.seed, rnd, fed.clients, fed.clients_per_round)
            if callbacks.on_round_start:
                callbacks.on_round_start(rnd, sampled)
            # train
            seeds = {cid: seed_for(fed.seed, rnd, cid + 1) for cid in sampled}
            on_client = functools.partial(callbacks.on_client_done, rnd) if callbacks.on_client_done else None
            train_tic = time.perf_counter()
            results = self.executor.run_round(rnd, sampled, run.state, self.plan, seeds, on_client)
            train_seconds = time.perf_counter() - train_tic
            bytes_down = sum(self._download_bytes(run, cid) for cid in sampled)
            # validate
            accepted, dropped = self._validate(rnd, results, run.state)
            # aggregate
            strategy_metrics: dict[str, float] = {}
            aggregated = len(accepted) >= fed.min_clients
            if aggregated:
                run.state, run.server_state, strategy_metrics = self.strategy.aggregate(
                    run.state, accepted, rnd, run.server_state
                )
                run.base_bytes.append(strategy_metrics.pop("base_bytes", 0.0))
            else:
                run.base_bytes.append(0.0)
                log.warning(
                    "round %d: only %d valid update(s) < min_clients=%d; global adapter unchanged",
                    rnd, len(accepted), fed.min_clients,
                )  # fmt: skip
            # evaluate
            metrics = self._evaluate(run.state)
            # account
            for update in accepted:
                if "epsilon" in update.metrics:
                    run.epsilons[update.client_id] = float(update.metrics["epsilon"])
                if "sigma" in update.metrics and self.sigmas is not None:  # a node's own (its own data size)
                    self.sigmas[update.client_id] = float(update.metrics["sigma"])
            run.elapsed += time.perf_counter() - tic
            record = {
                "round": rnd,
                **metrics,
                "epsilon_max": max(run.epsilons.values()) if run.epsilons else (0.0 if self.sigmas else None),
                "clients": [u.client_id for u in accepted],
                "dropped": {str(k): v for k, v in dropped.items()},
                "aggregated": aggregated,
                "train_loss": _mean([u.metrics.get("train_loss", math.nan) for u in accepted]),
                "bytes_up": sum(self._upload_bytes(u, run.state) for u in accepted),
                "bytes_down": bytes_down,
                "seconds": time.perf_counter() - tic,
                "train_seconds": train_seconds,  # the executor's part: sending, client training, receiving
                **{f"strategy.{k}": v for k, v in strategy_metrics.items()},
            }
            run.history.append(record)
            # checkpoint, then log: the log never runs ahead of what a resume restores
            ckpt = {"spec": spec.to_dict(), "progress": vars(run), "client_states": self.executor.client_states()}
            atomic_write(out / CHECKPOINT, functools.partial(torch.save, ckpt))
            lines = "".join(json.dumps(jsonable(r)) + "\n" for r in run.history)
            atomic_write(out / ROUNDS, functools.partial(Path.write_text, data=lines))
            if callbacks.on_round_end:
                callbacks.on_round_end(record)

        summary = self._summary(run.history, run.epsilons, run.elapsed)
        self.model.export(run.state, out)
        atomic_write(out / SUMMARY, lambda p: p.write_text(json.dumps(jsonable(summary), indent=2) + "\n"))
        return RunResult(summary, run.history, run.state)

    def _validate(self, rnd: int, results: list, state: AdapterState) -> tuple[list[ClientUpdate], dict[int, str]]:
        """Split results into sound updates and dropped clients (with the reason, logged)."""
        accepted: list[ClientUpdate] = []
        dropped: dict[int, str] = {}
        for result in results:
            if isinstance(result, ClientFailure):
                dropped[result.client_id] = result.reason
            elif (reason := validate_update(result, list(self.plan.uploads), state)) is not None:
                dropped[result.client_id] = f"update rejected: {reason}"
            else:
                accepted.append(result)
                continue
            log.warning("round %d: client %d: %s", rnd, result.client_id, dropped[result.client_id])
        return accepted, dropped

    def _evaluate(self, state: AdapterState) -> dict[str, float]:
        """The global model on the server's test split. For strategies whose clients keep part of
        the adapter (FedSA), the mean over the personalised models of the clients that trained."""
        batch = self.spec.train.eval_batch_size
        scores: list[dict[str, float]] = []
        if self.strategy.personal and hasattr(self.executor, "evaluate_personal"):  # kept on remote nodes
            scores = self.executor.evaluate_personal(state, self.plan)
        elif self.strategy.personal:
            personal = self.executor.personal_states()
            scores = [
                evaluate(self.model, state.with_tensors(t), self.data.test, batch) for _, t in sorted(personal.items())
            ]
        if not scores:
            return evaluate(self.model, state, self.data.test, batch)
        return {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}

    def _bytes(self, state: AdapterState, name: str, rank: int | None) -> int:
        """Bytes of one tensor as it travels to or from a client of `rank`: LoRA factors at that rank."""
        fraction = rank / self.spec.model.rank if rank is not None and kind_of(name) in (LORA_A, LORA_B) else 1.0
        return int(state.num_bytes([name]) * fraction)

    def _upload_bytes(self, update: ClientUpdate, state: AdapterState) -> int:
        """Bytes a client sent."""
        return sum(self._bytes(state, name, update.rank) for name in update.tensors)

    def _download_bytes(self, run: _Progress, cid: int) -> int:
        """Bytes a sampled client received: the adapter (at its rank, without what it keeps) plus
        the factored base-weight changes of every round since it last took part."""
        rank = client_rank(self.spec.model, cid)
        sent = [n for n in run.state.tensors if kind_of(n) != BASE and n not in self.plan.keeps]
        total = sum(self._bytes(run.state, name, rank) for name in sent)
        total += int(sum(run.base_bytes[run.last_sync.get(cid, 0) :]))
        run.last_sync[cid] = len(run.base_bytes)
        return total

    def _summary(self, history: list[dict[str, Any]], epsilons: dict[int, float], elapsed: float) -> dict[str, Any]:
        spec = self.spec
        last = history[-1]
        return {
            "name": spec.name,
            "strategy": spec.strategy.name,
            "rounds": len(history),
            "accuracy": last["accuracy"],
            "loss": last["loss"],
            "best_accuracy": max(r["accuracy"] for r in history),
            "majority_rate": self.data.majority_rate,
            "epsilon": (max(epsilons.values()) if epsilons else 0.0) if spec.privacy.enabled else None,
            "epsilon_per_client": {str(k): v for k, v in sorted(epsilons.items())} if spec.privacy.enabled else None,
            "target_epsilon": spec.privacy.epsilon if spec.privacy.enabled else None,
            "delta": spec.privacy.delta if spec.privacy.enabled else None,
            "sigma_per_client": self.sigmas,
            "seed": spec.federation.seed,
            "clients": [len(c) for c in self.data.clients],
            "test_examples": len(self.data.test),
            "bytes_up": sum(r["bytes_up"] for r in history),
            "bytes_down": sum(r["bytes_down"] for r in history),
            "seconds": elapsed,
            "spec": spec.to_dict(),
        }


def _check_same_spec(saved: Spec, spec: Spec) -> None:
    if saved != spec:
        raise ConfigError("cannot resume with a different spec; " + spec_diff(saved, spec))


def jsonable(obj: Any) -> Any:
    """Make `obj` strict JSON: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else None
