"""The cohort executor: all sampled clients of a round train together, in one batched pass.

One frozen base model is shared; every adapted linear layer holds the LoRA factors of all K
clients stacked ([K, r, d_in] and [K, d_out, r]), and the head is stacked per client too. A step
runs every client's Poisson batch at once, packed with no padding rows (owner[i] = the client of
example i) and grouped into a few buckets by length, each padded only to its own longest example
(one forward/backward per bucket; `buckets`: on a CPU groups of 16+, on a GPU 4). Gradients are taken with respect to per-example
copies of the factors (each example gathers its client's factors), so autograd returns every
example's gradient directly: rank-r factors make these small.
DP-SGD then runs per client: clip each example's joint gradient norm to C, sum, add Gaussian noise
sigma_k * C from the client's own generator, divide by the client's expected batch size, and step
the spec's optimizer on it (fedpeft.optim.StackedOptimizer: torch's rules, row k for client k).
Without DP it is the same step without clipping and noise, as on the reference path.

Checked against the sequential reference executor: with noise 0 the updates agree to float
tolerance for every trainable set (A+B, B only, with a head), and the noise has std sigma*C/batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedpeft.client import ClientRefused, LocalTraining, check_budget, poisson_batches, record_spending
from fedpeft.config import ModelConfig
from fedpeft.data.base import TokenizedData
from fedpeft.executors.base import EXECUTORS, ClientFailure, ClientResult, ClientStore, InProcess
from fedpeft.executors.cohort_layers import (
    CohortFamilyLinear,
    CohortHead,
    CohortLinear,
    CohortLoRALinear,
    length_buckets,
)
from fedpeft.families import FAMILIES, inject, replace_linear
from fedpeft.models import build_model, model_entry
from fedpeft.optim import StackedOptimizer
from fedpeft.privacy.accounting import ClientBudget, sample_rate
from fedpeft.privacy.dpsgd import zero_non_finite
from fedpeft.privacy.randomness import Seed, batch_source, combined, noise_source, seed_dropout
from fedpeft.state import HEAD, LORA_A, LORA_B, THETA, AdapterState, ClientUpdate, a_name, b_name, base_name, theta_name

__all__ = ["CohortExecutor"]

_NAME = {LORA_A: a_name, LORA_B: b_name, THETA: theta_name}  # (kind, layer) -> the tensor's name

log = logging.getLogger("fedpeft")


class CohortExecutor(InProcess):
    """Trains a round's sampled clients together on one shared frozen model (CPU or CUDA).

    Holds the same client state as the sequential executor (a ClientStore: privacy ledgers,
    personal tensors, data, ranks) and returns the same ClientUpdates. `chunk` bounds how many clients train at once
    (0: all sampled clients); a cohort that runs out of memory is halved until it fits, and the
    smaller size is kept for later rounds.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_labels: int,
        seed: int,
        clients: list[TokenizedData],
        budgets: list[ClientBudget] | None,
        clip: float,
        ranks: list[int | None] | None = None,
        device: torch.device | str = "cpu",
        chunk: int = 0,
        secret: bool = False,
        buckets: int | None = 0,
    ) -> None:
        self.device = torch.device(device)
        self.store = ClientStore(clients, budgets, ranks)
        self.clip = clip
        self.chunk = chunk
        self.secret = secret  # batches and noise from secret seeds, secure noise (privacy.noise = "secret")
        # buckets by length: on a CPU, cost follows tokens, so as many as allow 16+ examples each
        # (None); on a GPU, a few large ones keep the device busy (4). 0: choose by device.
        self.buckets = buckets if buckets != 0 else (4 if self.device.type == "cuda" else None)
        base, _ = build_model(cfg.name, num_labels, cfg.layers, seed)
        self.model = base.to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        targets = tuple(cfg.targets or model_entry(cfg.name).default_targets)
        scale = cfg.alpha / cfg.rank
        self.layers: dict[str, CohortLinear]
        if FAMILIES.get(cfg.adapter).linear:  # the same layers (frames, PaCA's columns) as AdaptedModel's
            self.layers = inject(
                self.model, cfg.adapter, targets, cfg.rank, scale, cfg.dropout, seed, CohortFamilyLinear
            )
        else:
            self.layers = replace_linear(self.model, targets, lambda _, c: CohortLoRALinear(c, scale, cfg.dropout))
        self.head = CohortHead()
        self.model.head = self.head

    # ---- one chunk of clients --------------------------------------------------------------
    def _load(self, starts: list[AdapterState]) -> None:
        """Stack the clients' starting tensors into the cohort layers (float32, on device)."""
        dev = self.device
        for layer, module in self.layers.items():
            for kind in module.kinds:
                module.stacks[kind] = torch.stack([s.tensors[_NAME[kind](layer)] for s in starts]).to(dev)
            delta = starts[0].tensors.get(base_name(layer))  # base changes are global, the same for all
            with torch.no_grad():
                module.base.weight.copy_(module.w0 + delta.to(dev) if delta is not None else module.w0)
        self.head.weight = torch.stack([s.tensors["head.weight"] for s in starts]).to(dev)
        self.head.bias = torch.stack([s.tensors["head.bias"] for s in starts]).to(dev)

    def _tensors(self) -> dict[str, torch.Tensor]:
        """name -> the stacked [K, ...] tensor (views into the cohort layers)."""
        out: dict[str, torch.Tensor] = {}
        for layer, module in self.layers.items():
            out.update({_NAME[kind](layer): module.stacks[kind] for kind in module.kinds})
        out["head.weight"], out["head.bias"] = self.head.weight, self.head.bias
        return out

    def _truncate(self, ranks: list[int | None]) -> None:
        for k, rank in enumerate(ranks):
            if rank is None:
                continue
            for module in self.layers.values():
                module.stacks[LORA_A][k, rank:] = 0
                module.stacks[LORA_B][k, :, rank:] = 0

    def _train_chunk(
        self,
        cids: list[int],
        starts: list[AdapterState],
        plan: LocalTraining,
        seeds: list[Seed],
        sigmas: list[float] | None,
        round_num: int = 1,
    ) -> list[ClientUpdate]:
        tic = time.perf_counter()
        k = len(cids)
        self._load(starts)
        ranks = [self.store.ranks[c] for c in cids]
        self._truncate(ranks)
        data = [self.store.data[c] for c in cids]
        # under DP, q and the expected batch come from each client's public size (its ledger's)
        sizes = [
            (self.store.budget(c).size if sigmas is not None else 0) or len(d) for c, d in zip(cids, data, strict=True)
        ]
        qs = [sample_rate(plan.batch_size, n) for n in sizes]
        expected = torch.tensor([q * n for q, n in zip(qs, sizes, strict=True)], device=self.device)
        batches = [
            poisson_batches(len(d), q, plan.steps, batch_source(s)) for d, q, s in zip(data, qs, seeds, strict=True)
        ]
        noise_gens = [noise_source(s, self.device) for s in seeds]
        trains, train_head = plan.trains, HEAD in plan.trains
        opt = plan.local_optimizer
        kept = [self.store.optimizer_state(c, opt.keep_state) for c in cids]
        named = self._leaves(trains, expanded=False)
        optimizer = StackedOptimizer(opt, [p for _, p, _ in named], [n for n, _, _ in named], kept)
        losses = [[] for _ in range(k)]
        self.model.train()  # dropout as on the reference path, from the chunk's seeds: reproducible by default
        outer = torch.random.get_rng_state()
        seed_dropout(combined(seeds), self.device)
        for step in range(plan.steps):
            index = [b[step] for b in batches]
            owner = torch.cat([torch.full((len(i),), j, dtype=torch.long) for j, i in enumerate(index)])
            if len(owner):  # every client's examples packed (no padding rows), in buckets by length
                ids = torch.cat([d.input_ids[i] for d, i in zip(data, index, strict=True)])
                mask = torch.cat([d.attention_mask[i] for d, i in zip(data, index, strict=True)])
                labels = torch.cat([d.labels[i] for d, i in zip(data, index, strict=True)])
                per_leaf: list[list[torch.Tensor]] = []
                owners, losses_step = [], []
                for rows in length_buckets(mask.sum(1), self.buckets):
                    width = int(mask[rows].sum(1).max())
                    b_ids, b_mask, b_labels, b_owner = (
                        t.to(self.device) for t in (ids[rows, :width], mask[rows, :width], labels[rows], owner[rows])
                    )
                    for module in self.layers.values():
                        module.expand(b_owner, trains)
                    self.head.expand(b_owner, train_head)
                    logits = self.model(input_ids=b_ids, attention_mask=b_mask)
                    per_example = F.cross_entropy(logits, b_labels, reduction="none")
                    leaves = self._leaves(trains)
                    grads_b = torch.autograd.grad(per_example.sum(), [leaf for _, _, leaf in leaves])
                    per_leaf = (
                        [[*acc, g] for acc, g in zip(per_leaf, grads_b, strict=True)]
                        if per_leaf
                        else [[g] for g in grads_b]
                    )
                    owners.append(b_owner)
                    losses_step.append(per_example.detach())
                grads = [torch.cat(gs) for gs in per_leaf]
                owner = torch.cat(owners)
                sums = torch.zeros(k, device=self.device).index_add_(0, owner, torch.cat(losses_step))
                for j, i in enumerate(index):
                    if len(i):
                        losses[j].append(float(sums[j]) / len(i))
            else:  # every client drew an empty Poisson sample: a noise-only step
                leaves = named
                grads = [p.new_zeros((0, *p.shape[1:])) for _, p, _ in leaves]
            with torch.no_grad():
                noised = self._noised_mean(leaves, grads, owner.to(self.device), expected, sigmas, noise_gens)
                optimizer.step(noised, opt.lr_at(round_num, step))
                self._truncate(ranks)
        for j, state in enumerate(kept):
            if state is not None:  # kept on the client for its next round, never sent
                state.clear()
                state.update(optimizer.client_state(j))
        seconds = (time.perf_counter() - tic) / k
        stacked = self._tensors()
        updates = []
        for j, cid in enumerate(cids):
            tensors = {name: stacked[name][j].detach().to("cpu", torch.float32).clone() for name in plan.uploads}
            kept = {name: stacked[name][j].detach().to("cpu", torch.float32).clone() for name in plan.keeps}
            self.store.keep(cid, kept)
            updates.append(
                ClientUpdate(
                    client_id=cid,
                    num_examples=max(1, round(float(expected[j]) * plan.steps)),
                    tensors=tensors,
                    metrics={"steps": float(plan.steps)}
                    if sigmas is not None  # under DP, no statistic of the private batches
                    else {
                        "train_loss": sum(losses[j]) / len(losses[j]) if losses[j] else float("nan"),
                        "steps": float(plan.steps),
                        "examples_seen": float(sum(len(b) for b in batches[j])),
                        "seconds": seconds,
                    },
                    rank=ranks[j],
                )
            )
        torch.random.set_rng_state(outer)
        return updates

    def _leaves(
        self, trains: frozenset[str], expanded: bool = True
    ) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """(name, stacked parameter [K, ...], its per-example leaf [N, ...]) for every trained tensor."""
        leaves = []
        for layer, module in self.layers.items():
            for kind in module.kinds:
                if kind in trains:
                    leaves.append((_NAME[kind](layer), module.stacks[kind], module.leaves[kind] if expanded else None))
        if HEAD in trains:
            leaves += [
                ("head.weight", self.head.weight, self.head.w_e if expanded else None),
                ("head.bias", self.head.bias, self.head.b_e if expanded else None),
            ]
        return leaves

    def _noised_mean(self, leaves, grads, owner, expected, sigmas, noise_gens) -> list[torch.Tensor]:  # noqa: ANN001
        """Per client: (clip each example to C, sum, add noise sigma*C) / expected batch: the gradient
        Opacus hands the optimizer, for every client at once ([K, ...] per trained tensor)."""
        k = len(expected)
        if sigmas is not None and len(owner):
            zero_non_finite(grads)  # as NodeDPOptimizer: a NaN or inf example contributes zero
            sq = torch.zeros(len(owner), device=owner.device)
            for g in grads:
                sq += g.reshape(len(owner), -1).pow(2).sum(-1)
            factor = (self.clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # Opacus's clip factor
        else:
            factor = torch.ones(len(owner), device=owner.device)
        out = []
        for (_, param, _), g in zip(leaves, grads, strict=True):
            scaled = g * factor.reshape((-1,) + (1,) * (g.dim() - 1))
            summed = torch.zeros_like(param).index_add_(0, owner, scaled)  # per-client sums
            if sigmas is not None:
                for j in range(k):
                    summed[j] += noise_gens[j].normal(
                        sigmas[j] * self.clip, summed[j].shape, self.secret, summed.device
                    )
            out.append(summed / expected.reshape((k,) + (1,) * (param.dim() - 1)))
        return out

    # ---- the executor contract ---------------------------------------------------------------
    def run_round(
        self,
        round_num: int,
        client_ids: list[int],
        global_state: AdapterState,
        plan: LocalTraining,
        seeds: dict[int, int],
        on_client: Callable[[int], None] | None = None,
    ) -> list[ClientResult]:
        results: dict[int, ClientResult] = {}
        ready = []
        for cid in client_ids:
            try:
                check_budget(self.store.budget(cid), plan.steps, cid)
                ready.append(cid)
            except ClientRefused as refusal:
                results[cid] = ClientFailure(cid, str(refusal), refused=True)
                if on_client is not None:
                    on_client(cid)
        size = self.chunk or len(ready) or 1
        start = 0
        while start < len(ready):
            cids = ready[start : start + size]
            starts = [self.store.start_state(c, global_state) for c in cids]
            sigmas = [self.store.budget(c).sigma for c in cids] if self.store.budgets is not None else None
            try:
                updates = self._train_chunk(cids, starts, plan, [self.seed(c, seeds) for c in cids], sigmas, round_num)
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                size = max(1, size // 2)  # fit the cohort to free memory: halve and retry
                self.chunk = size
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("cohort of %d clients did not fit in memory; training %d at a time", len(cids), size)
                continue
            for update in updates:
                record_spending(self.store.budget(update.client_id), update)
                results[update.client_id] = update
                if on_client is not None:
                    on_client(update.client_id)
            start += len(cids)
        return [results[c] for c in client_ids]


@EXECUTORS.register("cohort")
def _cohort(spec, model, clients, num_labels, budgets):  # noqa: ANN001, ANN202
    from fedpeft.config import client_rank

    fed = spec.federation
    ranks = [client_rank(spec.model, cid) for cid in range(len(clients))]
    return CohortExecutor(
        spec.model, num_labels, fed.seed, clients, budgets, spec.privacy.clip, ranks,
        device=model.device, chunk=fed.cohort_chunk, secret=spec.privacy.noise == "secret",
    )  # fmt: skip
