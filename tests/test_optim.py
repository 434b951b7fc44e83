"""Local optimizers and schedules (fedpeft.optim), server optimizers (strategies.server_opt):
against torch's optimizers, against a hand-written DP-SGD + Adam loop over Opacus's noise, and
through the round loop (state reset or kept, resume, executors, update bounds)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from fedpeft.strategies import make_strategy

from fedpeft.client import DPSGD, LocalTraining, poisson_batches, train_client
from fedpeft.config import ConfigError
from fedpeft.federation import Callbacks, Federation
from fedpeft.optim import LocalOptimizer, StackedOptimizer, torch_state
from fedpeft.privacy.accounting import sample_rate
from fedpeft.state import HEAD, LORA_A, LORA_B, ClientUpdate, kind_of
from fedpeft.validation import optimizer_update_bound
from tests.conftest import tiny_spec
from tests.test_dpsgd import _per_example_grads, setup  # noqa: F401  (the fixture)

OPTIMIZERS = {
    "sgd": LocalOptimizer("sgd", lr=0.1, weight_decay=0.01),
    "momentum": LocalOptimizer("momentum", lr=0.1, momentum=0.8, weight_decay=0.01),
    "adam": LocalOptimizer("adam", lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
    "adamw": LocalOptimizer("adamw", lr=0.01, weight_decay=0.1),
}


# -- the stacked (cohort) rules against torch.optim -------------------------------------------------
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_stacked_optimizer_equals_torch_per_client(name):
    """Three clients in one stack, one of them resuming from a kept state two steps old: each row
    takes exactly torch's steps, and hands back torch's state."""
    opt = OPTIMIZERS[name]
    g = torch.Generator().manual_seed(0)
    starts = [torch.randn(4, 3, generator=g) for _ in range(3)]
    grads = [[torch.randn(4, 3, generator=g) for _ in range(3)] for _ in range(5)]  # [step][client]
    # client 1 has trained two steps before (a kept state)
    warm = starts[1].clone().requires_grad_(True)
    warm_opt = opt.build([warm])
    for _ in range(2):
        warm.grad = torch.randn(4, 3, generator=g)
        warm_opt.step()
    kept = torch_state(warm_opt, {"w": warm})
    starts[1] = warm.detach().clone()

    stack = torch.stack(starts).clone()
    stacked = StackedOptimizer(opt, [stack], ["w"], [None, kept, None])
    for step in range(5):
        stacked.step([torch.stack(grads[step])], opt.lr_at(1, step))
    for j in range(3):
        p = starts[j].clone().requires_grad_(True)
        reference = opt.build([p])
        if j == 1 and kept:
            reference.state[p] = {k: v.clone() for k, v in kept["w"].items()}
        for step in range(5):
            p.grad = grads[step][j]
            reference.step()
        torch.testing.assert_close(stack[j], p.detach(), rtol=1e-5, atol=1e-7)
        want = torch_state(reference, {"w": p})
        got = stacked.client_state(j)
        assert set(got) == set(want)
        for key in want.get("w", {}):
            torch.testing.assert_close(got["w"][key].float(), want["w"][key].float(), rtol=1e-5, atol=1e-7)


def test_schedules():
    opt = LocalOptimizer("sgd", lr=1.0, schedule="linear", warmup=2, steps=6)
    assert [opt.lr_at(1, s) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert opt.lr_at(3, 1) == opt.lr_at(1, 1)  # over each round: every round starts again
    cos = LocalOptimizer("sgd", lr=2.0, schedule="cosine", steps=4, rounds=3, schedule_over="run")
    lrs = [cos.lr_at(r, s) for r in (1, 2, 3) for s in range(4)]
    assert lrs == pytest.approx([1 + math.cos(math.pi * t / 12) for t in range(12)])
    assert LocalOptimizer("adam", lr=0.3, steps=5).lr_at(2, 4) == 0.3


# -- DP-SGD with Adam: Adam on Opacus's noised gradient ------------------------------------------
def test_dp_adam_is_adam_on_the_noised_clipped_gradient(setup):  # noqa: F811
    """Three DP steps with Adam on the reference path against a hand loop: batch-of-one gradients,
    clipped jointly to C, summed, Opacus's Gaussian noise (drawn in parameter order from the same
    generator), divided by the expected batch, then Adam's update written out from its paper."""
    model, data, state = setup
    trains = {LORA_A, LORA_B, HEAD}
    uploads = tuple(n for n in model.names if kind_of(n) in trains)
    opt = LocalOptimizer("adam", lr=0.02, betas=(0.9, 0.99), schedule="linear", warmup=1)
    plan = LocalTraining(3, 8, 0.02, frozenset(trains), uploads, optimizer=opt)
    sigma, clip, seed = 0.7, 0.5, 4
    update = train_client(model, state, data, plan, client_id=0, seed=seed, dp=DPSGD(sigma, clip))

    q = sample_rate(plan.batch_size, len(data))
    batches = poisson_batches(len(data), q, plan.steps, torch.Generator().manual_seed(seed))
    noise_gen = torch.Generator().manual_seed(seed + 1)
    model.load(state)
    order = list(model.set_trainable(trains))  # Opacus draws noise in the optimizer's parameter order
    x = {n: state.tensors[n].clone() for n in order}
    m = {n: torch.zeros_like(t) for n, t in x.items()}
    v = {n: torch.zeros_like(t) for n, t in x.items()}
    b1, b2 = opt.betas
    for t, index in enumerate(batches, start=1):
        grads = _per_example_grads(model, state.with_tensors(x), data, index, order)
        total = {n: torch.zeros_like(x[n]) for n in order}
        for g in grads:
            norm = float(torch.sqrt(sum((g[n] ** 2).sum() for n in order)))
            for n in order:
                total[n] += g[n] * min(1.0, clip / (norm + 1e-6))
        lr = plan.local_optimizer.lr_at(1, t - 1)
        for n in order:
            noised = (total[n] + torch.normal(0, sigma * clip, x[n].shape, generator=noise_gen)) / (q * len(data))
            m[n] = b1 * m[n] + (1 - b1) * noised
            v[n] = b2 * v[n] + (1 - b2) * noised**2
            x[n] = x[n] - lr * (m[n] / (1 - b1**t)) / ((v[n] / (1 - b2**t)).sqrt() + 1e-8)
    assert [round(lr, 6) for lr in (plan.local_optimizer.lr_at(1, s) for s in range(3))] == [0.02, 0.02, 0.01]
    for n in uploads:
        torch.testing.assert_close(update.tensors[n], x[n], rtol=1e-4, atol=1e-6)


