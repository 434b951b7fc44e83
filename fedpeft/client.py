"""One client's local training, and evaluation: the reference path every other path is checked against.

Local training is `steps` steps of the spec's optimizer (fedpeft.optim: SGD by default, fresh each
round unless the client keeps its state) on the tensors the strategy trains. Each step draws a Poisson sample (rate q = batch_size / n, as DP-SGD's accounting
assumes). Privacy on or off is the same loop: with DP-SGD the step goes through Opacus
(per-example gradients, clipping to C, Gaussian noise sigma*C); without it the loss is summed and
divided by the expected batch size, which is exactly the DP update at sigma = 0 and C = inf.

Under DP, n is the client's public size (DPSGD.size; docs/privacy.md): q, the expected batch and
the aggregation weight then depend on public values only, and the update carries no statistic
computed from the private batches (no loss, no count of sampled examples, no wall time).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedpeft.adapters import AdaptedModel, logits_of
from fedpeft.causal import answer_window, evaluate_lm, token_loss
from fedpeft.data.base import TokenizedData
from fedpeft.optim import LocalOptimizer, OptimizerState, load_torch_state, torch_state
from fedpeft.privacy.accounting import ClientBudget, sample_rate
from fedpeft.privacy.randomness import Seed, Source, as_source, batch_source, noise_source, seed_dropout
from fedpeft.state import AdapterState, ClientUpdate

__all__ = [
    "DPSGD", "LocalTraining", "ClientRefused", "client_round", "check_budget", "record_spending", "train_client", "evaluate",
]  # fmt: skip


class ClientRefused(RuntimeError):
    """A client declines to train because the round would exceed its privacy budget."""


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD parameters of one client: noise multiplier sigma and per-example clipping norm C;
    `size`, the public dataset size q and the expected batch are computed from (None: the true
    size); `secure`, Opacus's secure_mode noise (each draw the mean of four Gaussians, robust to
    floating-point attacks)."""

    sigma: float
    clip: float
    size: int | None = None
    secure: bool = False


@dataclass(frozen=True)
class LocalTraining:
    """What a client does with the global adapter in one round. `lr` is the (peak) learning rate of
    `optimizer` (None: plain SGD at a constant `lr`)."""

    steps: int
    batch_size: int
    lr: float
    trains: frozenset[str]  # kinds that train: A, B, head
    uploads: tuple[str, ...]  # normalised names of the tensors sent back
    keeps: tuple[str, ...] = ()  # names of the tensors the client keeps for its next round (FedSA's B)
    optimizer: LocalOptimizer | None = None

    @property
    def local_optimizer(self) -> LocalOptimizer:
        """The optimizer and schedule of every client, at this plan's lr and steps."""
        return dataclasses.replace(self.optimizer or LocalOptimizer(), lr=self.lr, steps=self.steps)


def poisson_batches(n: int, q: float, steps: int, source: Source | torch.Generator) -> list[torch.Tensor]:
    """`steps` Poisson samples of range(n): each row joins each batch independently with prob. q."""
    source = as_source(source)
    return [torch.nonzero(source.rand(n) < q).squeeze(1) for _ in range(steps)]


