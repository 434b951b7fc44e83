"""Per-client ledgers and calibration against Opacus's own accountants."""

import pytest

from fedpeft.privacy.accounting import ClientBudget, calibrate_budget, calibrate_sigma, epsilon


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_ledger_matches_opacus_accountant_stepped_by_hand(name):
    from opacus.accountants import create_accountant

    budget = ClientBudget(client_id=0, sigma=0.9, q=0.02, target_epsilon=50.0, delta=1e-5, accountant=name)
    reference = create_accountant(mechanism=name)
    for steps in (10, 7, 10):  # three rounds; the middle one ended early
        budget.record(steps)
        for _ in range(steps):
            reference.step(noise_multiplier=0.9, sample_rate=0.02)
    assert budget.steps == 27 and budget.history == [(0.9, 0.02, 27)]
    assert budget.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)


def test_known_values_from_design():
    """sigma 0.454, q 0.0054, 100 steps, delta 1e-5: RDP 8.0, PRV 6.4 (DESIGN.md)."""
    history = ((0.454, 0.0054, 100),)
    assert epsilon(history, 1e-5, "rdp") == pytest.approx(8.0, abs=0.05)
    assert epsilon(history, 1e-5, "prv") == pytest.approx(6.4, abs=0.1)


def test_heterogeneous_history_composes():
    mixed = epsilon(((1.0, 0.01, 50), (2.0, 0.05, 30)), 1e-5, "rdp")
    assert mixed > epsilon(((1.0, 0.01, 50),), 1e-5, "rdp")
    assert mixed > epsilon(((2.0, 0.05, 30),), 1e-5, "rdp")


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_calibrated_sigma_meets_target_tightly(name):
    sigma = calibrate_sigma(4.0, 1e-5, 0.02, 120, name)
    spent = epsilon(((sigma, 0.02, 120),), 1e-5, name)
    assert 3.95 <= spent <= 4.0
    assert epsilon(((sigma * 0.97, 0.02, 120),), 1e-5, name) > spent


def test_plan_is_worst_case_and_refuses_past_budget():
    budget = calibrate_budget(
        0, 500, batch_size=25, rounds=3, local_steps=10, target_epsilon=2.0, delta=1e-5, accountant="rdp"
    )
    assert budget.q == pytest.approx(0.05)
    for _ in range(3):
        assert budget.allows(10)
        budget.record(10)
    assert budget.epsilon <= 2.0
    assert not budget.allows(10)  # a fourth round would overspend
    assert budget.epsilon_after(10) > 2.0


def test_unreachable_budget_says_what_to_change():
    with pytest.raises(ValueError, match="raise privacy.epsilon"):
        calibrate_sigma(1e-4, 1e-5, 1.0, 10_000, "rdp")


def test_budget_round_trips_through_dict():
    b = ClientBudget(3, 0.7, 0.1, 8.0, 1e-5, "prv")
    b.record(5)
    assert ClientBudget.from_dict(b.to_dict()) == b


@pytest.mark.parametrize(
    ("q", "steps", "target"), [(0.0114, 50, 8.0), (0.05, 100, 2.0), (1.0, 10, 8.0), (0.2, 30, 0.5)]
)
def test_prv_search_lands_within_tolerance_below_the_target(q, steps, target):
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    sigma = calibrate_sigma(target, 1e-5, q, steps, "prv")
    spent = epsilon(((sigma, q, steps),), 1e-5, "prv")
    assert target - 0.01 <= spent <= target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's numerical warnings at q = 1 and large sigma
        reference = get_noise_multiplier(
            target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps, accountant="prv"
        )
    # Opacus's own search lands in the same tolerance band (sigma within 2%: epsilon is flat in sigma)
    assert sigma == pytest.approx(reference, rel=0.02)


def test_accounting_results_are_cached_on_disk_across_processes(tmp_path):
    import subprocess
    import sys

    code = (
        "import time; from fedpeft.privacy.accounting import calibrate_sigma as c;"
        "t = time.perf_counter(); s = c(3.0, 1e-5, 0.037, 77, 'prv'); print(s, time.perf_counter() - t)"
    )
    env = {**__import__("os").environ, "FEDPEFT_CACHE_DIR": str(tmp_path)}
    first = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    second = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert first[0] == second[0]  # the same sigma
    assert float(second[1]) < 0.2 < float(first[1])  # computed once, then read
    (next(tmp_path.glob("accounting-*.json"))).write_text("{torn")
    third = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert third[0] == first[0]  # a torn cache is ignored and rebuilt