# -- through the round loop -----------------------------------------------------------------------
def _adam_spec(**kw):
    base = {"train__optimizer": "adam", "train__lr": 0.01, "federation__rounds": 3, "federation__clients_per_round": 2}
    return tiny_spec(**{**base, **kw})


def test_optimizer_state_is_reset_by_default_and_kept_when_asked(tmp_path):
    reset = Federation.build(_adam_spec())
    reset.run(tmp_path / "reset")
    assert reset.executor.store.optimizer == {}
    keep = Federation.build(_adam_spec(train__optimizer_state="keep"))
    result = keep.run(tmp_path / "keep")
    rounds_trained: dict[int, int] = {}
    for record in result.history:
        for cid in record["clients"]:
            rounds_trained[cid] = rounds_trained.get(cid, 0) + 1
    kept = keep.executor.store.optimizer
    assert set(kept) == set(rounds_trained)
    for cid, n in rounds_trained.items():
        steps = {float(s["step"]) for s in kept[cid].values()}
        assert steps == {5.0 * n}, (cid, steps)  # Adam's step count runs across the client's rounds
    # keeping state changes the result (a client resumes its moments), and never reaches the server
    differs = any(not torch.equal(t, result.state.tensors[n]) for n, t in reset.model.state().tensors.items())
    assert differs


