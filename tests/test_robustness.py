"""One bad node cannot break or poison a federation: malformed replies, hostile numbers and tensors,
duplicate identities, and the run's own files (a lock, torn files, checkpoint fallback)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fedpeft.strategies import make_strategy
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.client import LocalTraining
from fedpeft.config import ConfigError
from fedpeft.executors import ClientFailure
from fedpeft.federation import Federation
from fedpeft.flower import wire
from fedpeft.flower.executor import FlowerExecutor
from fedpeft.flower.local import LocalGrid, pushed
from fedpeft.flower.untrusted import node_text
from fedpeft.state import AdapterState, ClientUpdate
from fedpeft.validation import UpdateLimits, dp_update_bound, validate_update
from tests.conftest import tiny_spec
from tests.runtime_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


# -- malformed replies never leave the round: a property test over random replies ------------------
class ReplyGrid(LocalGrid):
    """One node (partition 0 of 1) whose train reply is whatever the test hands it."""

    def __init__(self) -> None:
        super().__init__(1)
        self.content: RecordDict | None = None

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        replies = []
        for message in messages:
            pushed(message)
            if message.metadata.message_type == "query":
                replies.append(Message(wire.query_reply(0, 1), reply_to=message))
            else:
                replies.append(Message(self.content, reply_to=message))
        return replies


STATE = AdapterState({"l.lora_A.weight": torch.zeros(2, 3), "l.lora_B.weight": torch.zeros(3, 2)}, 2, 2.0, ("l",))
PLAN = LocalTraining(steps=2, batch_size=4, lr=0.1, trains=frozenset({"A", "B"}), uploads=tuple(STATE.tensors))
NUMBERS = st.one_of(
    st.integers(-5, 10**13), st.floats(allow_nan=True, allow_infinity=True), st.just(math.nan), st.just(math.inf)
)


@st.composite
def replies(draw):  # noqa: ANN001, ANN201
    """A node's reply, every part of which may be missing, of the wrong type, or hostile."""
    content = RecordDict()
    status = draw(st.sampled_from(["ok", "refused", "missing", "no-key", "not-json", "list", "bad-values"]))
    refused = {"ok": "{}", "refused": '{"0": "spent"}', "not-json": "{oops", "list": "[0]", "bad-values": '{"0": 3}'}
    if status in refused:
        content[wire.STATUS] = ConfigRecord({wire.REFUSED: refused[status]})
    elif status == "no-key":
        content[wire.STATUS] = ConfigRecord({"other": 1})
    update = draw(st.sampled_from(["ok", "missing", "wrong-type", "wrong-shape", "nan"]))
    tensors = {n: t.clone() for n, t in STATE.tensors.items()}
    if update == "wrong-shape":
        tensors["l.lora_A.weight"] = torch.zeros(2, 4)
    if update == "nan":
        tensors["l.lora_B.weight"][0, 0] = math.nan
    if update == "wrong-type":
        content[wire.update_key(0)] = ConfigRecord({"x": 1})
    elif update != "missing":
        content[wire.update_key(0)] = ArrayRecord({k: v.contiguous() for k, v in tensors.items()})
    metrics = draw(st.dictionaries(st.sampled_from([wire.NUM_EXAMPLES, "epsilon", "sigma", wire.RANK, "x"]), NUMBERS))
    if draw(st.booleans()):
        content[wire.metrics_key(0)] = MetricRecord(metrics)
    return content, status, update, metrics


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies())
def test_any_malformed_reply_is_a_failure_with_a_reason_never_an_exception(reply):
    content, status, update, metrics = reply
    spec = tiny_spec(federation__clients=1, federation__clients_per_round=1)
    grid = ReplyGrid()
    grid.content = content
    executor = FlowerExecutor(grid, spec, connect_timeout=0)
    (result,) = executor.run_round(1, [0], STATE, PLAN, {0: 1})
    limits = UpdateLimits(max_examples=PLAN.batch_size * PLAN.steps, model_rank=2)
    sound = (
        status == "ok" and update == "ok" and wire.metrics_key(0) in content
        and isinstance(metrics.get(wire.NUM_EXAMPLES), int) and 1 <= metrics[wire.NUM_EXAMPLES] <= 8
        and all(math.isfinite(v) for v in metrics.values())
        and all(metrics.get(k, 0) >= 0 for k in ("epsilon", "sigma"))
        and (wire.RANK not in metrics or (isinstance(metrics[wire.RANK], int) and 1 <= metrics[wire.RANK] <= 2))
    )  # fmt: skip
    if isinstance(result, ClientFailure):
        assert result.reason
        assert not sound or status == "refused"
        return
    reason = validate_update(result, list(PLAN.uploads), STATE, limits)
    assert (reason is None) == sound, (reason, content)


