"""Every strategy against its identity in REFERENCE.md, on mocked client updates (dense references
computed here at small sizes; the strategies themselves stay factored)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedpeft.strategies import STRATEGIES, make_strategy
from fedpeft.strategies.linalg import factored_svd
from fedpeft.strategies.lora_fair import cosine

from fedpeft.state import AdapterState, ClientUpdate, base_name, kind_of

LAYERS = ("enc.l0.q", "enc.l0.v", "enc.l1.q")
D_OUT, D_IN, R = 20, 12, 3


def _state(seed=0, b_scale=0.0):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for layer in LAYERS:
        t[f"{layer}.lora_A.weight"] = (torch.rand(R, D_IN, generator=g) * 2 - 1) / D_IN**0.5
        t[f"{layer}.lora_B.weight"] = torch.randn(D_OUT, R, generator=g) * b_scale
    t["head.weight"] = torch.randn(2, D_OUT, generator=g)
    t["head.bias"] = torch.zeros(2)
    return AdapterState(t, rank=R, alpha=6.0, targets=("q", "v"))


def _updates(state, names, sizes=(30, 10, 60), seed=1, scale=0.5, ranks=None):
    g = torch.Generator().manual_seed(seed)
    ups = []
    for k, n in enumerate(sizes):
        tensors = {
            name: state.tensors[name] + scale * torch.randn(state.tensors[name].shape, generator=g) for name in names
        }
        rank = ranks[k] if ranks else None
        if rank is not None:  # a lower-rank client: zero-padded factors
            for name in tensors:
                if kind_of(name) == "A":
                    tensors[name][rank:] = 0
                elif kind_of(name) == "B":
                    tensors[name][:, rank:] = 0
        ups.append(ClientUpdate(k, n, tensors, rank=rank))
    return ups


def _p(updates):
    w = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    return w / w.sum()


def _ideal(updates, layer, a_default=None):
    """dW* = sum_k p_k B_k A_k, dense (reference only)."""
    out = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    for pk, u in zip(_p(updates), updates, strict=True):
        a = u.tensors.get(f"{layer}.lora_A.weight", a_default)
        out += pk * u.tensors[f"{layer}.lora_B.weight"].double() @ a.double()
    return out


def _run(name, state, updates, options=None, round_num=1):
    strategy = make_strategy(name, options)
    state, server_state = strategy.init(state, seed=0)
    new, _, metrics = strategy.aggregate(state, updates, round_num, server_state)
    return strategy, state, new, metrics


def test_registry_has_the_suite_with_declared_properties():
    expected = {"fedavg", "ffa", "fedsvd", "lora-fair", "fedex", "flora", "fedsa", "flexlora", "hetlora"}
    assert expected <= set(STRATEGIES.names())
    sum_only = {n for n in expected if make_strategy(n).sum_only}
    assert sum_only == {"fedavg", "ffa", "fedsvd", "fedsa"}
    state = _state()
    assert not any(".lora_A." in n for n in make_strategy("ffa").uploads(state, train_head=False))
    assert all(".lora_A." in n for n in make_strategy("fedsa").uploads(state, train_head=False))
    assert not any(".lora_B." in n for n in make_strategy("fedsa").uploads(state, train_head=True))


def test_ffa_is_exact_for_the_product_and_keeps_a():
    state = _state()
    strategy = make_strategy("ffa")
    ups = _updates(state, strategy.uploads(state, train_head=True))
    _, state, new, _ = _run("ffa", state, ups)
    for layer in LAYERS:
        assert torch.equal(new.A(layer), state.A(layer))
        torch.testing.assert_close(
            (new.B(layer) @ new.A(layer)).double(), _ideal(ups, layer, state.A(layer)), rtol=1e-5, atol=1e-6
        )


def test_fedsvd_factored_route_equals_full_svd_of_the_product():
    state = _state()
    ups = _updates(state, make_strategy("fedsvd").uploads(state, train_head=False))
    _, state, new, _ = _run("fedsvd", state, ups)
    for layer in LAYERS:
        dense = _ideal(ups, layer, state.A(layer))
        u, s, vh = torch.linalg.svd(dense)
        torch.testing.assert_close(new.B(layer).double().norm(dim=0), s[:R], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new.B(layer).double() @ new.A(layer).double(), dense, rtol=1e-5, atol=1e-6)
        # A_new's rows span the top right singular subspace: the projection has singular values 1
        proj = new.A(layer).double() @ vh[:R].T
        torch.testing.assert_close(torch.linalg.svdvals(proj), torch.ones(R, dtype=torch.float64), rtol=0, atol=1e-5)


def test_fedsvd_never_forms_the_dense_product():
    """At 200,000 x 200,000 the product would need 320 GB; the factored route needs megabytes."""
    d, r = 200_000, 4
    g = torch.Generator().manual_seed(0)
    layer = "big"
    a = torch.rand(r, d, generator=g) - 0.5
    state = AdapterState(
        {f"{layer}.lora_A.weight": a, f"{layer}.lora_B.weight": torch.zeros(d, r)}, rank=r, alpha=4.0, targets=("big",)
    )
    ups = [ClientUpdate(k, 10, {f"{layer}.lora_B.weight": torch.randn(d, r, generator=g)}) for k in range(3)]
    new, _, metrics = make_strategy("fedsvd").aggregate(state, ups, 1, {})
    assert metrics["refactored_layers"] == 1
    torch.testing.assert_close(new.A(layer) @ new.A(layer).T, torch.eye(r), rtol=0, atol=1e-4)
    # spot-check B_new A_new = B_avg A on a few entries
    b_avg = sum(u.tensors[f"{layer}.lora_B.weight"] for u in ups) / 3
    rows, cols = torch.tensor([0, 17, 199_999]), torch.tensor([5, 123_456, 42])
    torch.testing.assert_close(
        new.B(layer)[rows] @ new.A(layer)[:, cols], b_avg[rows] @ a[:, cols], rtol=1e-4, atol=1e-4
    )


def test_lora_fair_corrects_towards_the_ideal_update():
    state = _state(b_scale=0.3)
    ups = _updates(state, make_strategy("lora-fair").uploads(state, train_head=False))
    _, _, fedavg, _ = _run("fedavg", state, ups)
    _, _, fair, m = _run("lora-fair", state, ups, {"lam": 0.01, "steps": 300})
    _, _, fair0, m0 = _run("lora-fair", state, ups, {"lam": 0.0, "steps": 300})
    for layer in LAYERS:
        ideal = _ideal(ups, layer)
        assert torch.equal(fair.A(layer), fedavg.A(layer))  # only B is corrected

        def cos(st, layer=layer, ideal=ideal):
            return float(
                torch.nn.functional.cosine_similarity(
                    (st.B(layer).double() @ st.A(layer).double()).flatten(), ideal.flatten(), dim=0
                )
            )

        assert cos(fair) > cos(fedavg) + 1e-3
        assert cos(fair0) >= cos(fair) - 1e-6  # no penalty: the closest cosine
        assert (fair.B(layer) - fedavg.B(layer)).norm() < (
            fair0.B(layer) - fedavg.B(layer)
        ).norm()  # penalty: smaller dB
    assert m["cos_after"] > m["cos_before"]


def test_lora_fair_factored_cosine_equals_dense():
    g = torch.Generator().manual_seed(3)
    u, v = (
        torch.randn(2, D_OUT, 9, generator=g, dtype=torch.float64),
        torch.randn(2, 9, D_IN, generator=g, dtype=torch.float64),
    )
    b, a = (
        torch.randn(2, D_OUT, R, generator=g, dtype=torch.float64),
        torch.randn(2, R, D_IN, generator=g, dtype=torch.float64),
    )
    dense = torch.nn.functional.cosine_similarity((u @ v).flatten(1), (b @ a).flatten(1), dim=1)
    torch.testing.assert_close(cosine(u, v, b, a), dense)


def test_lora_fair_ridge_variant_is_the_closed_form():
    state = _state(b_scale=0.3)
    ups = _updates(state, make_strategy("lora-fair").uploads(state, train_head=False))
    _, _, avg, _ = _run("fedavg", state, ups)
    _, _, ridge, _ = _run("lora-fair", state, ups, {"solver": "ridge", "lam": 0.05})
    for layer in LAYERS:
        a, b = avg.A(layer).double(), avg.B(layer).double()
        resid = _ideal(ups, layer) - b @ a
        db = resid @ a.T @ torch.linalg.inv(a @ a.T + 0.05 * torch.eye(R, dtype=torch.float64))
        torch.testing.assert_close(ridge.B(layer).double(), b + db, rtol=1e-5, atol=1e-5)


def _effective(state, layer, b=None, a=None):
    """Change of the layer's weight relative to the original W0: base change + s B A."""
    base = state.tensors.get(base_name(layer), torch.zeros(D_OUT, D_IN)).double()
    b = state.B(layer) if b is None else b
    a = state.A(layer) if a is None else a
    return base + state.scale * b.double() @ a.double()


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_merging_strategies_make_effective_weights_the_clients_average(name):
    state = _state(b_scale=0.2)
    strategy = make_strategy(name)
    state, server_state = strategy.init(state, seed=0)
    assert all(torch.equal(state.tensors[base_name(layer)], torch.zeros(D_OUT, D_IN)) for layer in LAYERS)
    for round_num in (1, 2):  # the second round builds on the first round's base change
        ups = _updates(state, strategy.uploads(state, train_head=False), seed=round_num)
        new, server_state, metrics = strategy.aggregate(state, ups, round_num, server_state)
        for layer in LAYERS:
            clients = sum(
                pk * _effective(state, layer, u.tensors[f"{layer}.lora_B.weight"], u.tensors[f"{layer}.lora_A.weight"])
                for pk, u in zip(_p(ups), ups, strict=True)
            )
            torch.testing.assert_close(_effective(new, layer), clients, rtol=1e-5, atol=1e-5)
            # what travels to clients: a factored change of the declared rank (the loop counts its bytes)
            change = (new.tensors[base_name(layer)] - state.tensors[base_name(layer)]).double()
            assert 0 < torch.linalg.matrix_rank(change, rtol=1e-4) <= strategy.base_change_rank(len(ups), state.rank)
        state = new
    if name == "flora":  # a fresh LoRA each round: B = 0, A re-drawn
        assert all(torch.count_nonzero(state.B(layer)) == 0 for layer in LAYERS)


