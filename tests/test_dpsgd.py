"""DP-SGD local training checked against references: batch-of-one gradients, the non-private
path, the empirical noise level, and the Opacus+PEFT silent-no-update failure."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fedpeft.adapters import AdaptedModel
from fedpeft.client import DPSGD, LocalTraining, poisson_batches, train_client
from fedpeft.config import ModelConfig
from fedpeft.data import prepare
from fedpeft.data.base import TokenizedData
from fedpeft.privacy.accounting import sample_rate
from fedpeft.state import HEAD, LORA_A, LORA_B, kind_of
from tests.conftest import tiny_spec


@pytest.fixture(scope="module")
def setup():
    spec = tiny_spec()
    model = AdaptedModel(ModelConfig(name="tiny-bert", max_length=24), num_labels=2, seed=0)
    data = prepare(spec.data, 4, model.tokenizer, 24, seed=0)
    # a non-zero B so that gradients of A are non-zero too
    state = model.state()
    g = torch.Generator().manual_seed(5)
    state = state.with_tensors(
        {n: torch.randn(t.shape, generator=g) * 0.1 for n, t in state.tensors.items() if kind_of(n) == LORA_B}
    )
    return model, data.clients[0], state


def _plan(model, trains, **kw):
    uploads = tuple(n for n in model.names if kind_of(n) in trains)
    base = {"steps": 1, "batch_size": 8, "lr": 1.0, "trains": frozenset(trains), "uploads": uploads}
    return LocalTraining(**{**base, **kw})


def _per_example_grads(model, state, data: TokenizedData, index, names):
    """Reference: one forward/backward per example, each on its own unpadded sequence."""
    model.load(state)
    model.set_trainable({kind_of(n) for n in names})
    model.module.eval()
    params = {n: model._params[n] for n in names}
    grads = []
    for i in index.tolist():
        one = torch.tensor([i])
        ids, mask, labels = data.batch(one)
        for p in params.values():
            p.grad = None
        F.cross_entropy(model.forward(ids, mask), labels).backward()
        grads.append({n: p.grad.detach().clone() for n, p in params.items()})
    return grads


def test_opacus_per_sample_grads_match_batch_of_one(setup):
    from opacus import GradSampleModule

    model, data, state = setup
    trains = {LORA_A, LORA_B, HEAD}
    model.load(state)
    names = model.set_trainable(trains)
    index = torch.arange(6)
    ids, mask, labels = data.batch(index)
    assert mask.sum(1).unique().numel() > 1, "want examples of different lengths (padding in the batch)"
    gsm = GradSampleModule(model.module, batch_first=True, loss_reduction="mean")
    try:
        model.module.train()  # Opacus captures activations in training mode only (no dropout here)
        F.cross_entropy(gsm(input_ids=ids, attention_mask=mask), labels).backward()
        per_sample = {n: model._params[n].grad_sample.detach().clone() for n in names}
    finally:
        gsm.to_standard_module()
    reference = _per_example_grads(model, state, data, index, names)
    assert {kind_of(n) for n in names} == {LORA_A, LORA_B, HEAD}
    for i, ref in enumerate(reference):
        for n in names:
            torch.testing.assert_close(per_sample[n][i], ref[n], rtol=1e-4, atol=1e-6)
    model.set_trainable(set())


@pytest.mark.parametrize("trains", [{LORA_A, LORA_B, HEAD}, {LORA_B}])
def test_dp_step_equals_clipped_sum_of_batch_of_one_gradients(setup, trains):
    """One DP-SGD step at sigma = 0 is -lr * sum_i clip_C(g_i) / (q n), g_i from single examples
    (clipping on the joint norm over all trained tensors)."""
    model, data, state = setup
    plan = _plan(model, trains, lr=0.7)
    seed = 11
    q = sample_rate(plan.batch_size, len(data))
    (index,) = poisson_batches(len(data), q, 1, torch.Generator().manual_seed(seed))
    assert len(index) > 2
    grads = _per_example_grads(model, state, data, index, list(plan.uploads))
    norms = [float(torch.sqrt(sum((t**2).sum() for t in g.values()))) for g in grads]
    clip = float(torch.tensor(norms).median())  # some examples clipped, some not
    summed = {n: torch.zeros_like(state.tensors[n]) for n in plan.uploads}
    for g, norm in zip(grads, norms, strict=True):
        for n in plan.uploads:
            summed[n] += g[n] * min(1.0, clip / (norm + 1e-6))
    update = train_client(model, state, data, plan, client_id=0, seed=seed, dp=DPSGD(sigma=0.0, clip=clip))
    for n in plan.uploads:
        expected = state.tensors[n] - plan.lr * summed[n] / (q * len(data))
        torch.testing.assert_close(update.tensors[n], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("trains", [{LORA_A, LORA_B, HEAD}, {LORA_B, HEAD}])
def test_sigma_zero_and_no_clipping_equals_non_private(setup, trains):
    model, data, state = setup
    plan = _plan(model, trains, steps=4, lr=0.3)
    plain = train_client(model, state, data, plan, client_id=0, seed=3, dp=None)
    # C = inf, written 1e30 because Opacus forms sigma * C (0 * inf = nan)
    dp = train_client(model, state, data, plan, client_id=0, seed=3, dp=DPSGD(sigma=0.0, clip=1e30))
    for n in plan.uploads:
        torch.testing.assert_close(dp.tensors[n], plain.tensors[n], rtol=1e-4, atol=1e-6)
        assert not torch.equal(plain.tensors[n], state.tensors[n]), f"{n} did not train"


def test_noise_std_is_sigma_clip_over_batch(setup):
    model, data, state = setup
    plan = _plan(model, {LORA_A, LORA_B, HEAD}, lr=1.0, batch_size=10)
    sigma, clip = 1.5, 0.5
    noisy = train_client(model, state, data, plan, client_id=0, seed=21, dp=DPSGD(sigma, clip))
    clean = train_client(model, state, data, plan, client_id=0, seed=21, dp=DPSGD(0.0, clip))
    noise = torch.cat([(noisy.tensors[n] - clean.tensors[n]).flatten() for n in plan.uploads])
    expected = sigma * clip / plan.batch_size  # lr = 1, expected batch = q n = batch_size
    assert noise.numel() > 1500
    assert abs(float(noise.std()) / expected - 1) < 0.08
    assert abs(float(noise.mean())) < 4 * expected / noise.numel() ** 0.5


def test_adapter_moves_under_dp(setup):
    """Opacus issue 820: LoRA weights silently unchanged while loss and epsilon look normal."""
    model, data, state = setup
    plan = _plan(model, {LORA_A, LORA_B, HEAD}, steps=3)
    update = train_client(model, state, data, plan, client_id=0, seed=1, dp=DPSGD(0.8, 1.0))
    for n in plan.uploads:
        assert not torch.equal(update.tensors[n], state.tensors[n]), f"{n} unchanged under DP"
    # the model itself keeps no Opacus hooks or per-sample buffers after training
    assert not any(hasattr(p, "grad_sample") for p in model.module.parameters())
    assert not model.module._forward_hooks


def test_a_dp_round_whose_adapter_did_not_move_fails_loudly(setup, monkeypatch):
    """The silent failure of Opacus 820 / PEFT 3409 (the optimizer stepping parameters the model does
    not use: loss falls, epsilon accrues, the adapter never moves) is an error, not a result."""
    from fedpeft.privacy.dpsgd import NodeDPOptimizer

    model, data, state = setup
    plan = _plan(model, {LORA_A, LORA_B}, steps=2)
    monkeypatch.setattr(NodeDPOptimizer, "step", lambda self, closure=None: None)  # steps nothing the model holds
    with pytest.raises(RuntimeError, match="client 0: DP-SGD took 2 noised steps and the adapter did not move"):
        train_client(model, state, data, plan, client_id=0, seed=1, dp=DPSGD(0.8, 1.0))


def test_frozen_factors_stay_frozen(setup):
    model, data, state = setup
    plan = dataclasses.replace(_plan(model, {LORA_B}, steps=2), uploads=tuple(model.names))
    update = train_client(model, state, data, plan, client_id=0, seed=2, dp=DPSGD(0.8, 1.0))
    for n in model.names:
        moved = not torch.equal(update.tensors[n], state.tensors[n])
        assert moved == (kind_of(n) == LORA_B), n


def test_empty_poisson_batch_takes_a_noise_only_step(setup):
    model, data, state = setup
    tiny = data.select(torch.arange(40))
    plan = _plan(model, {LORA_B}, steps=1, batch_size=1)
    # find a seed whose single Poisson sample (q = 1/40) is empty
    seed = next(s for s in range(200) if len(poisson_batches(40, 1 / 40, 1, torch.Generator().manual_seed(s))[0]) == 0)
    update = train_client(model, state, tiny, plan, client_id=0, seed=seed, dp=DPSGD(1.0, 1.0))
    assert update.metrics == {"steps": 1}  # under DP: no loss, no count of sampled examples, no time
    assert any(not torch.equal(update.tensors[n], state.tensors[n]) for n in plan.uploads)
    plain = train_client(model, state, tiny, plan, client_id=0, seed=seed, dp=None)
    assert all(torch.equal(plain.tensors[n], state.tensors[n]) for n in plan.uploads)


def test_a_client_round_under_a_secret_key_is_its_keys_alone(setup):
    """Two keys equal in their low 32 bits train different updates; one key, one update (issue 44:
    torch's CPU generator kept only 32 bits of the old secret seed)."""
    from fedpeft.privacy.randomness import KEY_BYTES, SecretKey

    model, data, state = setup
    plan = _plan(model, {LORA_B}, steps=2)
    a, b = (SecretKey((0x03020100 + (1 << 32) * k).to_bytes(KEY_BYTES, "little")) for k in (12345, 67890))
    dp = DPSGD(sigma=1.0, clip=1.0, secure=True)
    ua, ub, ua2 = (train_client(model, state, data, plan, client_id=0, seed=k, dp=dp).tensors for k in (a, b, a))
    for name in ua:
        assert torch.equal(ua[name], ua2[name]), name
        assert not torch.allclose(ua[name], ub[name]), name