def test_a_refusal_reason_cannot_forge_a_log_line_or_colour_the_terminal():
    forged = "spent\nround   9: accuracy 1.0000 \x1b[31mALL CLEAR\x1b[0m\r\x00" + "x" * 5000
    spec = tiny_spec(federation__clients=1, federation__clients_per_round=1)
    grid = ReplyGrid()
    grid.content = RecordDict({wire.STATUS: ConfigRecord({wire.REFUSED: json.dumps({"0": forged})})})
    (result,) = FlowerExecutor(grid, spec, connect_timeout=0).run_round(1, [0], STATE, PLAN, {0: 1})
    assert isinstance(result, ClientFailure) and result.refused
    assert result.reason.startswith("spent\\nround   9")  # the newline shown as its escape, on one line
    assert not any(c in result.reason for c in "\n\r\x1b\x00")
    assert "\\x1b[31m" in result.reason and len(result.reason) <= 1000
    assert node_text("plain words: 0.5, ok") == "plain words: 0.5, ok"


def test_an_oversized_tensor_is_refused_before_it_is_decoded(monkeypatch):
    spec = tiny_spec(federation__clients=1, federation__clients_per_round=1)
    decoded = []
    monkeypatch.setattr(wire, "from_record", lambda record: decoded.append(record) or {})
    inflated = Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=b"\0" * 10**7)  # 10 MB "3 x 2"
    for tensors, why in [
        ({**STATE.tensors, "l.lora_A.weight": torch.zeros(2, 3_000_000)}, "shape (2, 3000000) in 24,000,"),
        ({**STATE.tensors, "l.lora_B.weight": inflated}, "shape (3, 2) in 10,000,000 bytes, expected (3, 2)"),
        ({**STATE.tensors, "extra": torch.zeros(1)}, "unexpected tensor 'extra'"),
    ]:
        grid = ReplyGrid()
        arrays = {n: t if isinstance(t, Array) else Array(t.contiguous()) for n, t in tensors.items()}
        grid.content = RecordDict({
            wire.STATUS: ConfigRecord({wire.REFUSED: "{}"}),
            wire.update_key(0): ArrayRecord(arrays),
            wire.metrics_key(0): MetricRecord({wire.NUM_EXAMPLES: 8}),
        })  # fmt: skip
        (result,) = FlowerExecutor(grid, spec, connect_timeout=0).run_round(1, [0], STATE, PLAN, {0: 1})
        assert isinstance(result, ClientFailure) and why in result.reason, result
    assert decoded == []  # none of them was decoded


def test_a_partition_query_without_config_is_ignored_with_a_reason(tmp_path, caplog):
    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2)
    grid = LocalGrid(2)
    grid.tamper[101] = lambda request, reply: Message(RecordDict(), reply_to=request)
    original = grid.send_and_receive

    def queries_too(messages, *, timeout=None):  # noqa: ANN001, ANN202
        out = original(messages, timeout=timeout)
        return [Message(RecordDict(), reply_to=m) if m.metadata.dst_node_id == 101 else r
                for m, r in zip(messages, out, strict=True)]  # fmt: skip

    grid.send_and_receive = queries_too
    result = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(tmp_path / "run")
    assert result.history[0]["clients"] == [0]
    assert "malformed partition reply" in caplog.text


# -- hostile numbers and tensors ---------------------------------------------------------------------
def test_the_dp_bound_holds_for_honest_clients_and_stops_a_scaled_one(tmp_path):
    """Honest DP-SGD updates sit well inside the bound; the same update x10 does not."""
    spec = tiny_spec(federation__rounds=2, federation__clients=4, federation__clients_per_round=4, privacy__epsilon=8.0)
    fed = Federation.build(spec)
    state = fed.model.state()
    results = fed.executor.run_round(1, [0, 1, 2, 3], state, fed.plan, {c: 10 + c for c in range(4)})
    limits = fed._limits
    for update in results:
        numel = sum(t.numel() for t in update.tensors.values())
        norm = math.sqrt(sum(float((t - state.tensors[n]).pow(2).sum()) for n, t in update.tensors.items()))
        assert norm < limits.bound(update, numel)
        assert validate_update(update, list(fed.plan.uploads), state, limits) is None
        scaled = {n: state.tensors[n] + 10 * (t - state.tensors[n]) for n, t in update.tensors.items()}
        attack = ClientUpdate(update.client_id, update.num_examples, scaled, dict(update.metrics), update.rank)
        assert "update norm" in validate_update(attack, list(fed.plan.uploads), state, limits)


def _honest_round(**overrides):  # noqa: ANN003, ANN202
    spec = tiny_spec(
        **{"federation__rounds": 2, "federation__clients": 4, "federation__clients_per_round": 4,
           "privacy__epsilon": 8.0, **overrides}
    )  # fmt: skip
    fed = Federation.build(spec)
    state = fed.model.state()
    return fed, state, fed.executor.run_round(1, [0, 1, 2, 3], state, fed.plan, {c: 10 + c for c in range(4)})


