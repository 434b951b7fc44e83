"""Strategy properties the comparison depends on (issue 15): the head is averaged by examples by
every strategy, LoRA-FAIR's correction does not depend on the scale of B, and FFA's orthonormal-A
ablation has FedSVD's singular values on FFA's row space."""

from __future__ import annotations

import pytest
import torch
from fedpeft.strategies import STRATEGIES, make_strategy
from fedpeft.strategies.ffa import orthonormal_rows

from fedpeft.state import HEAD, ClientUpdate, kind_of
from tests.test_strategy_suite import LAYERS, _run, _state, _updates


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_averages_the_head_by_examples(name):
    state = _state(b_scale=0.3)
    names = make_strategy(name).uploads(state, train_head=True)
    ups = _updates(state, names, sizes=(30, 10, 60))
    # one client's factors much larger than the others': norm weights (HetLoRA's) would favour it
    big = ups[1].tensors
    for n in big:
        if kind_of(n) != HEAD:
            big[n] = big[n] * 20
    _, _, new, _ = _run(name, state, ups)
    p = torch.tensor([0.3, 0.1, 0.6], dtype=torch.float64)
    for n in ("head.weight", "head.bias"):
        expected = sum(pk * u.tensors[n].double() for pk, u in zip(p, ups, strict=True))
        torch.testing.assert_close(new.tensors[n].double(), expected, rtol=1e-5, atol=1e-6, msg=f"{name}: {n}")


def _scaled(updates: list[ClientUpdate], c: float) -> list[ClientUpdate]:
    return [
        ClientUpdate(u.client_id, u.num_examples, {n: t * c if kind_of(n) == "B" else t for n, t in u.tensors.items()})
        for u in updates
    ]


@pytest.mark.parametrize("c", [100.0, 0.01])
def test_lora_fair_correction_does_not_depend_on_the_scale_of_b(c):
    """cos is scale-free and the regulariser is relative to ||B_avg||^2, so scaling every client's
    B by c scales the corrected B by c: the correction neither vanishes (large B) nor runs free
    (small B), which an absolute lam * ||dB||^2 did."""
    state = _state(b_scale=0.3)
    ups = _updates(state, make_strategy("lora-fair").uploads(state, train_head=False))
    options = {"lam": 0.5, "steps": 200}
    _, _, avg, _ = _run("fedavg", state, ups)
    _, _, fair, _ = _run("lora-fair", state, ups, options)
    _, _, fair_c, _ = _run("lora-fair", state, _scaled(ups, c), options)
    for layer in LAYERS:
        correction = (fair.B(layer) - avg.B(layer)).norm() / avg.B(layer).norm()
        assert correction > 1e-2, "the regulariser left no correction to compare"
        torch.testing.assert_close(fair_c.B(layer).double() / c, fair.B(layer).double(), rtol=1e-4, atol=1e-6)


def test_ffa_orthonormal_a_keeps_the_row_space_with_unit_singular_values():
    state = _state()
    strategy = make_strategy("ffa", {"init_a": "orthonormal"})
    ortho, _ = strategy.init(state, seed=0)
    for layer in LAYERS:
        a0, a = state.A(layer).double(), ortho.A(layer).double()
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)
        project = a0.T @ torch.linalg.pinv(a0 @ a0.T) @ a0  # onto the row space of the kaiming A
        torch.testing.assert_close(a @ project, a, rtol=0, atol=1e-5)
        assert torch.equal(ortho.B(layer), state.B(layer))
    ups = _updates(ortho, strategy.uploads(ortho, train_head=False))
    new, _, _ = strategy.aggregate(ortho, ups, 1, {})
    assert all(torch.equal(new.A(layer), ortho.A(layer)) for layer in LAYERS)  # still frozen
    with pytest.raises(ValueError, match="init_a must be kaiming or orthonormal"):
        make_strategy("ffa", {"init_a": "svd"})


def test_kaiming_a_has_singular_values_near_one_over_sqrt_3():
    """The scale FedSVD's A leaves behind after its first re-factor: the 3x step ratio (issue 15)."""
    from fedpeft.strategies.base import kaiming_a

    a = kaiming_a((8, 384), torch.Generator().manual_seed(0)).double()
    s = torch.linalg.svdvals(a)
    assert 0.5 < float(s.min()) and float(s.max()) < 0.67 and abs(float(s.mean()) - 3**-0.5) < 0.03
    assert torch.allclose(
        torch.linalg.svdvals(orthonormal_rows(a.float()).double()), torch.ones(8, dtype=torch.float64)
    )
