"""Client-level DP (DP-FedAvg, central noise): epsilon against Opacus's accountant stepped by hand,
the noised mean against its definition, Poisson client sampling, a run reporting both epsilons,
and the strategies it cannot run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedpeft.catalog import check_names
from fedpeft.config import ConfigError
from fedpeft.federation import Federation
from fedpeft.privacy.client_level import ClientLevelDP, clip_update
from fedpeft.report import collect
from fedpeft.state import AdapterState, ClientUpdate
from tests.conftest import tiny_spec


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_client_epsilon_is_opacus_accountant_stepped_by_hand(accountant):
    from opacus.accountants import create_accountant

    spec = tiny_spec(
        federation__clients=40, federation__clients_per_round=8, federation__rounds=6,
        privacy__client_epsilon=4.0, privacy__accountant=accountant,
    )  # fmt: skip
    mechanism = ClientLevelDP.from_spec(spec)
    assert mechanism.rate == 0.2 and mechanism.noise_multiplier > 0
    reference = create_accountant(mechanism=accountant)
    for rounds in range(1, 7):
        reference.step(noise_multiplier=mechanism.noise_multiplier, sample_rate=0.2)
        assert mechanism.epsilon(rounds) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)
    assert 4.0 - 0.05 <= mechanism.epsilon(6) <= 4.0 * (1 + 1e-9)  # calibrated to the target, never above


def _state(shape=(3, 4)) -> AdapterState:
    return AdapterState({"x.lora_B.weight": torch.ones(shape)}, rank=1, alpha=1.0, targets=("x",))


def test_the_noised_mean_is_the_clipped_sum_over_the_expected_count():
    sent = _state()
    deltas = [torch.full((3, 4), 0.01), torch.full((3, 4), 5.0), torch.zeros(3, 4)]  # norms 0.035, 17.3, 0
    updates = [ClientUpdate(k, 100 * (k + 1), {"x.lora_B.weight": 1 + d}) for k, d in enumerate(deltas)]
    mechanism = ClientLevelDP(rate=0.3, noise_multiplier=0.0, clip=1.0, num_clients=10, delta=1e-5,
                              accountant="rdp", secret=False)  # fmt: skip
    out, norms = mechanism.aggregate(updates, sent, ["x.lora_B.weight"], seed=0)
    assert norms == pytest.approx([float(d.norm()) for d in deltas])
    big = deltas[1] / deltas[1].norm()  # clipped to norm S = 1; the small one passes unchanged
    expected = 1 + (deltas[0] + big) / 3.0  # divided by q_c N = 3, not by the 3 that came, nor by weight
    torch.testing.assert_close(out.tensors["x.lora_B.weight"], expected)
    clipped, norm = clip_update(updates[1], sent, 1.0)
    assert norm == pytest.approx(float(deltas[1].norm())) and float(clipped["x.lora_B.weight"].norm()) == pytest.approx(
        1.0
    )


def test_noise_std_is_z_clip_over_expected_clients_even_with_no_client():
    sent = _state((200, 100))
    mechanism = ClientLevelDP(rate=0.25, noise_multiplier=1.5, clip=0.4, num_clients=8, delta=1e-5,
                              accountant="rdp", secret=False)  # fmt: skip
    noise = mechanism.aggregate([], sent, ["x.lora_B.weight"], seed=3)[0].tensors["x.lora_B.weight"] - 1
    expected = 1.5 * 0.4 / 2.0
    assert abs(float(noise.std()) / expected - 1) < 0.03 and abs(float(noise.mean())) < 4 * expected / 141
    again = mechanism.aggregate([], sent, ["x.lora_B.weight"], seed=3)[0].tensors["x.lora_B.weight"] - 1
    assert torch.equal(noise, again)  # seeded: reproducible
    secret = ClientLevelDP(**{**mechanism.__dict__, "secret": True})
    a, b = (secret.aggregate([], sent, ["x.lora_B.weight"], seed=3)[0].tensors["x.lora_B.weight"] for _ in range(2))
    assert not torch.equal(a, b)  # secret: not from the seed


def test_clients_are_poisson_sampled_at_rate_q():
    spec = tiny_spec(federation__clients=20, federation__clients_per_round=5, privacy__client_epsilon=8.0)
    mechanism = ClientLevelDP.from_spec(spec)
    sizes = [len(mechanism.sample(seed)) for seed in range(400)]
    assert sum(sizes) / len(sizes) == pytest.approx(5.0, abs=0.3)  # q_c N, sd 1.94 / sqrt(400)
    assert len(set(sizes)) > 4 and mechanism.sample(7) == mechanism.sample(7)


def test_a_run_reports_the_client_level_and_the_sample_level_epsilon(tmp_path):
    spec = tiny_spec(
        federation__clients=8, federation__clients_per_round=4, federation__rounds=3,
        privacy__epsilon=8.0, privacy__client_epsilon=10.0, privacy__client_clip=0.5,
    )  # fmt: skip
    result = Federation.build(spec).run(tmp_path / "run")
    summary = result.summary
    assert summary["client_target_epsilon"] == 10.0 and summary["client_noise_multiplier"] > 0
    assert summary["client_epsilon"] == pytest.approx(ClientLevelDP.from_spec(spec).epsilon(3))
    assert summary["client_epsilon"] <= 10.0 * (1 + 1e-9) and summary["epsilon"] <= 8.0 * (1 + 1e-9)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["client_epsilon"] for r in rounds] == sorted(r["client_epsilon"] for r in rounds)
    assert all(r["aggregated"] for r in rounds) and result.summary["adapter_change"] > 0
    [run] = collect(tmp_path)
    assert run["strategy"] == "fedavg (client ε=10)"
    plain = Federation.build(tiny_spec(federation__clients=8, federation__clients_per_round=4)).run(tmp_path / "p")
    assert plain.summary["client_epsilon"] is None and not math.isnan(plain.summary["accuracy"])


@pytest.mark.parametrize("strategy", ["lora-fair", "fedex", "flexlora"])
def test_strategies_that_need_each_update_are_refused(strategy):
    with pytest.raises(ConfigError, match="only that sum.*use fedavg, fedsa, fedsvd, ffa"):
        check_names(tiny_spec(strategy__name=strategy, privacy__client_epsilon=4.0))
    robust = tiny_spec(strategy__name="fedavg", strategy__robust="median", privacy__client_epsilon=4.0)
    with pytest.raises(ConfigError, match="does not"):
        check_names(robust)


def test_the_flower_path_runs_client_level_dp_as_in_process(tmp_path, monkeypatch):
    """Under Flower the server's client-level sampling and noise are secret whatever the spec says;
    with the server's keys fixed (the same sequence on both paths) the Flower path is the in-process
    run, rounds with no sampled node included."""
    import dataclasses
    import hashlib
    import itertools

    from fedpeft.flower.executor import FlowerExecutor
    from fedpeft.flower.local import LocalGrid
    from fedpeft.privacy import client_level
    from fedpeft.privacy.randomness import SecretKey

    spec = tiny_spec(federation__clients=4, federation__clients_per_round=1, federation__rounds=3,
                     federation__seed=3, privacy__client_epsilon=20.0)  # fmt: skip
    assert spec.privacy.noise == "seeded"

    def fixed_keys() -> type[SecretKey]:
        counter = itertools.count()
        return type("FixedKey", (SecretKey,), {"draw": classmethod(
            lambda cls: cls(hashlib.sha256(b"server %d" % next(counter)).digest()))})  # fmt: skip

    monkeypatch.setattr(client_level, "SecretKey", fixed_keys())
    reference = Federation.build(spec)
    reference.client_dp = dataclasses.replace(reference.client_dp, secret=True)
    reference = reference.run(tmp_path / "in-process")
    monkeypatch.setattr(client_level, "SecretKey", fixed_keys())
    flower = Federation.build(spec, executor=FlowerExecutor(LocalGrid(4), spec, connect_timeout=0)).run(tmp_path / "f")
    assert flower.summary["randomness"] == {"client_sampling": "secret", "client_noise": "secret"}
    assert [r["clients"] for r in flower.history] == [r["clients"] for r in reference.history]
    for name, tensor in reference.state.tensors.items():
        torch.testing.assert_close(flower.state.tensors[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_under_flower_client_level_sampling_and_noise_cannot_be_recomputed_from_the_spec(tmp_path):
    """A node holds the spec: the seeded in-process run is what it could recompute. The Flower runs
    (real keys) differ from it and from each other, in the aggregate every round."""
    from fedpeft.flower.executor import FlowerExecutor
    from fedpeft.flower.local import LocalGrid

    spec = tiny_spec(federation__clients=4, federation__clients_per_round=2, federation__rounds=2,
                     federation__seed=3, privacy__client_epsilon=20.0)  # fmt: skip
    seeded = Federation.build(spec).run(tmp_path / "seeded")
    assert seeded.summary["randomness"] == {"client_sampling": "seeded", "client_noise": "seeded"}
    runs = [
        Federation.build(spec, executor=FlowerExecutor(LocalGrid(4), spec, connect_timeout=0)).run(tmp_path / f"f{i}")
        for i in range(2)
    ]
    for run in runs:
        assert run.summary["randomness"] == {"client_sampling": "secret", "client_noise": "secret"}
    for a, b in [(runs[0], seeded), (runs[0], runs[1])]:
        for name, tensor in a.state.tensors.items():  # the noise (std z S / 2 per coordinate) differs
            assert not torch.allclose(tensor, b.state.tensors[name], atol=1e-6), name


def test_a_sweep_over_client_level_budgets_labels_and_places_each(tmp_path):
    from fedpeft.sweep import cells

    spec = tiny_spec(
        federation__clients=8, federation__clients_per_round=4, sweep__strategies=["fedavg", "ffa"],
        sweep__client_epsilons=[float("inf"), 4.0], sweep__seeds=[0],
    )  # fmt: skip
    grid = cells(spec, tmp_path)
    assert [(c.spec.strategy.name, c.spec.privacy.client_epsilon) for c in grid] == [
        ("fedavg", math.inf), ("ffa", math.inf), ("fedavg", 4.0), ("ffa", 4.0),
    ]  # fmt: skip
    assert grid[2].path == tmp_path / "fedavg" / "client-eps-4" / "eps-inf" / "seed-0"
    assert grid[2].label == "fedavg (client ε=4) ε=inf seed 0" and grid[0].label == "fedavg ε=inf seed 0"


def test_under_client_level_dp_no_rule_lets_one_client_decide_who_enters_the_sum():
    """The median norm filter compares each update with the others: off under client-level DP, and an
    explicit factor is refused (client clipping already bounds every update)."""
    from fedpeft.validation import OUTLIER_NORM_UNDER_DP, outlier_factor

    both = tiny_spec(privacy__epsilon=8.0, privacy__client_epsilon=4.0, federation__clients=8)
    assert outlier_factor(both) == 0.0 and outlier_factor(tiny_spec(privacy__epsilon=8.0)) == OUTLIER_NORM_UNDER_DP
    with pytest.raises(ConfigError, match="one client would decide"):
        check_names(both.with_flat({"federation.outlier_norm": 2.0}))