def test_fedsa_averages_a_only():
    state = _state(b_scale=0.2)
    strategy = make_strategy("fedsa")
    ups = _updates(state, strategy.uploads(state, train_head=True))
    _, _, new, _ = _run("fedsa", state, ups)
    for layer in LAYERS:
        assert torch.equal(new.B(layer), state.B(layer))
        stacked = np.stack([u.tensors[f"{layer}.lora_A.weight"].numpy() for u in ups])
        np.testing.assert_allclose(
            new.A(layer).numpy(), np.average(stacked, axis=0, weights=[30, 10, 60]), rtol=1e-5, atol=1e-6
        )


def test_flexlora_is_the_truncated_svd_of_the_exact_average():
    state = _state()
    ups = _updates(state, make_strategy("flexlora").uploads(state, train_head=False), ranks=[1, 2, 3])
    _, _, new, m = _run("flexlora", state, ups)
    for layer in LAYERS:
        ideal = _ideal(ups, layer)
        u, s, vh = torch.linalg.svd(ideal)
        best = (u[:, :R] * s[:R]) @ vh[:R]
        torch.testing.assert_close(new.B(layer).double() @ new.A(layer).double(), best, rtol=1e-4, atol=1e-5)
        for rank in (1, 2):  # a client of lower rank keeps the best rank-r_k approximation
            truncated = new.B(layer)[:, :rank].double() @ new.A(layer)[:rank].double()
            torch.testing.assert_close(truncated, (u[:, :rank] * s[:rank]) @ vh[:rank], rtol=1e-4, atol=1e-5)
    assert 0 < m["energy_kept"] <= 1


