"""The round loop: sample -> train -> validate -> aggregate -> evaluate -> account -> checkpoint -> log.

One loop for every way of running; only the executor changes. Every random choice derives from
(spec seed, round, client), never from a running RNG, so a run resumed from a checkpoint takes
exactly the path an uninterrupted run takes. Assembly lives in fedpeft.build, run files in
fedpeft.runfiles, update checks in fedpeft.validation.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft import runfiles, traffic
from fedpeft.adapters import AdaptedModel
from fedpeft.build import build_parts, client_budgets, make_executor, public_size
from fedpeft.causal import lm_summary, write_generations
from fedpeft.client import LocalTraining, evaluate
from fedpeft.config import ConfigError, Spec, client_rank
from fedpeft.data import FederatedData
from fedpeft.executors import ClientFailure, Executor, SecureSum
from fedpeft.privacy.client_level import ClientLevelDP
from fedpeft.spec_io import run_diff
from fedpeft.state import BASE, AdapterState, ClientUpdate, kind_of
from fedpeft.strategies import Strategy
from fedpeft.summary import nan_mean, run_summary, server_epsilons
from fedpeft.validation import UpdateLimits, expected_reply, norm_outliers, outlier_factor, spec_limits, validate_update

__all__ = ["Callbacks", "Federation", "RunResult", "sample_clients", "seed_for"]

log = logging.getLogger("fedpeft")


def seed_for(seed: int, *parts: int) -> int:
    """A 31-bit seed derived from the run seed and a path (round, client, purpose)."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


def sample_clients(seed: int, round_num: int, num_clients: int, per_round: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed_for(seed, round_num, 0))
    return sorted(torch.randperm(num_clients, generator=generator)[:per_round].tolist())


