"""The randomness that protects a client: secret keys of 256 bits on every path, and a seeded path
that stays draw for draw what it was (fedpeft.privacy.randomness, fedpeft.privacy.dpsgd)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from scipy import stats

from fedpeft.executors.base import InProcess
from fedpeft.privacy.client_level import ClientLevelDP
from fedpeft.privacy.dpsgd import NodeDPOptimizer, zero_non_finite
from fedpeft.privacy.randomness import KEY_BYTES, SecretKey, TorchSource, noise_source, seed_dropout


def _keys_equal_in_low_32_bits() -> tuple[SecretKey, SecretKey]:
    low = int.from_bytes(bytes(range(4)), "little")
    a = (low + (1 << 32) * 12345).to_bytes(KEY_BYTES, "little")
    b = (low + (1 << 32) * 67890).to_bytes(KEY_BYTES, "little")
    return SecretKey(a), SecretKey(b)


def test_torch_keeps_only_32_bits_of_a_seed_which_is_why_keys_replace_seeds():
    """The finding: on CPU, seeds equal in their low 32 bits give the same stream."""
    seed = 0x1234_5678
    a = torch.normal(0, 1, (5,), generator=torch.Generator().manual_seed(seed))
    b = torch.normal(0, 1, (5,), generator=torch.Generator().manual_seed(seed + (1 << 40)))
    assert torch.equal(a, b)


def test_keys_equal_in_their_low_32_bits_give_different_noise_batches_and_dropout():
    a, b = _keys_equal_in_low_32_bits()
    for purpose in ("noise", "batches", "client-noise", "client-sampling"):
        assert not torch.equal(a.stream(purpose).rand(64), b.stream(purpose).rand(64)), purpose
    assert not torch.equal(noise_source(a).normal(1.0, (64,), True), noise_source(b).normal(1.0, (64,), True))
    seed_dropout(a)
    da = torch.rand(64)
    seed_dropout(b)
    assert not torch.equal(da, torch.rand(64))
    seed_dropout(a)  # and one key gives one stream: a node can replay its own round
    assert torch.equal(da, torch.rand(64))


def test_the_keyed_stream_is_uniform_and_gaussian_at_the_asked_std():
    key = SecretKey.draw()
    u = key.stream("u").rand(20_000).numpy()
    assert 0.0 <= u.min() and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    for secure in (False, True):
        z = key.stream(f"z{secure}").normal(3.0, (20_000,), secure, "cpu")
        assert z.dtype == torch.float32
        assert stats.kstest(z.double().numpy() / 3.0, "norm").pvalue > 1e-4
        assert float(z.std()) == pytest.approx(3.0, rel=0.03)
    # the same purpose twice is the same stream; another purpose another
    assert torch.equal(key.stream("p").rand(8), key.stream("p").rand(8))
    assert not torch.equal(key.stream("p").rand(8), key.stream("q").rand(8))


def test_a_secret_key_never_leaves_in_a_pickle_or_a_log_line():
    key = SecretKey.draw()
    assert "hidden" in repr(key) and key._key.hex() not in repr(key) + str(key)
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(key)
    with pytest.raises(ValueError):
        SecretKey(b"short")


def test_in_process_secret_executors_draw_a_fresh_key_per_client_round():
    executor = InProcess()
    executor.secret = True
    k1, k2 = executor.seed(0, {0: 7}), executor.seed(0, {0: 7})
    assert isinstance(k1, SecretKey) and isinstance(k2, SecretKey) and k1._key != k2._key
    executor.secret = False
    assert executor.seed(0, {0: 7}) == 7


def test_the_seeded_noise_is_opacus_own_draw_for_draw():
    """NodeDPOptimizer with a torch generator is Opacus's DPOptimizer with it: seeded runs keep their bytes."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    def step(make):  # noqa: ANN001, ANN202
        torch.manual_seed(0)
        layer = torch.nn.Linear(6, 3)
        module = GradSampleModule(layer)
        opt = make(torch.optim.SGD(layer.parameters(), lr=1.0))
        torch.nn.functional.mse_loss(module(torch.randn(5, 6)), torch.zeros(5, 3)).backward()
        opt.step()
        return [p.detach().clone() for p in layer.parameters()]

    for secure in (False, True):
        kw = {"noise_multiplier": 0.7, "max_grad_norm": 0.5, "expected_batch_size": 5, "secure_mode": secure}
        ours = step(lambda o, kw=kw: NodeDPOptimizer(o, source=TorchSource(torch.Generator().manual_seed(9)), **kw))
        theirs = step(lambda o, kw=kw: DPOptimizer(o, generator=torch.Generator().manual_seed(9), **kw))
        for x, y in zip(ours, theirs, strict=True):
            assert torch.equal(x, y)


def test_an_overflowing_example_contributes_zero_instead_of_making_the_update_nan():
    from opacus import GradSampleModule

    def update(x: torch.Tensor) -> list[torch.Tensor]:
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 2)
        module = GradSampleModule(layer)
        opt = NodeDPOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), source=TorchSource(torch.Generator()),
                              noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)  # fmt: skip
        module(x).sum().backward()
        opt.step()
        return [p.detach().clone() for p in layer.parameters()]

    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    bad = x.clone()
    bad[2, 0] = math.inf
    clean = x.clone()
    clean[2] = 0  # the example's gradient on the weight is 0, its bias gradient is not: compare the weight
    with_bad = update(bad)
    assert all(torch.isfinite(p).all() for p in with_bad)
    grads = [torch.randn(3, 2), torch.randn(3)]
    grads[0][1, 0] = math.nan
    assert zero_non_finite(grads) == 1 and torch.equal(grads[1][1], torch.tensor(0.0)) and grads[0][1].eq(0).all()
    # the weight update is the others' clipped sum: the same as the batch with the example's row at 0
    without = update(clean)
    torch.testing.assert_close(with_bad[0], without[0])


def test_client_level_noise_under_a_secret_server_is_not_the_seeded_draw():
    mech = ClientLevelDP(
        rate=1.0, noise_multiplier=1.0, clip=1.0, num_clients=3, delta=1e-5, accountant="prv", secret=True
    )
    seeded = ClientLevelDP(rate=0.5, noise_multiplier=1.0, clip=1.0, num_clients=64, delta=1e-5, accountant="prv", secret=False)  # fmt: skip
    assert seeded.sample(11) == seeded.sample(11)
    secret = ClientLevelDP(**{**seeded.__dict__, "secret": True})
    assert len({tuple(secret.sample(11)) for _ in range(5)}) > 1  # 64 clients at rate 0.5: never twice the same
    assert mech.secret
