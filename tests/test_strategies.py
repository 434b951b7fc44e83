"""Strategies against the identities of REFERENCE.md, on mocked updates."""

import numpy as np
import pytest
import torch
from fedpeft.strategies import STRATEGIES, make_strategy
from fedpeft.strategies.linalg import refactor

from fedpeft.state import AdapterState, ClientUpdate

LAYERS = ("enc.l0.q", "enc.l0.v", "enc.l1.q")


def _state(d_out=24, d_in=16, r=4, seed=0, b_zero=True):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in LAYERS:
        tensors[f"{layer}.lora_A.weight"] = torch.rand(r, d_in, generator=g) * 2 / d_in**0.5 - 1 / d_in**0.5
        tensors[f"{layer}.lora_B.weight"] = torch.zeros(d_out, r) if b_zero else torch.randn(d_out, r, generator=g)
    tensors["head.weight"] = torch.randn(2, d_out, generator=g)
    tensors["head.bias"] = torch.zeros(2)
    return AdapterState(tensors, rank=r, alpha=float(r), targets=("q", "v"))


def _updates(state, names, sizes=(30, 10, 60), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(cid, n, {k: state.tensors[k] + torch.randn(state.tensors[k].shape, generator=g) for k in names})
        for cid, n in enumerate(sizes)
    ]


def test_unknown_strategy_and_option_list_valid_ones():
    with pytest.raises(
        ValueError, match="valid: fedavg, fedex, fedsa, fedsvd, ffa, flexlora, flora, hetlora, lora-fair"
    ):
        make_strategy("fedprox")
    with pytest.raises(ValueError, match="valid: min_norm, refactor_period"):
        make_strategy("fedsvd", {"period": 2})
    with pytest.raises(ValueError, match="refactor_period must be >= 1"):
        make_strategy("fedsvd", {"refactor_period": 0})


def test_fedavg_is_numpy_weighted_mean():
    state = _state()
    strategy = make_strategy("fedavg")
    names = strategy.uploads(state, train_head=True)
    assert set(names) == set(state.tensors)
    updates = _updates(state, names)
    new, _, _ = strategy.aggregate(state, updates, 1, {})
    w = np.array([u.num_examples for u in updates], dtype=np.float64)
    for name in names:
        stacked = np.stack([u.tensors[name].numpy() for u in updates])
        np.testing.assert_allclose(
            new.tensors[name].numpy(), np.average(stacked, axis=0, weights=w), rtol=1e-6, atol=1e-6
        )


def test_uploads_follow_declared_trainables():
    state = _state()
    fedsvd = make_strategy("fedsvd")
    assert all(".lora_B." in n for n in fedsvd.uploads(state, train_head=False))
    assert {"head.weight", "head.bias"} <= set(fedsvd.uploads(state, train_head=True))
    assert not any(".lora_A." in n for n in fedsvd.uploads(state, train_head=True))


@pytest.mark.parametrize("d_out,d_in,r", [(24, 16, 4), (16, 40, 8), (64, 64, 1)])
def test_refactor_preserves_product_and_orthonormalises(d_out, d_in, r):
    g = torch.Generator().manual_seed(d_out + d_in + r)
    B, A = (
        torch.randn(d_out, r, generator=g, dtype=torch.float64),
        torch.randn(r, d_in, generator=g, dtype=torch.float64),
    )
    B_new, A_new = refactor(B, A)
    torch.testing.assert_close(B_new @ A_new, B @ A, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(A_new @ A_new.T, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-10)
    # B_new = U S: its columns are orthogonal with norms = the singular values of B A, descending
    s_full = torch.linalg.svdvals(B @ A)[:r]
    torch.testing.assert_close(B_new.norm(dim=0), s_full, rtol=1e-8, atol=1e-10)
    gram = B_new.T @ B_new
    torch.testing.assert_close(gram, torch.diag(torch.diag(gram)), rtol=0, atol=1e-8)


def test_fedsvd_round_is_exact_for_the_product():
    state = _state()
    strategy = make_strategy("fedsvd")
    names = strategy.uploads(state, train_head=True)
    updates = _updates(state, names)
    new, _, metrics = strategy.aggregate(state, updates, 1, {})
    p = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    p = p / p.sum()
    for layer in LAYERS:
        a_prev = state.A(layer).double()
        ideal = sum(
            pk * u.tensors[f"{layer}.lora_B.weight"].double() @ a_prev for pk, u in zip(p, updates, strict=True)
        )
        torch.testing.assert_close((new.B(layer) @ new.A(layer)).double(), ideal, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new.A(layer) @ new.A(layer).T, torch.eye(state.rank), rtol=0, atol=1e-5)
    assert metrics["refactored_layers"] == len(LAYERS)
    np.testing.assert_allclose(
        new.tensors["head.weight"].numpy(),
        np.average(np.stack([u.tensors["head.weight"].numpy() for u in updates]), axis=0, weights=[30, 10, 60]),
        rtol=1e-6,
        atol=1e-6,
    )


def test_fedsvd_skips_silent_layers_and_respects_period():
    state = _state()
    strategy = make_strategy("fedsvd", {"refactor_period": 2})
    names = strategy.uploads(state, train_head=False)
    zero = [ClientUpdate(0, 5, {n: torch.zeros_like(state.tensors[n]) for n in names})]
    new, _, metrics = strategy.aggregate(state, zero, 2, {})
    assert metrics == {"refactored_layers": 0, "skipped_layers": len(LAYERS)}
    assert all(torch.equal(new.A(layer), state.A(layer)) for layer in LAYERS)
    updates = _updates(state, names)
    odd, _, m1 = strategy.aggregate(state, updates, 1, {})  # round 1: not a re-factor round
    assert m1["refactored_layers"] == 0 and all(torch.equal(odd.A(layer), state.A(layer)) for layer in LAYERS)


def test_registry_lists_the_spine_strategies():
    assert {"fedavg", "fedsvd"} <= set(STRATEGIES.names())
    assert make_strategy("fedsvd").sum_only and make_strategy("fedavg").sum_only