@dataclass
class _Progress:
    """Everything a resumed run needs besides the spec and the clients' own state."""

    state: AdapterState
    server_state: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    epsilons: dict[int, float] = field(default_factory=dict)  # latest epsilon each node reported (its word)
    steps: dict[int, int] = field(default_factory=dict)  # DP-SGD steps of every update that reached the server
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
    client_dp: ClientLevelDP | None = field(default=None)  # client-level DP-FedAvg (privacy.client_epsilon)

    @classmethod
    def build(cls, spec: Spec, executor: Executor | None = None) -> Federation:
        """Validate names and options, load the model and data, calibrate sigma per client."""
        if spec.federation.secagg and executor is None:
            raise ConfigError(
                "federation.secagg is Flower's SecAgg+ between the server and its nodes: run it with `flwr run .` "
                "(Flower's simulation or a deployment), not in-process"
            )
        parts = build_parts(spec)
        budgets = client_budgets(spec, parts.data.clients)
        if executor is None:
            executor = make_executor(spec, parts.model, parts.data.clients, parts.data.num_labels, budgets)
        sigmas = [b.sigma for b in budgets] if budgets else None
        client_dp = ClientLevelDP.from_spec(spec, secret=executor.noise == "secret")  # Flower's: always secret
        return cls(spec, parts.model, parts.data, parts.strategy, executor, parts.plan, sigmas, client_dp)

    # ---------------------------------------------------------------------------------------
    def run(self, out: Path, resume: bool = False, callbacks: Callbacks | None = None) -> RunResult:
        """Run (or resume) all rounds, writing rounds.jsonl and a checkpoint after each round and
        summary.json plus the PEFT adapter at the end; a run that fails before its first checkpoint
        leaves no directory it made. `out` is locked, then checked (runfiles.check_out): a finished
        run, or an unfinished one without `resume`, is never overwritten, however two runs are timed."""
        created = not out.exists()
        with runfiles.locked(out):  # a second run on `out` fails here, having touched nothing
            try:
                runfiles.check_out(out, resume)
                return self._run(out, resume, callbacks or Callbacks())
            except BaseException:
                if created and not runfiles.has_checkpoint(out):
                    shutil.rmtree(out, ignore_errors=True)  # no round finished: nothing worth keeping
                raise

    def _run(self, out: Path, resume: bool, callbacks: Callbacks) -> RunResult:
        spec, fed = self.spec, self.spec.federation
        base, server_state = self.strategy.init(self.model.state(), fed.seed)  # the model is still untrained
        if resume:
            ckpt = runfiles.load_checkpoint(out)
            if diff := run_diff(Spec.from_dict(ckpt["spec"]), spec):  # a sweep's [sweep] table may grow
                raise ConfigError("cannot resume with a different spec; " + diff)
            run = _Progress(**ckpt["progress"])
            self.executor.load_client_states(ckpt["client_states"])
        else:
            run = _Progress(state=base, server_state=server_state)

        for rnd in range(len(run.history) + 1, fed.rounds + 1):
            tic = time.perf_counter()
            # sample (Poisson under client-level DP, as its accountant assumes)
            if self.client_dp is not None:
                sampled = self.client_dp.sample(seed_for(fed.seed, rnd, 0))
            else:
                sampled = sample_clients(fed.seed, rnd, fed.clients, fed.clients_per_round)
            if callbacks.on_round_start:
                callbacks.on_round_start(rnd, sampled)
            # train
            seeds = {cid: seed_for(fed.seed, rnd, cid + 1) for cid in sampled}
            on_client = functools.partial(callbacks.on_client_done, rnd) if callbacks.on_client_done else None
            train_tic = time.perf_counter()
            results = self.executor.run_round(rnd, sampled, run.state, self.plan, seeds, on_client)
            train_seconds = time.perf_counter() - train_tic
            if fed.secagg and any(type(r) is ClientUpdate for r in results):
                raise RuntimeError("under federation.secagg the executor returned an individual update")
            bytes_down = sum(self._download_bytes(run, cid) for cid in sampled)
            # validate
            accepted, dropped = self._validate(rnd, results, run.state)
            # under secure aggregation one SecureSum stands for its members; else each update for itself
            secure = next((u for u in accepted if isinstance(u, SecureSum)), None)
            reports = sorted(secure.members.items()) if secure else [(u.client_id, u.metrics) for u in accepted]
            # aggregate
            strategy_metrics: dict[str, float] = {}
            norms: list[float] = []  # client-level DP: the updates' norms before clipping (curator's log)
            z_round = self.client_dp.noise_multiplier if self.client_dp is not None else None
            aggregated = len(reports) >= fed.min_clients or (self.client_dp is not None and not fed.secagg)
            if aggregated:  # under central client-level DP: one noised mean of the clipped updates, even of none
                updates = accepted
                if self.client_dp is not None and secure is not None:  # distributed: the nodes noised it
                    updates = [self.client_dp.finish(secure, run.state, len(reports))]
                    z_round = self.client_dp.realised(len(reports), secure.noise_shares)
                elif self.client_dp is not None:
                    seed = seed_for(fed.seed, rnd, 0, 1)
                    noised, norms = self.client_dp.aggregate(accepted, run.state, list(self.plan.uploads), seed)
                    updates = [noised]
                run.state, run.server_state, strategy_metrics = self.strategy.aggregate(
                    run.state, updates, rnd, run.server_state
                )
                k = self.strategy.base_change_rank(len(reports), run.state.rank)  # its base-weight change's rank
                run.base_bytes.append(traffic.base_change_bytes(k, run.state))
            else:
                run.base_bytes.append(0.0)
                log.warning(
                    "round %d: only %d valid update(s) < min_clients=%d; global adapter unchanged",
                    rnd, len(reports), fed.min_clients,
                )  # fmt: skip
            # evaluate: every eval_every rounds (on the seeded subset, if any) and the last (the whole split)
            scored_on = None if rnd % fed.eval_every and rnd < fed.rounds else self._scored_on(rnd)
            metrics = self._evaluate(run.state, scored_on) if scored_on else {"accuracy": None, "loss": None}
            # account: every update that left a node spent its steps, aggregated or dropped
            for r in (r for r in results if isinstance(r, ClientUpdate)):
                for cid in r.members if isinstance(r, SecureSum) else [r.client_id]:
                    run.steps[cid] = run.steps.get(cid, 0) + self.plan.steps
            run.epsilons |= {cid: float(m["epsilon"]) for cid, m in reports if "epsilon" in m}
            ours = server_epsilons(self, run.steps)
            run.elapsed += time.perf_counter() - tic
            record = {
                "round": rnd,
                **metrics,
                "scored_on": scored_on,  # "whole" (the test split), "subset" (federation.eval_subset) or None
                "epsilon_max": max(ours.values(), default=0.0) if ours is not None else None,
                "client_epsilon": self._client_epsilon(run.history, z_round),
                **({"client_noise_multiplier": z_round} if z_round is not None else {}),
                **({"client_update_norm_median": float(np.median(norms))} if norms else {}),
                "clients": [cid for cid, _ in reports],
                "dropped": {str(k): v for k, v in dropped.items()},
                "aggregated": aggregated,
                "train_loss": nan_mean([m.get("train_loss", math.nan) for _, m in reports]),
                "bytes_up": sum(
                    traffic.upload_bytes(u, run.state, spec.model.rank) * (len(reports) if secure else 1)
                    for u in accepted
                ),
                "bytes_down": bytes_down,
                "adapter_change": self.model.relative_change(run.state),  # mean ||W - W0|| / ||W0||
                "seconds": time.perf_counter() - tic,
                "train_seconds": train_seconds,  # the executor's part: sending, client training, receiving
                **{f"strategy.{k}": v for k, v in strategy_metrics.items()},
            }
            run.history.append(record)
            # checkpoint, then log: the log never runs ahead of what a resume restores
            ckpt = {"spec": spec.to_dict(), "progress": vars(run), "client_states": self.executor.client_states()}
            runfiles.save_checkpoint(out, ckpt)
            runfiles.write_rounds(out, run.history)
            if callbacks.on_round_end:
                callbacks.on_round_end(record)

        summary = run_summary(self, run.history, run.steps, run.epsilons, run.elapsed)
        if self.data.test.is_sequence:  # a causal LM: the base model's scores, greedy answers of base and final
            answers = write_generations(self.model, base, run.state, self.data.test_pairs, out)
            scores = evaluate(self.model, base, self.data.test, spec.train.eval_batch_size)  # FedSA: none kept yet
            summary |= lm_summary(scores, summary["loss"], answers)
        self.model.export(run.state, out, label_names=self.data.label_names)
        runfiles.write_json(out / runfiles.SUMMARY, summary)
        return RunResult(summary, run.history, run.state)

    def _validate(self, rnd: int, results: list, state: AdapterState) -> tuple[list[ClientUpdate], dict[int, str]]:
        """Split results into sound updates and dropped clients (with the reason, logged)."""
        accepted: list[ClientUpdate] = []
        dropped: dict[int, str] = {}
        for result in results:
            if isinstance(result, ClientFailure):
                dropped[result.client_id] = result.reason
            elif (reason := self._check(result, state)) is not None:
                dropped[result.client_id] = f"update rejected: {reason}"
            else:
                accepted.append(result)
                continue
            log.warning("round %d: client %d: %s", rnd, result.client_id, dropped[result.client_id])
        if (factor := outlier_factor(self.spec)) and not any(isinstance(u, SecureSum) for u in accepted):
            # per unit of noise: sigma scales an SGD or momentum client's noise (checked: the server's own
            # value); Adam's steps are lr-sized whatever the noise, so there only sqrt(d) counts
            adam = self.plan.local_optimizer.name in ("adam", "adamw")
            sigmas = {u.client_id: None if adam or not self.sigmas else self.sigmas[u.client_id] for u in accepted}
            for cid, why in norm_outliers(accepted, list(self.plan.uploads), state, sigmas, factor).items():
                dropped[cid] = f"update rejected: {why}"
                log.warning("round %d: client %d: %s", rnd, cid, dropped[cid])
            accepted = [u for u in accepted if u.client_id not in dropped]
        return accepted, dropped

    def _check(self, update: ClientUpdate, state: AdapterState) -> str | None:
        noised = self.client_dp is not None  # a SecureSum under distributed client-level DP carries noise
        cid, store = update.client_id, getattr(self.executor, "store", None)
        known = (public_size(self.spec, cid, len(self.data.clients[cid])), self.sigmas[cid]) if self.sigmas else None
        expect = expected_reply(self.spec, self.plan, store, cid, known)
        return validate_update(update, list(self.plan.uploads), state, self._limits, noised, expect)

    def _client_epsilon(self, history: list[dict[str, Any]], z_round: float | None) -> float | None:
        """Client-level epsilon after this round, from every round's realised noise multiplier."""
        if self.client_dp is None:
            return None
        return self.client_dp.epsilon(len(history) + 1, [r["client_noise_multiplier"] for r in history] + [z_round])

    @functools.cached_property
    def _limits(self) -> UpdateLimits:
        return spec_limits(self.spec, self.plan)

    def _scored_on(self, rnd: int) -> str:
        fed = self.spec.federation
        return "subset" if rnd < fed.rounds and 0 < fed.eval_subset < len(self.data.test) else "whole"

    def _evaluate(self, state: AdapterState, scored_on: str = "whole") -> dict[str, float]:
        """The global model on the server's test split (or its seeded subset of eval_subset rows, the
        same every round). For strategies whose clients keep part of the adapter (FedSA), the mean
        over the personalised models of the clients that trained."""
        fed = self.spec.federation
        test = self.data.test.sample(fed.eval_subset, seed_for(fed.seed, 0, 0, 2)) if scored_on == "subset" else None
        on_test = functools.partial(
            evaluate,
            self.model,
            data=self.data.test if test is None else test,
            batch_size=self.spec.train.eval_batch_size,
        )
        scores = self.executor.evaluate_personal(state, self.plan, on_test) if self.strategy.personal else []
        if not scores:
            return on_test(state)
        keys = [k for k in scores[0] if all(k in s for s in scores)]  # a node may send accuracy and loss only
        return {key: sum(s[key] for s in scores) / len(scores) for key in keys}

    def _download_bytes(self, run: _Progress, cid: int) -> int:
        """What a sampled client received: the adapter (at its rank, without what it keeps) and the
        factored base-weight changes of every round since it last took part."""
        sent = [n for n in run.state.tensors if kind_of(n) != BASE and n not in self.plan.keeps]
        missed = run.base_bytes[run.last_sync.get(cid, 0) :]
        run.last_sync[cid] = len(run.base_bytes)
        return traffic.download_bytes(run.state, sent, client_rank(self.spec.model, cid), self.spec.model.rank, missed)