def train_client(
    model: AdaptedModel,
    global_state: AdapterState,
    data: TokenizedData,
    plan: LocalTraining,
    *,
    client_id: int,
    seed: Seed,
    dp: DPSGD | None = None,
    rank: int | None = None,
    round_num: int = 1,
    optimizer_state: OptimizerState | None = None,
) -> ClientUpdate:
    """Train one client from the global adapter; return the tensors it uploads.

    `seed` fixes the batches, the DP noise and dropout, so a client's round is reproducible; a
    SecretKey draws them from its keystreams instead (fedpeft.privacy.randomness).
    `round_num` places the round in a schedule over the run. `optimizer_state`: the client's kept
    optimizer state (train.optimizer_state = keep), updated in place; None: fresh state.
    `rank` (heterogeneous ranks) keeps only the first `rank` LoRA components: the rest start at
    zero and are projected back to zero after every step, which removes the DP noise there.
    `num_examples` (the aggregation weight) is the expected number of examples the client used,
    q * n * steps with n its public size under DP: it depends on n only when n < batch_size, not
    on the sampled batches.
    """
    start = time.perf_counter()
    n = len(data)
    public_n = dp.size if dp is not None and dp.size else n
    q = sample_rate(plan.batch_size, public_n)
    expected_batch = q * public_n
    batches = poisson_batches(n, q, plan.steps, batch_source(seed))

    model.load(global_state, rank=rank)
    model.set_trainable(set(plan.trains))
    named = model.trainable_named()
    params = list(named.values())
    opt = plan.local_optimizer
    inner = opt.build(params)
    if optimizer_state:
        load_torch_state(inner, named, optimizer_state)
    optimizer: torch.optim.Optimizer = inner
    module: torch.nn.Module = model.module
    if dp is not None:
        from opacus import GradSampleModule

        from fedpeft.privacy.dpsgd import NodeDPOptimizer

        module = GradSampleModule(model.module, batch_first=True, loss_reduction="mean")
        optimizer = NodeDPOptimizer(
            inner,  # Opacus clips and noises the gradient, then steps this optimizer on it
            source=noise_source(seed, model.device),
            noise_multiplier=dp.sigma,
            max_grad_norm=dp.clip,
            expected_batch_size=expected_batch,
            loss_reduction="mean",
            secure_mode=dp.secure,
        )

    losses = []
    start_values = [p.detach().clone() for p in params] if dp is not None and dp.sigma > 0 else []
    module.train()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # Opacus's hooks fire with no input requiring grad (frozen embeddings): expected, harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        seed_dropout(seed, model.device)
        try:
            for step, index in enumerate(batches):
                for group in optimizer.param_groups:
                    group["lr"] = opt.lr_at(round_num, step)
                optimizer.zero_grad(set_to_none=True)
                if len(index) == 0:  # an empty Poisson sample still takes a (noise-only) step
                    for p in params:
                        p.grad = torch.zeros_like(p)
                        if dp is not None:
                            p.grad_sample = p.new_zeros((0, *p.shape))
                    optimizer.step()
                    if rank is not None:
                        model.truncate_rank(rank)
                    continue
                input_ids, mask, labels = (t.to(model.device) for t in data.batch(index))
                window, labels = answer_window(labels) if data.is_sequence else ({}, labels)
                logits = logits_of(module(input_ids=input_ids, attention_mask=mask, **window))
                if dp is not None:  # Opacus contract: mean over the batch it sees
                    loss = example_loss(logits, labels)
                    loss.backward()
                    losses.append(float(loss.detach()))
                else:  # sum / expected batch size: the DP update at sigma = 0, C = inf
                    loss = example_loss(logits, labels, reduction="sum") / expected_batch
                    loss.backward()
                    losses.append(float(loss.detach()) * expected_batch / len(index))
                optimizer.step()
                if rank is not None:
                    model.truncate_rank(rank)
        finally:
            optimizer.zero_grad(set_to_none=True)
            if dp is not None:
                module.to_standard_module()  # remove Opacus hooks and attributes from the model
    model.module.eval()
    stepped = any(opt.lr_at(round_num, step) > 0 for step in range(len(batches)))
    if start_values and stepped and all(torch.equal(p, v) for p, v in zip(params, start_values, strict=True)):
        raise RuntimeError(
            f"client {client_id}: DP-SGD took {len(batches)} noised steps and the adapter did not move: the optimizer "
            "steps parameters the model does not use (e.g. the model moved to another device after its adapters were "
            "injected; Opacus #820, PEFT #3409)"
        )
    if optimizer_state is not None:
        optimizer_state.clear()
        optimizer_state.update(torch_state(inner, named))
    metrics = {"steps": float(len(batches))}
    if dp is None:  # statistics of the private batches: released only with privacy off
        metrics["train_loss"] = sum(losses) / len(losses) if losses else float("nan")
        metrics["examples_seen"] = float(sum(len(b) for b in batches))
        metrics["seconds"] = time.perf_counter() - start
    return ClientUpdate(
        client_id=client_id,
        num_examples=max(1, round(expected_batch * plan.steps)),
        tensors=model.tensors(list(plan.uploads)),
        metrics=metrics,
        rank=rank,
    )


