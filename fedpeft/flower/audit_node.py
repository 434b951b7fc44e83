"""The node side of `fedpeft audit` (fedpeft.privacy.audit): fresh nodes behind the real ClientApp,
the distinguishing game's scores, the white-box noise check and the seed replay, and nodes broken
on purpose to measure the audit's power."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from fedpeft.config import Spec

__all__ = ["FAULTS", "AuditNode", "broken", "game_scores", "noise_check", "noise_check_spec", "write_data"]

FAULTS = {"sigma/2": 0.5, "sigma/4": 0.25, "sigma/10": 0.1, "seeded": None}  # a deliberately broken node


def write_data(path: Path, texts: list[str], labels: list[int], canary: dict | None) -> None:
    rows = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)] + ([canary] if canary else [])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@contextmanager
def broken(fault: str | None, seeded: bool = False) -> Iterator[None]:
    """A node broken on purpose while the block runs: its noise scaled (sigma/k) or its randomness the
    seeds the server sent (`seeded`, also the auditor's replay of such a node)."""
    from fedpeft.executors.base import InProcess
    from fedpeft.privacy.randomness import KeyedSource

    scale = FAULTS.get(fault) if fault else None
    normal, seed = KeyedSource.normal, InProcess.seed
    if scale is not None:
        KeyedSource.normal = lambda self, std, *a, **k: normal(self, std * scale, *a, **k)  # type: ignore[method-assign]
    if seeded or fault == "seeded":
        InProcess.seed = lambda self, cid, seeds: seeds[cid]  # type: ignore[method-assign]
    try:
        yield
    finally:
        KeyedSource.normal, InProcess.seed = normal, seed  # type: ignore[method-assign]


class AuditNode:
    """A fresh node per trial (own state dir), through the real ClientApp, on a spec and data files."""

    def __init__(self, spec: Spec, tmp: Path, size: int) -> None:
        from fedpeft.flower import client_app, wire
        from fedpeft.flower.local import outside_a_supernode
        from fedpeft.flower.node import Node

        outside_a_supernode(run_id=0)
        self.spec, self.tmp, self.size, self.trials = spec, tmp, size, 0
        self.spec_json = wire.spec_to_json(spec)
        self.node = Node()
        self.worker = self.node.worker(self.spec_json)
        self.app = client_app.make_app(self.node)
        start = self.worker.template
        self.start = start
        self.adapter = wire.to_record({n: t for n, t in start.tensors.items() if n not in self.worker.plan.keeps})

    def play(self, path: Path, seed: int):  # noqa: ANN201
        """One node's round on the data file `path`, the message carrying `seed`: the parsed reply."""
        from flwr.app import Context, Message, MessageType, RecordDict

        from fedpeft.flower import wire
        from fedpeft.flower.local import pushed

        self.trials += 1
        # each trial is its own world: its own state dir (no lifetime ledger across trials), and the
        # policy of a node that may train without DP (the control) and without a lifetime cap
        config = {wire.PARTITION_ID: 0, wire.NUM_PARTITIONS: 1, "data-file": str(path), "public-size": self.size,
                  "state-dir": str(self.tmp / f"ledgers-{self.trials}"), "allow-no-dp": "true",
                  "max-epsilon": math.inf}  # fmt: skip
        context = Context(run_id=self.trials, node_id=1, node_config=config, state=RecordDict(), run_config={})
        message = wire.train_message(1, [0], self.spec_json, self.adapter, [seed])
        reply = self.app(pushed(Message(message, 1, MessageType.TRAIN)), context)
        return wire.read_train_reply(reply.content, 0, 1)


def game_scores(
    spec: Spec, trials: int, size: int, tmp: Path, texts, labels, canary: dict, on_trial
) -> dict[str, tuple[list, list]]:  # noqa: ANN001
    """The distinguishing game: every statistic's scores (out, in)."""
    node = AuditNode(spec, tmp, size)
    worker, start = node.worker, node.start
    uploads = set(worker.plan.uploads)
    canary_ids, canary_mask = worker.model.tokenizer.encode_batch([canary["text"]], spec.model.max_length)
    canary_label = torch.tensor([canary["label"]])

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
    files = {False: tmp / "d.jsonl", True: tmp / "d-canary.jsonl"}
    for with_canary, path in files.items():
        write_data(path, texts, labels, canary if with_canary else None)
    for trial in range(2 * trials):
        with_canary = bool(trial % 2)  # interleaved, so drift cannot masquerade as a difference
        result = node.play(files[with_canary], trial)
        values = {f"reply.{k}": float(v) for k, v in result.metrics.items()}
        values["reply.num_examples"] = float(result.num_examples)
        update = result.tensors
        values["canary_gradient"] = sum(float(((update[n] - start.tensors[n]) * direction[n]).sum()) for n in direction)
        values["canary_loss"] = -canary_loss(start.with_tensors(update))
        for key, value in values.items():
            scores.setdefault(key, ([], []))[int(with_canary)].append(value)
        if on_trial is not None:
            on_trial(trial + 1, 2 * trials)
    return scores


def noise_check_spec(spec: Spec, size: int) -> Spec:
    """The noise check's game: one step of plain SGD on all of D (q = 1), no dropout."""
    return spec.with_flat({"train.local_steps": 1, "train.batch_size": size, "train.optimizer": "sgd",
                           "train.schedule": "constant", "train.warmup": 0, "model.dropout": 0.0, "name": "audit-noise"})  # fmt: skip


def noise_check(spec: Spec, pairs: int, size: int, tmp: Path, texts, labels, fault: str | None) -> dict:  # noqa: ANN001
    """The white-box noise check and the seed replay (fedpeft.privacy.audit's docstring, 2 and 3)."""
    from scipy.stats import chi2

    from fedpeft.build import client_budget

    one = noise_check_spec(spec, size)
    node = AuditNode(one, tmp / "noise", size)
    path = tmp / "noise.jsonl"
    write_data(path, texts, labels, None)
    sigma, clip, lr = client_budget(one, 0, size).sigma, one.privacy.clip, one.train.lr
    total, count, identical, matches = 0.0, 0, 0, 0
    for pair in range(pairs):
        with broken(fault):
            first, second = node.play(path, 10_000 + pair), node.play(path, 10_000 + pair)
        with broken(None, seeded=True):  # what a node that used the server's seeds would have sent
            replay = node.play(path, 10_000 + pair)
        diff = [(first.tensors[n].double() - second.tensors[n].double()) * size / lr for n in first.tensors]
        if all(float(d.abs().max()) == 0.0 for d in diff):
            identical += 1
        if all(torch.allclose(first.tensors[n], replay.tensors[n], atol=1e-7, rtol=0) for n in first.tensors):
            matches += 1
        total += sum(float(d.pow(2).sum()) for d in diff) / (2 * (sigma * clip) ** 2)
        count += sum(d.numel() for d in diff)
    return {"pairs": pairs, "noise_df": count, "noise_ratio": total / count, "noise_p": float(chi2.cdf(total, count)),
            "identical_pairs": identical, "replay_matches": matches}  # fmt: skip
