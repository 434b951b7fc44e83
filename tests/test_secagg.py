"""Secure aggregation (Flower's SecAgg+, `federation.secagg`) through the real ClientApp and
Flower's own workflow and mod, on an in-process grid: the aggregate is the plain weighted mean
within the quantisation error, the server never holds one node's update, a node that drops out
mid-protocol is survived, and client-level DP noise is distributed across the clients."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from flwr.app import Error, Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedpeft.build import build_parts
from fedpeft.config import ConfigError
from fedpeft.executors import ClientFailure, SecureSum
from fedpeft.federation import Federation
from fedpeft.flower import secagg, wire
from fedpeft.flower.executor import FlowerExecutor
from fedpeft.flower.local import LocalGrid
from fedpeft.privacy.client_level import ClientLevelDP
from fedpeft.state import ClientUpdate
from tests.conftest import tiny_spec

STEP = 2 * secagg.RANGE / 2**22  # one quantisation level of SecAgg+


def _spec(**overrides):  # noqa: ANN003, ANN202
    # uneven clients (396, 124, 1280 examples) and a batch larger than one of them: unequal weights
    base = {"federation__rounds": 2, "federation__clients": 3, "federation__clients_per_round": 3,
            "data__partition": "dirichlet", "data__dirichlet_alpha": 0.3, "train__batch_size": 200}  # fmt: skip
    return tiny_spec(**{**base, **overrides})


def _run(spec, out, grid: LocalGrid):  # noqa: ANN001, ANN202
    return Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(out)


def _max_diff(a, b) -> float:  # noqa: ANN001
    return max(float((a.tensors[n] - b.tensors[n]).abs().max()) for n in a.tensors)


def _fail_at(stage: str):  # noqa: ANN202
    """A tamper that turns a node's reply at SecAgg+ `stage` into an error (it drops out there)."""

    def tamper(request: Message, reply: Message) -> Message:
        configs = request.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and configs.get(Key.STAGE) == stage:
            return Message(Error(code=3, reason="node went offline"), reply_to=request)
        return reply

    return tamper


def test_the_secure_sum_is_the_plain_weighted_mean_within_quantisation(tmp_path):
    spec = _spec()
    sizes = [len(c) for c in build_parts(spec).data.clients]
    assert min(sizes) < spec.train.batch_size < max(sizes)  # so the weights differ
    plain = _run(spec, tmp_path / "plain", LocalGrid(3))
    secure = _run(spec.with_flat({"federation.secagg": True}), tmp_path / "secure", LocalGrid(3))
    assert [r["clients"] for r in secure.history] == [[0, 1, 2], [0, 1, 2]]
    # each round adds at most a few quantisation levels (stochastic rounding, 3 nodes, weights < 1)
    assert _max_diff(secure.state, plain.state) < 2 * 20 * STEP
    assert _max_diff(secure.state, plain.state) > 0  # it did go through the quantised protocol
    # and the unweighted mean is measurably different: the weights mattered
    unweighted = _run(spec.with_flat({"train.batch_size": 100}), tmp_path / "other", LocalGrid(3))
    assert _max_diff(unweighted.state, plain.state) > 1e3 * STEP