@pytest.mark.parametrize("optimizer", ["momentum", "adamw"])
def test_cohort_equals_sequential_with_stateful_optimizers(tmp_path, optimizer):
    overrides = {"train__optimizer": optimizer, "train__lr": 0.05 if optimizer == "momentum" else 0.01}
    spec = tiny_spec(federation__rounds=2, train__optimizer_state="keep", train__schedule="cosine", **overrides)
    seq = Federation.build(spec).run(tmp_path / "seq")
    coh = Federation.build(
        dataclasses.replace(spec, federation=dataclasses.replace(spec.federation, executor="cohort"))
    )
    cohort = coh.run(tmp_path / "coh")
    for name, tensor in seq.state.tensors.items():
        torch.testing.assert_close(cohort.state.tensors[name], tensor, rtol=1e-4, atol=1e-5)
    assert any(
        not torch.equal(t, seq.state.tensors[n]) for n, t in Federation.build(spec).model.state().tensors.items()
    )


class _Crash(Exception):
    pass


@pytest.mark.parametrize("executor", ["sequential", "cohort"])
def test_resume_is_bit_identical_with_kept_adam_state(tmp_path, executor):
    spec = _adam_spec(train__optimizer_state="keep", privacy__epsilon=8.0, federation__rounds=4,
                      federation__executor=executor)  # fmt: skip
    full = Federation.build(spec).run(tmp_path / "full")

    def crash(record):
        if record["round"] == 2:
            raise _Crash

    with pytest.raises(_Crash):
        Federation.build(spec).run(tmp_path / "cut", callbacks=Callbacks(on_round_end=crash))
    resumed = Federation.build(spec).run(tmp_path / "cut", resume=True)
    for name, tensor in full.state.tensors.items():
        assert torch.equal(tensor, resumed.state.tensors[name]), name
    assert [r["accuracy"] for r in resumed.history] == [r["accuracy"] for r in full.history]
    assert all(not r["dropped"] for r in full.history)  # every honest Adam update within the bound


def test_run_learns_with_adamw_under_dp_in_both_executors(tmp_path):
    for executor in ("sequential", "cohort"):
        spec = tiny_spec(
            train__optimizer="adamw", train__lr=0.05, privacy__epsilon=8.0, federation__rounds=6,
            train__local_steps=10, federation__clients_per_round=4, federation__executor=executor,
        )  # fmt: skip
        result = Federation.build(spec).run(tmp_path / executor)
        assert all(not r["dropped"] for r in result.history), result.history
        assert result.summary["accuracy"] >= result.summary["majority_rate"] + 0.1, result.history


def test_bad_optimizer_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="train.optimizer must be one of sgd, momentum, adam, adamw"):
        tiny_spec(train__optimizer="lion")
    with pytest.raises(ConfigError, match="train.betas must be two numbers"):
        tiny_spec(train__betas=(0.9,))
    with pytest.raises(ConfigError, match="train.schedule must be one of"):
        tiny_spec(train__schedule="step")


# -- the update bound an honest client of each optimizer stays within -------------------------------
def test_one_adam_step_reaches_its_bound_exactly_and_never_passes_it():
    """Adam's first step moves every coordinate by lr (m_hat / sqrt(v_hat) = sign g): the bound is
    tight there, and holds for every later step whatever the gradients."""
    d = 50
    for steps in (1, 7):
        opt = LocalOptimizer("adam", lr=0.01, steps=steps)
        bound = optimizer_update_bound(opt, steps, 1.0, 1.0, 4.0, d, 0.0)
        g = torch.Generator().manual_seed(steps)
        for _ in range(20):
            p = torch.zeros(d, requires_grad=True)
            torch_opt = opt.build([p])
            for _ in range(steps):  # adversarial-ish: gradients of wildly different scales and signs
                p.grad = torch.randn(d, generator=g) * 10 ** float(torch.randint(-3, 3, (1,), generator=g))
                torch_opt.step()
            assert float(p.detach().norm()) <= bound * (1 + 1e-6)
        if steps == 1:
            assert float(p.detach().norm()) == pytest.approx(bound, rel=1e-4)