def test_a_node_cannot_widen_its_own_bound_by_what_it_reports():
    """Issue 34.1: the bound was computed from the reply's num_examples and sigma; a node that
    said num_examples = 1 and left sigma out raised its bound over 200x and an inflated sign flip
    passed. The round loop's check (Federation._check) now takes both from the server's knowledge
    and drops a reply whose numbers differ."""
    fed, state, results = _honest_round()
    honest = results[0]
    change = {n: t - state.tensors[n] for n, t in honest.tensors.items()}
    numel = sum(t.numel() for t in change.values())
    norm = math.sqrt(sum(float(c.pow(2).sum()) for c in change.values()))
    own_bound = fed._limits.bound(honest, numel)
    liar = ClientUpdate(honest.client_id, 1, {}, {k: v for k, v in honest.metrics.items() if k != "sigma"}, honest.rank)
    inflated_bound = fed._limits.bound(liar, numel)
    assert inflated_bound > 20 * own_bound  # what the old check would have allowed
    k = 0.5 * (own_bound + inflated_bound) / norm  # a sign flip inside the lie's bound, outside the honest one
    liar.tensors = {n: state.tensors[n] - k * c for n, c in change.items()}
    assert fed._check(honest, state) is None
    assert "num_examples 1 != " in fed._check(liar, state)
    liar.num_examples = honest.num_examples  # the weight right, sigma still left out
    assert "sigma missing" in fed._check(liar, state)
    liar.metrics["sigma"] = 10 * honest.metrics["sigma"]  # a larger sigma than the server calibrated
    assert "calibrated for this client" in fed._check(liar, state)
    liar.metrics["sigma"] = honest.metrics["sigma"]  # every number honest: the norm bound catches it
    assert "update norm" in fed._check(liar, state)


def test_a_remote_node_under_dp_must_report_the_batch_weight_and_a_sigma():
    """Where the server does not hold a node's size (Flower), under DP the weight must be
    batch x steps (E[B] = batch) and sigma present; the bound uses at most the largest honest sigma."""
    from fedpeft.validation import expected_reply

    fed, state, results = _honest_round()
    expect = expected_reply(fed.spec, fed.plan, None, 0)
    assert expect.num_examples == fed.plan.batch_size * fed.plan.steps and expect.sigma is None
    honest = results[0]
    limits = fed._limits
    assert validate_update(honest, list(fed.plan.uploads), state, limits, expect=expect) is None
    small = ClientUpdate(0, 3, honest.tensors, dict(honest.metrics), honest.rank)
    assert "num_examples 3 != " in validate_update(small, list(fed.plan.uploads), state, limits, expect=expect)
    nosigma = ClientUpdate(0, honest.num_examples, honest.tensors, {}, honest.rank)
    assert "sigma missing" in validate_update(nosigma, list(fed.plan.uploads), state, limits, expect=expect)


def test_the_rank_is_the_spec_s_not_the_reply_s():
    """Issue 34.2: a rank-4 client that claims rank 8 (or no rank) with its padding filled was accepted."""
    fed, state, results = _honest_round(model__rank=8, model__client_ranks="4,8,4,8", privacy__epsilon=math.inf)
    low = next(u for u in results if u.client_id == 0)
    assert low.rank == 4 and fed._check(low, state) is None
    filled = {n: t.clone() + 0.01 for n, t in low.tensors.items()}  # padding past rank 4 no longer zero
    for claim in (8, None):
        lie = ClientUpdate(0, low.num_examples, filled, dict(low.metrics), claim)
        assert f"rank {claim!r} != 4, this client's rank in the spec" in fed._check(lie, state)


def test_dp_update_bound_is_at_least_the_noise_it_must_admit():
    # pure noise, no signal: the norm of N(0, S (sigma C)^2 I_d) / E[B] * lr is about lr sigma C sqrt(S d) / E[B]
    g = torch.Generator().manual_seed(0)
    lr, steps, clip, sigma, eb, d = 0.5, 10, 1.0, 1.3, 16.0, 5000
    noise = sum(torch.normal(0, sigma * clip, (d,), generator=g) for _ in range(steps)) * lr / eb
    assert float(noise.norm()) < dp_update_bound(lr, steps, clip, sigma, eb, d)


def test_absurd_numbers_are_rejected():
    update = ClientUpdate(0, 5, {n: t.clone() for n, t in STATE.tensors.items()})
    limits = UpdateLimits(max_examples=8, model_rank=2)
    for bad in (10**12, 3.5, True, 0, -1):
        update.num_examples = bad
        assert validate_update(update, list(STATE.tensors), STATE, limits) is not None
    update.num_examples = 5
    update.metrics = {"epsilon": math.nan}
    assert "epsilon" in validate_update(update, list(STATE.tensors), STATE, limits)