def test_hetlora_is_a_norm_weighted_zero_padded_mean():
    state = _state()
    ups = _updates(state, make_strategy("hetlora").uploads(state, train_head=False), ranks=[1, 3, 2])
    _, _, new, _ = _run("hetlora", state, ups)
    norms = torch.tensor(
        [
            sum(
                float(
                    (u.tensors[f"{la}.lora_B.weight"].double() @ u.tensors[f"{la}.lora_A.weight"].double()).norm() ** 2
                )
                for la in LAYERS
            )
            ** 0.5
            for u in ups
        ]
    )
    w = norms / norms.sum()
    for layer in LAYERS:
        expected = sum(wk * u.tensors[f"{layer}.lora_B.weight"].double() for wk, u in zip(w, ups, strict=True))
        torch.testing.assert_close(new.B(layer).double(), expected, rtol=1e-5, atol=1e-6)


def test_factored_svd_pads_when_the_product_has_low_rank():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(10, 2, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    left, s, right = factored_svd(u, v, 4)
    assert left.shape == (10, 4) and right.shape == (4, 8) and s[2:].abs().max() == 0
    torch.testing.assert_close((left * s) @ right, u @ v)


def test_strategy_options_are_validated():
    with pytest.raises(ValueError, match="solver must be cosine or ridge"):
        make_strategy("lora-fair", {"solver": "newton"})
    with pytest.raises(ValueError, match="valid: lam, lr, solver, steps"):
        make_strategy("lora-fair", {"lambda": 0.1})