def test_momentum_bound_admits_an_honest_run_and_sgd_bound_is_unchanged():
    from fedpeft.validation import dp_update_bound

    sgd = LocalOptimizer("sgd", lr=0.3, steps=10)
    assert optimizer_update_bound(sgd, 10, 2.0, 1.0, 8.0, 100, 5.0) == dp_update_bound(0.3, 10, 2.0, 1.0, 8.0, 100)
    momentum = LocalOptimizer("momentum", lr=0.3, momentum=0.9, steps=10)
    assert optimizer_update_bound(momentum, 10, 2.0, 1.0, 8.0, 100, 5.0) == pytest.approx(
        dp_update_bound(3.0, 10, 2.0, 1.0, 8.0, 100)
    )
    # weight decay: a finite bound while lr * wd * steps < 1, none past it
    decayed = dataclasses.replace(sgd, weight_decay=0.1)
    assert optimizer_update_bound(decayed, 10, 2.0, 1.0, 8.0, 100, 5.0) > optimizer_update_bound(
        sgd, 10, 2.0, 1.0, 8.0, 100, 5.0
    )
    assert optimizer_update_bound(dataclasses.replace(sgd, weight_decay=1.0), 10, 2.0, 1.0, 8.0, 100, 5.0) == math.inf


# -- server optimizers ---------------------------------------------------------------------------
def _updates(state, values, names):
    """One update per (value, weight): every tensor filled with the value."""
    return [
        ClientUpdate(i, n, {name: torch.full(state.tensors[name].shape, v) for name in names}, {})
        for i, (v, n) in enumerate(values)
    ]


def _state():
    federation = Federation.build(tiny_spec())
    return federation.model.state()


def test_server_avgm_at_zero_momentum_and_lr_one_is_the_strategy_itself():
    state = _state()
    names = [n for n in state.tensors if kind_of(n) in (LORA_A, LORA_B)]
    g = torch.Generator().manual_seed(1)
    updates = [
        ClientUpdate(i, 10 + i, {n: torch.randn(state.tensors[n].shape, generator=g) for n in names}, {})
        for i in range(3)
    ]
    plain, _, _ = make_strategy("fedavg").aggregate(state, updates, 1, {})
    wrapped = make_strategy("fedavg", {"server_optimizer": "avgm", "server_momentum": 0.0, "server_lr": 1.0})
    new, server_state, _ = wrapped.aggregate(state, updates, 1, {})
    for n in names:
        torch.testing.assert_close(new.tensors[n], plain.tensors[n])
    assert set(server_state["server_optimizer"]["m"]) == set(names)


def test_server_adam_and_yogi_follow_reddi_et_al():
    """Two rounds of FedAdam / FedYogi on a scalar-valued adapter, against the formulas by hand."""
    state = _state()
    names = [n for n in state.tensors if kind_of(n) == LORA_B]
    x0 = {n: state.tensors[n].double() for n in names}
    rounds = [[(1.0, 1), (3.0, 3)], [(-2.0, 2), (0.0, 2)]]  # weighted means 2.5, then -1.0
    for how in ("adam", "yogi"):
        opts = {"server_optimizer": how, "server_lr": 0.1, "server_betas": [0.9, 0.99], "server_tau": 0.01}
        strategy = make_strategy("ffa", opts)
        current, server_state = state, {}
        x = {n: x0[n].clone() for n in names}
        m = {n: torch.zeros_like(x[n]) for n in names}
        v = {n: torch.full_like(x[n], 0.01**2) for n in names}
        for values in rounds:
            current, server_state, _ = strategy.aggregate(current, _updates(state, values, names), 1, server_state)
            mean = sum(val * n for val, n in values) / sum(n for _, n in values)
            for n in names:
                delta = mean - x[n]
                m[n] = 0.9 * m[n] + 0.1 * delta
                v[n] = (
                    0.99 * v[n] + 0.01 * delta**2
                    if how == "adam"
                    else v[n] - 0.01 * delta**2 * torch.sign(v[n] - delta**2)
                )
                x[n] = x[n] + 0.1 * m[n] / (v[n].sqrt() + 0.01)
        for n in names:
            torch.testing.assert_close(current.tensors[n].double(), x[n], rtol=1e-5, atol=1e-6)


