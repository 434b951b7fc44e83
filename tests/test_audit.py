"""The empirical privacy audit: it sees a leak when there is one, and none under DP-SGD."""

from __future__ import annotations

import hashlib
import itertools
import math

import pytest

from fedpeft.config import Spec
from fedpeft.flower.audit_node import FAULTS as FAULT_SCALE
from fedpeft.privacy.audit import AUDIT_SPEC, audit, clopper_pearson, epsilon_lower_bound
from fedpeft.privacy.randomness import SecretKey


def test_clopper_pearson_and_the_bound_against_known_values():
    lo, hi = clopper_pearson(0, 30)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 30), rel=1e-9)  # the exact 0-successes bound
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.187086, abs=1e-5) and hi == pytest.approx(0.812914, abs=1e-5)
    # perfect separation on m trials per side: log((1 - hi) / hi) with hi the 0-of-m upper bound
    hi = 1 - 0.025 ** (1 / 30)
    assert epsilon_lower_bound(0, 0, 30, 0.0) == pytest.approx(math.log((1 - hi) / hi))
    assert epsilon_lower_bound(15, 15, 30, 1e-5) == 0.0  # a coin flip proves nothing


@pytest.fixture
def repeatable_secrets(monkeypatch):
    """The audit's nodes draw secret keys; here a fixed sequence, so the test cannot flake."""
    counter = itertools.count(1)
    fixed = classmethod(lambda cls: cls(hashlib.sha256(b"audit %d" % next(counter)).digest()))
    monkeypatch.setattr(SecretKey, "draw", fixed)


def _spec(epsilon: float) -> Spec:
    return Spec().with_flat(AUDIT_SPEC).with_flat({"privacy.epsilon": epsilon})


def test_the_control_without_noise_shows_a_leak(repeatable_secrets):
    result = audit(_spec(1.0), trials=60, no_noise=True)
    # above the claim of 1; perfect separation on 30 held-out trials shows at most 1.53 at the Bonferroni level
    assert result.bounds["canary_gradient"] > 1.2
    assert result.bounds["reply.train_loss"] > 1.0  # and the raw loss a node must not send under DP


def test_under_dp_no_statistic_of_the_reply_beats_the_claim(repeatable_secrets):
    result = audit(_spec(1.0), trials=40)
    assert {"canary_gradient", "canary_loss", "reply.epsilon", "reply.sigma", "reply.num_examples"} <= set(
        result.bounds
    )
    assert "reply.train_loss" not in result.bounds  # not sent under DP
    assert all(bound < 1.0 for bound in result.bounds.values()), result.bounds
    # the white-box noise check sees the claimed noise, fresh each time, and nothing the server can replay
    assert result.pairs == 10 and 0.9 < result.noise_ratio < 1.1 and result.noise_p > 0.01
    assert result.identical_pairs == 0 and result.replay_matches == 0 and not result.failures


@pytest.mark.parametrize(
    ("fault", "why"),
    [("sigma/2", "noise: variance"), ("sigma/10", "noise: variance"), ("seeded", "replayed from the server's seeds")],
)
def test_the_audit_fails_a_node_that_draws_too_little_or_server_known_noise(repeatable_secrets, fault, why):
    result = audit(_spec(1.0), trials=4, pairs=3, fault=fault)
    assert any(why in line for line in result.failures), result.failures
    if fault == "seeded":
        assert result.identical_pairs == result.replay_matches == 3
    else:
        assert result.noise_ratio == pytest.approx(FAULT_SCALE[fault] ** 2, rel=0.15)


def test_the_noise_checks_power_at_the_default_pairs_is_stated_in_sigma_and_epsilon():
    from fedpeft.privacy.audit import noise_power

    spec = _spec(1.0)
    power = noise_power(10 * 2114, 7, spec, 32)  # ten pairs of the audit spec's 2,114 uploaded numbers
    assert 0.97 < power["sigma_factor"] < 1.0  # fails a node 2-3% short of its sigma 95% of the time
    assert 1.0 < power["epsilon_spent"] < 1.1  # which spends a little more than the claim


@pytest.mark.slow
@pytest.mark.parametrize("claim", [1.0])  # the tightest claim 200 trials can test well (2.0 passed too: 3 min more)
def test_under_dp_the_audit_with_more_trials_stays_below_the_claim(claim):
    # 200 trials a side can prove at most epsilon 3.98 (perfect separation at the 95% bounds): a
    # claim above that could not fail here (epsilon 8 was such a case and is no longer run)
    assert epsilon_lower_bound(0, 0, 200, _spec(claim).privacy.delta) > claim
    result = audit(_spec(claim), trials=200)  # the nodes' real secret randomness
    assert all(bound < claim for bound in result.bounds.values()), result.bounds
    assert not result.failures, result.failures  # the shipped node passes the noise check and the replay


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sigma/2", "seeded"])
def test_the_audit_at_its_defaults_fails_a_broken_node(fault):
    result = audit(_spec(1.0), trials=10, fault=fault)  # the default 10 pairs, real secret randomness
    assert result.failures