def client_round(
    model: AdaptedModel,
    global_state: AdapterState,
    data: TokenizedData,
    plan: LocalTraining,
    *,
    client_id: int,
    seed: Seed,
    budget: ClientBudget | None,
    clip: float,
    rank: int | None = None,
    secure: bool = False,
    round_num: int = 1,
    optimizer_state: OptimizerState | None = None,
) -> ClientUpdate:
    """A client's whole round: check its privacy budget, train, record the steps it took.

    Raises ClientRefused (and trains nothing) when `plan.steps` more steps would take the client
    past its target epsilon. With `budget` None, privacy is off. `secure`: Opacus's secure_mode
    noise (set where the randomness is secret, see fedpeft.privacy.randomness).
    """
    check_budget(budget, plan.steps, client_id)
    dp = DPSGD(budget.sigma, clip, budget.size or None, secure) if budget is not None else None
    update = train_client(
        model, global_state, data, plan, client_id=client_id, seed=seed, dp=dp, rank=rank, round_num=round_num,
        optimizer_state=optimizer_state,
    )  # fmt: skip
    record_spending(budget, update)
    return update


def check_budget(budget: ClientBudget | None, steps: int, client_id: int) -> None:
    """Raise ClientRefused when `steps` more DP-SGD steps would exceed the client's budget."""
    if budget is not None and not budget.allows(steps):
        raise ClientRefused(
            f"client {client_id} refuses to train: {steps} more steps would spend epsilon "
            f"{budget.epsilon_after(steps):.3f} > its budget {budget.target_epsilon:g} "
            f"(spent so far {budget.epsilon:.3f} over {budget.steps} steps)"
        )


def record_spending(budget: ClientBudget | None, update: ClientUpdate) -> None:
    """Add the steps the client took to its ledger; report its epsilon with the update."""
    if budget is not None:
        budget.record(int(update.metrics["steps"]))
        update.metrics["epsilon"] = budget.epsilon
        update.metrics["sigma"] = budget.sigma


def example_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The mean (or sum) over a batch of each example's loss: cross-entropy of its label, or a
    causal LM's mean cross-entropy over its answer tokens (fedpeft.causal.token_loss)."""
    if logits.dim() == 3:
        return token_loss(logits, labels, reduction)
    return F.cross_entropy(logits, labels, reduction=reduction)


@torch.inference_mode()
def evaluate(model: AdaptedModel, state: AdapterState, data: TokenizedData, batch_size: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `state` on `data`; for a causal LM, token accuracy and
    the mean cross-entropy of the answer tokens. Batches group similar lengths,
    so little compute goes to padding."""
    model.load(state)
    model.module.eval()
    if data.is_sequence:
        return evaluate_lm(model.forward, data, batch_size, model.classifier.config.vocab_size)
    lengths = data.attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    loss_sum, k = 0.0, model.num_labels
    confusion = torch.zeros(k, k, dtype=torch.float64)  # [true, predicted]
    for start in range(0, len(order), batch_size):
        input_ids, mask, labels = data.batch(order[start : start + batch_size])
        logits = model.forward(input_ids, mask).float().cpu()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        confusion += torch.bincount(labels * k + logits.argmax(-1), minlength=k * k).reshape(k, k).double()
    n = max(len(data), 1)
    return {"accuracy": float(confusion.trace()) / n, "loss": loss_sum / n, **class_scores(confusion)}


def class_scores(confusion: torch.Tensor) -> dict[str, float]:
    """Macro-F1 (the mean over classes of 2TP / (2TP + FP + FN), a class never true nor predicted left
    out) and the Matthews correlation (Gorodkin's multi-class form; 0 when a side is constant) of a
    confusion matrix [true, predicted]."""
    tp = confusion.diag()
    true, predicted, n = confusion.sum(1), confusion.sum(0), confusion.sum()
    seen = (true + predicted) > 0
    f1 = (2 * tp[seen] / (true[seen] + predicted[seen])).mean() if bool(seen.any()) else torch.tensor(0.0)
    c = tp.sum()
    denominator = torch.sqrt((n * n - (predicted * predicted).sum()) * (n * n - (true * true).sum()))
    mcc = (c * n - (true * predicted).sum()) / denominator if float(denominator) > 0 else torch.tensor(0.0)
    return {"f1_macro": float(f1), "mcc": float(mcc)}