def test_server_optimizer_refuses_refactorising_strategies_and_bad_options():
    with pytest.raises(ValueError, match="strategy 'fedsvd' does more"):
        make_strategy("fedsvd", {"server_optimizer": "adam"})
    with pytest.raises(ValueError, match="unknown server optimizer option"):
        make_strategy("fedavg", {"server_optimizer": "adam", "server_speed": 2})
    with pytest.raises(ValueError, match="server_optimizer must be one of none, avgm, adam, yogi"):
        make_strategy("fedavg", {"server_optimizer": "sgdm"})
    assert make_strategy("fedavg", {"server_optimizer": "none"}).name == "fedavg"
    assert make_strategy("fedsa", {"server_optimizer": "avgm"}).sum_only


def test_server_optimizer_runs_checkpoints_and_resumes(tmp_path):
    spec = tiny_spec(strategy__name="fedavg", strategy__server_optimizer="adam", strategy__server_lr=0.05,
                     federation__rounds=3)  # fmt: skip
    full = Federation.build(spec).run(tmp_path / "full")

    def crash(record):
        if record["round"] == 1:
            raise _Crash

    with pytest.raises(_Crash):
        Federation.build(spec).run(tmp_path / "cut", callbacks=Callbacks(on_round_end=crash))
    resumed = Federation.build(spec).run(tmp_path / "cut", resume=True)
    for name, tensor in full.state.tensors.items():
        assert torch.equal(tensor, resumed.state.tensors[name]), name
    plain = Federation.build(tiny_spec(strategy__name="fedavg", federation__rounds=3)).run(tmp_path / "plain")
    assert any(not torch.equal(t, full.state.tensors[n]) for n, t in plain.state.tensors.items())


def test_kept_optimizer_state_survives_a_node_restart(tmp_path):
    from fedpeft.flower.executor import FlowerExecutor
    from fedpeft.flower.local import LocalGrid

    spec = tiny_spec(train__optimizer="adam", train__lr=0.01, train__optimizer_state="keep", federation__rounds=2,
                     federation__clients=2, federation__clients_per_round=2, privacy__epsilon=8.0)  # fmt: skip
    grid = LocalGrid(2, state_dir=tmp_path / "state")

    def restart_after_round_1(record: dict) -> None:
        if record["round"] == 1:
            grid.restart(100)
            grid.restart(101)

    fed = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0))
    result = fed.run(tmp_path / "flower", callbacks=Callbacks(on_round_end=restart_after_round_1))
    assert all(not r["dropped"] for r in result.history), result.history
    files = sorted(p.name for p in (tmp_path / "state").rglob("*-optimizer.pt"))
    assert files == ["client-0-optimizer.pt", "client-1-optimizer.pt"]
    kept = torch.load(next((tmp_path / "state").rglob("client-0-optimizer.pt")), weights_only=True)
    assert {float(s["step"]) for s in kept.values()} == {10.0}  # two rounds of 5 steps, across a restart


def test_budget_of_a_client_is_unchanged_by_the_optimizer():
    """The optimizer is post-processing: the same spec's ledger and sigma whatever it is."""
    sigmas = []
    for optimizer in ("sgd", "adamw"):
        federation = Federation.build(tiny_spec(privacy__epsilon=4.0, train__optimizer=optimizer))
        sigmas.append(federation.sigmas)
    assert sigmas[0] == sigmas[1]