def test_padded_rank_components_must_be_zero():
    tensors = {n: t.clone() for n, t in STATE.tensors.items()}
    tensors["l.lora_A.weight"][1] = 0.5  # the component past rank 1
    update = ClientUpdate(0, 5, tensors, rank=1)
    assert "past the client's rank" in validate_update(update, list(STATE.tensors), STATE)


# -- robust aggregation, against Flower's reference behaviour (numpy median, scipy trim_mean) ---------
@pytest.mark.parametrize("name", ["fedavg", "ffa", "fedsvd"])
@pytest.mark.parametrize("how", ["median", "trimmed-mean", "centered-clip"])
def test_robust_aggregation_matches_numpy_and_scipy(name, how):
    from scipy.stats import trim_mean

    g = torch.Generator().manual_seed(3)
    k = 6
    ups = [ClientUpdate(i, 10 * (i + 1), {n: torch.randn(*t.shape, generator=g) for n, t in STATE.tensors.items()})
           for i in range(k)]  # fmt: skip
    ups[0].tensors = {n: t * 1e6 for n, t in ups[0].tensors.items()}  # one attacker
    strategy = make_strategy(
        name, {"robust": how, "trim": 0.2, **({"refactor_period": 10} if name == "fedsvd" else {})}
    )
    assert not strategy.sum_only
    uploads = [n for n in STATE.tensors if n in strategy.uploads(STATE, train_head=False)]
    sent = [ClientUpdate(u.client_id, u.num_examples, {n: u.tensors[n] for n in uploads}) for u in ups]
    new, _, _ = strategy.aggregate(STATE, sent, 1, {"seed": 0})
    for n in uploads:
        stacked = np.stack([u.tensors[n].double().numpy() for u in ups])
        expected = {"median": lambda v: np.median(v, axis=0), "trimmed-mean": lambda v: trim_mean(v, 0.2, axis=0),
                    "centered-clip": _centered_clip_by_hand}[how](stacked)  # fmt: skip
        np.testing.assert_allclose(new.tensors[n].numpy(), expected, rtol=1e-5, atol=1e-6)
        assert float(new.tensors[n].abs().max()) < 100  # the attacker did not get through


@pytest.mark.parametrize(("k", "cut"), [(2, 0), (3, 1), (4, 1), (5, 1), (9, 1), (10, 2), (20, 4)])
def test_a_positive_trim_drops_at_least_one_per_side(k, cut):
    from fedpeft.strategies.base import combine, trimmed_count
    from scipy.stats import trim_mean

    assert trimmed_count(0.2, k) == cut
    assert trimmed_count(0.0, k) == 0
    values = np.arange(1.0, k + 1)
    values[0] = -1e6  # one attacker far below
    ups = [ClientUpdate(i, 1, {"x": torch.tensor([v])}) for i, v in enumerate(values)]
    got = float(combine(ups, "x", "trimmed-mean", 0.2))
    # against scipy's trim_mean at the proportion that cuts exactly `cut` per side
    assert got == pytest.approx(trim_mean(values, cut / k), rel=1e-6)
    if k >= 3:
        assert got > 0  # the attacker was trimmed even where int(0.2 k) = 0


def _centered_clip_by_hand(values: np.ndarray) -> np.ndarray:
    """Centred clipping at the median, written out with numpy: m + mean_k min(1, tau/|x_k - m|)(x_k - m)."""
    m = np.median(values, axis=0)
    dev = values - m
    norms = np.sqrt((dev.reshape(len(values), -1) ** 2).sum(1))
    tau = np.median(norms)
    scale = np.minimum(1.0, tau / np.maximum(norms, 1e-300))
    return m + (dev * scale.reshape(-1, *[1] * (values.ndim - 1))).mean(0)