class _Spy(LocalGrid):
    """Records every reply the server receives."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        replies = super().send_and_receive(messages, timeout=timeout)
        self.replies += replies
        return replies


def test_the_server_never_holds_one_nodes_update(tmp_path, monkeypatch):
    spec = _spec(federation__rounds=1, federation__secagg=True)
    truth: dict[int, torch.Tensor] = {}  # what each node put into the sum, seen on the node
    real = secagg.wire.secure_reply

    def record(mean, weight, results, private):  # noqa: ANN001, ANN202
        cid = next(r.client_id for r in results if not isinstance(r, ClientFailure))
        truth[cid] = torch.cat([t.flatten() for t in mean]) * weight
        return real(mean, weight, results, private)

    monkeypatch.setattr(secagg.wire, "secure_reply", record)
    grid = _Spy(3)
    executor = FlowerExecutor(grid, spec, connect_timeout=0)
    federation = Federation.build(spec, executor=executor)
    state = federation.strategy.init(federation.model.state(), 0)[0]
    results = executor.run_round(1, [0, 1, 2], state, federation.plan, {0: 1, 1: 2, 2: 3})
    # at the executor boundary: one SecureSum, no individual update
    assert [type(r) for r in results] == [SecureSum]
    assert sorted(results[0].members) == [0, 1, 2] and len(truth) == 3
    # on the wire: no reply carries an array, and each masked vector is uncorrelated with the
    # node's own weighted change (the quantised change alone would correlate ~1)
    assert all(not record for reply in grid.replies for record in reply.content.array_records.values())
    masked = [
        reply for reply in grid.replies
        if Key.MASKED_PARAMETERS in reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]  # fmt: skip
    assert len(masked) == 3
    for reply in masked:
        cid = wire.node_clients(reply.metadata.src_node_id - 100, 3, 3)[0]
        vectors = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        seen = np.concatenate([v.ravel() for v in vectors[1:]]).astype(np.float64)
        corr = np.corrcoef(seen, truth[cid].numpy())[0, 1]
        assert abs(corr) < 0.1, f"client {cid}'s masked vector correlates {corr:.2f} with its update"


@pytest.mark.parametrize(
    ("stage", "inside"),
    [(Stage.COLLECT_MASKED_VECTORS, [0, 1, 3]), (Stage.UNMASK, [0, 1, 2, 3])],
    ids=["before-its-vector", "after-its-vector"],
)
def test_a_node_that_drops_out_mid_protocol_is_survived(tmp_path, stage, inside):
    """Node 2 (of 4) drops out at `stage`: before it sent its masked vector, the sum is the other
    three's (its pairwise masks rebuilt from its neighbours' shares); after, its vector counts."""
    spec = _spec(federation__rounds=1, federation__clients=4, federation__clients_per_round=4)
    grid = LocalGrid(4)
    grid.tamper[102] = _fail_at(stage)
    secure = _run(spec.with_flat({"federation.secagg": True}), tmp_path / "secure", grid)
    assert secure.history[0]["clients"] == inside
    reference_grid = LocalGrid(4)
    if 2 not in inside:
        reference_grid.crash.add(102)
    plain = _run(spec, tmp_path / "plain", reference_grid)
    assert plain.history[0]["clients"] == inside
    assert _max_diff(secure.state, plain.state) < 20 * STEP


def test_too_few_nodes_left_skip_the_round_and_say_why(tmp_path):
    spec = _spec(federation__rounds=1, federation__secagg=True)
    grid = LocalGrid(3)
    grid.crash.update({101, 102})  # 1 of 3 left: below SecAgg+'s threshold of 2
    result = _run(spec, tmp_path / "run", grid)
    assert result.history[0]["clients"] == [] and not result.history[0]["aggregated"]
    assert all("secure aggregation" in why for why in result.history[0]["dropped"].values())


def test_secagg_needs_flower_and_a_sum_only_strategy(tmp_path):
    with pytest.raises(ConfigError, match="flwr run"):
        Federation.build(_spec(federation__secagg=True))
    with pytest.raises(ConfigError, match="secure aggregation .* fedavg"):
        Federation.build(_spec(federation__secagg=True, strategy__name="fedex"), executor=object())


def test_distributed_noise_shares_sum_to_the_central_noise():
    """m clients each add N(0, (z S)^2 / m): the sum carries N(0, (z S)^2), as the central server would add."""
    spec = tiny_spec(federation__clients=100, federation__clients_per_round=10, privacy__client_epsilon=4.0)
    dp = ClientLevelDP.from_spec(spec)
    sent = build_parts(spec).model.state()
    name = next(iter(sent.tensors))
    zero = ClientUpdate(0, 1, {name: sent.tensors[name].clone()})
    m = 5
    total = sum(dp.noise_share(zero, sent, m)[name] for _ in range(m))
    draws = torch.cat(
        [total.flatten()] + [sum(dp.noise_share(zero, sent, m)[name] for _ in range(m)).flatten() for _ in range(20)]
    )
    expected = dp.noise_multiplier * dp.clip
    assert draws.std().item() == pytest.approx(expected, rel=0.05)
    assert dp.realised(m, m) == dp.noise_multiplier and dp.realised(3, 4) == pytest.approx(
        dp.noise_multiplier * 0.75**0.5
    )


def test_client_level_dp_under_secagg_accounts_the_noise_that_arrived(tmp_path):
    spec = _spec(federation__rounds=2, federation__clients=4, federation__clients_per_round=4,
                 federation__secagg=True, privacy__client_epsilon=8.0, privacy__client_clip=0.5)  # fmt: skip
    grid = LocalGrid(4)
    grid.tamper[103] = _fail_at(Stage.COLLECT_MASKED_VECTORS)
    result = _run(spec, tmp_path / "run", grid)
    dp = ClientLevelDP.from_spec(spec)
    for record in result.history:
        asked = len(record["clients"]) + len(record["dropped"])
        if record["clients"]:
            assert record["client_noise_multiplier"] == pytest.approx(dp.realised(len(record["clients"]), asked))
    realised = [r["client_noise_multiplier"] for r in result.history]
    assert result.summary["client_epsilon"] == pytest.approx(dp.epsilon(2, realised))
    if any(z < dp.noise_multiplier for z in realised):  # a dropout took its share: more epsilon, said so
        assert result.summary["client_epsilon"] > dp.epsilon(2)


def test_every_value_a_node_sends_under_secagg_is_in_the_privacy_table(tmp_path):
    spec = _spec(federation__rounds=1, federation__secagg=True, privacy__epsilon=6.0)
    grid = _Spy(3)
    result = _run(spec, tmp_path / "run", grid)
    assert result.history[0]["clients"] == [0, 1, 2]
    seen = set()
    for reply in grid.replies:
        if reply.has_error() or reply.metadata.message_type != "train":
            continue  # the query replies are checked by tests/test_privacy.py
        for key, record in reply.content.items():
            seen |= {f"secure:{key}." + re.sub(r"^metrics\.\d+\.", "metrics.<c>.", field) for field in record}
    assert seen <= set(wire.REPLY_FIELDS), sorted(seen - set(wire.REPLY_FIELDS))
    assert {wire.REPLY_FIELDS[name][0] for name in seen} <= {wire.DP_OUTPUT, wire.PUBLIC, wire.INDEPENDENT}
    assert {"secure:secaggplus_configs.masked_params", "secure:fitres.metrics.metrics.<c>.epsilon"} <= seen
    assert result.summary["epsilon"] == pytest.approx(6.0, abs=0.05)


def test_a_change_beyond_the_range_saturates_instead_of_failing_the_node(tmp_path, caplog):
    """A failure would tell the server one bit of the node's update: the node clamps and logs it."""
    spec = _spec(federation__rounds=1, federation__secagg=True, train__lr=1e4, privacy__epsilon=5.0)
    secure = _run(spec, tmp_path / "secure", LocalGrid(3))
    assert secure.history[0]["clients"] == [0, 1, 2] and not secure.history[0]["dropped"]
    assert "saturated at SecAgg+'s range" in caplog.text
    parts = build_parts(spec)
    start = parts.strategy.init(parts.model.state(), spec.federation.seed)[0]
    # the mean moved no coordinate further than the range allows (RANGE * max_weight / weight per node)
    assert max(float((secure.state.tensors[n] - start.tensors[n]).abs().max()) for n in start.tensors) < 1e5