@pytest.mark.parametrize("k", [3, 4, 7])
def test_centered_clip_matches_numpy_and_bounds_one_attacker(k):
    from fedpeft.strategies.base import combine

    g = torch.Generator().manual_seed(k)
    honest = [torch.randn(5, 3, generator=g) for _ in range(k)]
    ups = [ClientUpdate(i, 1, {"x": t}) for i, t in enumerate(honest)]
    got = combine(ups, "x", "centered-clip")
    np.testing.assert_allclose(got.numpy(), _centered_clip_by_hand(np.stack([t.numpy() for t in honest])), rtol=1e-5)
    # however far one client lies, the result stays within tau (the median deviation, set by the
    # honest clients' spread) of the coordinate-wise median
    for scale in (1.0, 1e3, 1e9):
        direction = torch.randn(5, 3, generator=g)
        ups[0] = ClientUpdate(0, 1, {"x": honest[0] + scale * direction})
        stacked = torch.stack([u.tensors["x"] for u in ups]).double()
        median = stacked.sort(dim=0).values
        median = (median[(k - 1) // 2] + median[k // 2]) / 2
        norms = (stacked - median).flatten(1).norm(dim=1).sort().values
        tau = float((norms[(k - 1) // 2] + norms[k // 2]) / 2)
        got = combine(ups, "x", "centered-clip").double()
        assert float((got - median).norm()) <= tau + 1e-6
        assert float(got.abs().max()) < 10  # the attacker at 1e9 did not get through


# -- the norm filter (federation.outlier_norm) -----------------------------------------------------------
def test_norm_outliers_compare_each_change_to_its_own_noise():
    from fedpeft.validation import norm_outliers

    g = torch.Generator().manual_seed(0)
    big = AdapterState({"l.lora_A.weight": torch.zeros(8, 400), "l.lora_B.weight": torch.zeros(400, 8)}, 8, 8.0, ("l",))
    names = list(big.tensors)

    def noised(cid: int, rank: int, sigma: float, scale: float = 1.0) -> ClientUpdate:
        tensors = {n: torch.zeros_like(t) for n, t in big.tensors.items()}
        tensors["l.lora_A.weight"][:rank] = scale * sigma * torch.randn(rank, 400, generator=g)
        tensors["l.lora_B.weight"][:, :rank] = scale * sigma * torch.randn(400, rank, generator=g)
        return ClientUpdate(cid, 1, tensors, rank=rank)

    # honest clients of different ranks and sigmas: their norms differ 4x, their norms per unit of noise do not
    honest = [noised(0, 8, 1.0), noised(1, 2, 1.0), noised(2, 8, 0.5), noised(3, 4, 2.0)]
    sigmas = {0: 1.0, 1: 1.0, 2: 0.5, 3: 2.0}
    assert norm_outliers(honest, names, big, sigmas, 1.5) == {}
    # client 3 sends 1.6x its noise (a flip or a push well inside the DP norm bound): dropped, and only it
    attacked = [*honest[:3], noised(3, 4, 2.0, scale=1.6)]
    assert list(norm_outliers(attacked, names, big, sigmas, 1.5)) == [3]
    assert norm_outliers(attacked, names, big, sigmas, math.inf) == {}
    assert list(norm_outliers(attacked[1:], names, big, sigmas, 1.5)) == [3]  # 3 updates: a majority still
    assert norm_outliers(attacked[2:], names, big, sigmas, 1.5) == {}  # 2: no majority to compare with


class _Inflating:
    """Client 3 sends its change x3 (inside the DP norm bound: the flip and push of issue 34)."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner = inner

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)

    def run_round(self, rnd, cids, state, plan, seeds, on_client=None):  # noqa: ANN001, ANN201
        results = self.inner.run_round(rnd, cids, state, plan, seeds, on_client)
        for r in results:
            if r.client_id == 3:
                r.tensors = {n: state.tensors[n] - 3 * (t - state.tensors[n]) for n, t in r.tensors.items()}
        return results


def test_under_dp_the_default_norm_filter_drops_a_flip_the_bound_admits(tmp_path):
    spec = tiny_spec(federation__clients_per_round=4, federation__rounds=2, privacy__epsilon=8.0)
    clean = Federation.build(spec).run(tmp_path / "clean")
    assert all(r["clients"] == [0, 1, 2, 3] for r in clean.history)  # no honest client dropped
    runs = {}
    for outlier in (0.0, math.inf):  # auto (1.5 under DP), off
        fed = Federation.build(spec.with_flat({"federation.outlier_norm": outlier}))
        fed.executor = _Inflating(fed.executor)
        runs[outlier] = fed.run(tmp_path / f"attacked-{outlier}").history
    assert all(r["clients"] == [0, 1, 2] for r in runs[0.0])
    assert all("per unit of noise > federation.outlier_norm 1.5" in r["dropped"]["3"] for r in runs[0.0])
    assert all(r["clients"] == [0, 1, 2, 3] for r in runs[math.inf])  # inside the bound: only the filter sees it


def test_robust_options_are_checked():
    with pytest.raises(ValueError, match="robust must be one of"):
        make_strategy("fedavg", {"robust": "mode"})
    with pytest.raises(ValueError, match="trim"):
        make_strategy("fedsvd", {"robust": "trimmed-mean", "trim": 0.5})


# -- identity -----------------------------------------------------------------------------------------
def test_a_second_claim_of_a_partition_is_refused_and_logged(tmp_path, caplog):
    spec = tiny_spec(federation__rounds=2, federation__clients=2, federation__clients_per_round=2)
    grid = LocalGrid(2)
    grid.add_node(200, 1)  # an impostor claiming partition 1
    result = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(tmp_path / "run")
    assert all(r["clients"] == [0, 1] for r in result.history)
    assert not [t for nid, t in grid.calls if nid == 200 and t == "train"]
    assert "node 200 claims partition 1, already held by node(s) [101]" in caplog.text


def test_a_claim_of_k_of_n_that_disagrees_with_the_federation_s_n_is_refused(tmp_path, caplog):
    spec = tiny_spec(federation__rounds=1, federation__clients=4, federation__clients_per_round=4)
    grid = LocalGrid(4)
    grid.add_node(200, 0, {wire.NUM_PARTITIONS: 1})  # "partition 0 of 1": every client
    result = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(tmp_path / "run")
    assert result.history[0]["clients"] == [0, 1, 2, 3]
    assert not [t for nid, t in grid.calls if nid == 200 and t == "train"]
    assert (
        "node 200 claims to be partition 0 of 1, but the nodes that claimed first make(s) 4 partitions" in caplog.text
    )
    # with the operator's map the number of partitions is the map's, whoever connects first
    bound = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2,
                      federation__node_ids=(100, 101))  # fmt: skip
    grid = LocalGrid(2)
    grid.contexts[100].node_config[wire.NUM_PARTITIONS] = 1  # node 100 claims both clients
    result = Federation.build(bound, executor=FlowerExecutor(grid, bound, connect_timeout=0)).run(tmp_path / "b")
    assert result.history[0]["clients"] == [1]
    assert "node 100 claims to be partition 0 of 1, but federation.node_ids make(s) 2 partitions" in caplog.text


def test_a_deployment_without_node_ids_is_refused_unless_allowed_and_the_helper_binds_its_nodes(tmp_path):
    from flwr.superlink.grid.http_grid import HttpGrid

    from fedpeft.deploy import LocalDeployment, registered_node_id, run_config_arg
    from fedpeft.flower.server_app import unbound_warning

    deployed = HttpGrid.__new__(HttpGrid)  # the SuperLink's grid, unconnected
    assert "UNBOUND PARTITIONS" in unbound_warning(deployed, tiny_spec())
    assert unbound_warning(deployed, tiny_spec()).endswith("allow-unbound=true to let the first claim win: refused")
    assert unbound_warning(deployed, tiny_spec(), allowed=True).endswith("(allowed by allow-unbound=true)")
    with pytest.raises(ConfigError, match="federation.node_ids names a node twice"):
        tiny_spec(federation__clients=2, federation__clients_per_round=2, federation__node_ids=(7, 7))
    from flwr.app import Context, RecordDict

    from fedpeft.flower import server_app

    out = tmp_path / "unbound"  # the ServerApp on that grid stops before it asks a node anything
    server_app.main(deployed, Context(1, 0, {}, RecordDict(), {"out": str(out)}))
    assert not out.exists()
    bound = tiny_spec(federation__clients=2, federation__clients_per_round=2, federation__node_ids=(7, 9))
    assert unbound_warning(deployed, bound) is None
    assert unbound_warning(LocalGrid(2), tiny_spec()) is None  # the simulation's grids: no warning
    printed = "SuperNode 4242 registered successfully.\n" + json.dumps({"success": True, "node-id": 4242})
    assert registered_node_id(printed) == 4242
    with pytest.raises(RuntimeError, match="no node id"):
        registered_node_id("SuperNode couldn't be registered.")
    dep = LocalDeployment.__new__(LocalDeployment)
    dep.node_ids = [11, 22]
    spec = tiny_spec(federation__clients=2, federation__clients_per_round=2)
    command = dep.run_command("app", run_config_arg(spec, "out"))
    assert 'federation.node_ids="11,22"' in command[-1] and 'federation.node_ids=""' not in command[-1]
    own = run_config_arg(spec.with_flat({"federation.node_ids": "5,6"}), "out")
    assert dep.run_command("app", own)[-1] == own  # a run that binds its own nodes keeps its map


def test_node_ids_bind_partitions_to_the_operators_nodes(tmp_path, caplog):
    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2,
                     federation__node_ids=(100, 555))  # fmt: skip
    grid = LocalGrid(2)
    result = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(tmp_path / "run")
    assert result.history[0]["clients"] == [0]
    assert "node 101 claims partition 1, which federation.node_ids binds to 555" in caplog.text


# -- the run's own files --------------------------------------------------------------------------------
def test_a_second_run_on_the_same_out_fails_at_once(tmp_path):
    out = tmp_path / "run"
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from pathlib import Path;"
        "from fedpeft.runfiles import locked\nwith locked(Path(sys.argv[1])): print('held', flush=True); time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(out), str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        tic = time.monotonic()
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid"):
            Federation.build(tiny_spec(federation__rounds=1)).run(out)
        assert time.monotonic() - tic < 30
        assert out.is_dir()  # the first run's directory is left alone
    finally:
        holder.kill()


def test_a_run_built_before_another_finished_on_its_out_refuses_to_overwrite_it(tmp_path):
    """The race of issue 34: B passes its checks while `out` is empty, A runs and finishes there,
    then B runs. B is refused under the lock and A's files are untouched."""
    out = tmp_path / "run"
    spec = tiny_spec(federation__rounds=1)
    first, second = Federation.build(spec), Federation.build(spec.with_flat({"federation.seed": 1}))
    first.run(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(ConfigError, match="already holds a finished run"):
        second.run(out)
    with pytest.raises(ConfigError, match="already holds a finished run"):
        second.run(out, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_simulates_on_one_out_started_0_to_6_s_apart_leave_one_run(tmp_path):
    """The race of issue 34 (a second simulate 3 s after the first overwrote its finished run), at
    offsets 0, 1, 3 and 6 s after the first: five processes, one run directory."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedpeft.cli", "simulate", "--out", str(out), "--set", "model.name=tiny-bert",
               "data.name=synthetic", "federation.rounds=2", "privacy.epsilon=inf"]  # fmt: skip
    offsets = (0.0, 0.0, 1.0, 3.0, 6.0)  # the first, then the others this long after it
    procs, tic = [], time.monotonic()
    for seed, offset in enumerate(offsets):
        time.sleep(max(0.0, tic + offset - time.monotonic()))
        procs.append(subprocess.Popen([*command, f"federation.seed={seed}"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    codes = {}
    for seed, proc in enumerate(procs):
        _, err = proc.communicate(timeout=300)
        codes[seed] = (proc.returncode, err)
    # any may take the run directory first (on a loaded machine the first is still importing when
    # the next starts): exactly one runs, every other stops at once, and nothing is overwritten
    assert sorted(code for code, _ in codes.values()) == [0] + [2] * (len(offsets) - 1), codes
    winner = next(seed for seed, (code, _) in codes.items() if code == 0)
    for seed, (_code, err) in codes.items():
        if seed != winner:
            assert "is in use by another run" in err or "already holds a finished run" in err, err
            assert "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == winner  # the run that held the directory, not overwritten


def test_a_torn_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    out = tmp_path / "run"
    spec = tiny_spec(federation__rounds=3)
    reference = Federation.build(spec).run(tmp_path / "reference")
    two = spec.with_flat({"federation.rounds": 2})
    Federation.build(two).run(out)  # checkpoints after rounds 1 and 2; pretend it was cut before the summary
    (out / "summary.json").unlink()
    ckpt = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(ckpt[: len(ckpt) // 2])  # the latest is torn
    result = Federation.build(two).run(out, resume=True)  # falls back to round 1's, redoes round 2
    assert "resuming from" in caplog.text
    assert [r["round"] for r in result.history] == [1, 2]
    assert result.history[1]["accuracy"] == pytest.approx(reference.history[1]["accuracy"], abs=1e-6)
    (out / "summary.json").unlink()  # cut before the summary again, and both checkpoints unreadable
    (out / "checkpoint.pt").write_bytes(b"junk")
    (out / "checkpoint.prev.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="no readable checkpoint"):
        Federation.build(two).run(out, resume=True)


def test_an_unreadable_checkpoint_is_one_line_naming_the_files(tmp_path):
    from fedpeft.runfiles import load_checkpoint

    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(ConfigError, match=r"no readable checkpoint \(.*checkpoint.pt: .*checkpoint.prev.pt: missing\)"):
        load_checkpoint(tmp_path)


def test_a_torn_sweep_json_names_the_file(tmp_path):
    from fedpeft.sweep import prepare_sweep

    (tmp_path / "sweep.json").write_text('{"name": "x", "federation": {')
    with pytest.raises(ConfigError, match=r"sweep.json is not a readable sweep spec.*remove it"):
        prepare_sweep(tiny_spec(), tmp_path)


@pytest.mark.parametrize(
    ("text", "where"),
    [('{"text": "a", "label": 0}\n"just a string"\n', ":2: expected an object"),
     ('{"text": "a", "label": 0}\n{"text": null, "label": 1}\n', ":2: text must be a string"),
     ('{"text": "a", "label": 0}\n{oops\n', ":2: not JSON"),
     (b'{"text": "a", "label": 0}\n{"text": "\xff", "label": 1}\n', ":2: not UTF-8")],
    ids=["string-line", "null-text", "bad-json", "bad-utf8"],
)  # fmt: skip
def test_data_file_errors_name_file_and_line(tmp_path, text, where):
    from fedpeft.data import load_file

    path = tmp_path / "mine.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match="mine.jsonl" + where):
        load_file(path, ("negative", "positive"))


def test_process_clean_up_signals_only_processes_started_with_our_environment(tmp_path):
    from fedpeft.deploy import stop_processes_started_with

    mentions = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(tmp_path)])
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env={"FLWR_HOME": str(tmp_path)})
    try:
        time.sleep(0.3)
        assert stop_processes_started_with("FLWR_HOME", str(tmp_path)) == 1
        assert ours.wait(timeout=10) != 0
        assert mentions.poll() is None  # it only mentions the path: left alone
    finally:
        mentions.kill()
        ours.kill()


# -- the drill, small -------------------------------------------------------------------------------------
def test_fault_drill_small():
    drill = load_script("fault_drill")
    report = drill.run_drill(rounds=1, log=lambda line: None, scaled=False)
    assert report["faults_injected"] == len(drill.FAULTS)
    assert report["federations_ended"] == 0, [r for r in report["runs"] if r["ended"]]
    assert report["bad_updates_aggregated"] == 0, [r for r in report["runs"] if r["bad_aggregated"]]


def test_an_evaluate_reply_counts_only_possible_scores_of_the_nodes_own_clients():
    """A node once added 30 fake clients at accuracy 1.0 and 1e300 to a FedSA run's score (issue 45)."""
    from fedpeft.flower import wire

    honest = {"accuracy": 0.7, "loss": 0.6}
    forged = wire.evaluate_reply({0: honest, **{k: {"accuracy": 1.0, "loss": 0.0} for k in range(2, 32)}})
    assert wire.read_evaluate_reply(forged, {0}) == [honest]  # the node holds client 0 only
    impossible = [{"accuracy": 1e300, "loss": 0.1}, {"accuracy": -0.1, "loss": 0.1}, {"accuracy": 0.5, "loss": -1.0},
                  {"accuracy": 0.5, "loss": math.nan}, {"accuracy": 0.5}, {"accuracy": 0.5, "loss": 0.1, "extra": 1.0}]  # fmt: skip
    for bad in impossible:
        assert wire.read_evaluate_reply(wire.evaluate_reply({0: bad}), {0}) == [], bad


def test_a_metric_key_cannot_forge_log_lines_or_flood_the_log():
    """A node's metric key once wrote two forged server log lines (a newline and escape codes), and a
    200 kB key a 200 kB log line (issue 45): a key no reply carries drops the reply, its text escaped."""
    from fedpeft.executors import ClientFailure
    from fedpeft.flower import wire

    for key in ["ok\nINFO fedpeft: round 9: accuracy 1.0000\x1b[31m", "k" * 200_000]:
        update = ClientUpdate(0, 10, {"x": torch.zeros(2)}, {"steps": 5.0, key: 1.0})
        result = wire.read_train_reply(wire.train_reply([update], private=False), 0, 100)
        assert isinstance(result, ClientFailure) and "no key a reply carries" in result.reason
        assert "\n" not in result.reason and "\x1b" not in result.reason and len(result.reason) < 400
    content = wire.train_reply([ClientUpdate(0, 10, {"x": torch.zeros(2)}, {"steps": 5.0})], private=False)
    content[wire.metrics_key(0)]["steps"] = [1.5] * 100_000  # a value a MetricRecord can hold: its repr capped
    result = wire.read_train_reply(content, 0, 100)
    assert isinstance(result, ClientFailure) and "is not a finite number" in result.reason and len(result.reason) < 400


def test_a_restarted_node_is_started_again_until_the_superlink_lets_it_rejoin(tmp_path, monkeypatch):
    """Flower's SuperLink refuses a key whose old session is live (until 2 heartbeats pass) and the
    SuperNode exits with 305 (before: the node stayed down for the rest of the run); the helper starts
    it again until one stays up, and gives up with the node's log named."""
    from fedpeft.deploy import LocalDeployment

    class Node:  # a SuperNode process: exits with `code` at once, or (None) stays up
        def __init__(self, code):  # noqa: ANN001
            self.code = code

        def wait(self, timeout=None):  # noqa: ANN001, ANN202
            if self.code is None:
                raise subprocess.TimeoutExpired("flower-supernode", timeout)
            return self.code

    dep = LocalDeployment(tmp_path, nodes=3)
    started = [Node(305), Node(305), Node(None)]
    monkeypatch.setattr(dep, "start_node", lambda k: started.pop(0))
    assert dep.restart_node(2, timeout=5, settle=0.01, pause=0.01).code is None and not started
    monkeypatch.setattr(dep, "start_node", lambda k: Node(305))
    with pytest.raises(RuntimeError, match=r"node 2 kept exiting \(last code 305\); see .*node-2.log"):
        dep.restart_node(2, timeout=0.05, settle=0.01, pause=0.01)
