"""Privacy against the server: only DP output and public values leave a node, and the node, not the
server, owns its privacy (docs/privacy.md). Real replies from the real ClientApp behind LocalGrid."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Message, MessageType

from fedpeft.federation import Federation
from fedpeft.flower import wire
from fedpeft.flower.executor import FlowerExecutor
from fedpeft.flower.local import LocalGrid
from fedpeft.state import ClientUpdate
from tests.conftest import tiny_spec

DP_OR_PUBLIC = {wire.DP_OUTPUT, wire.PUBLIC}


def _replies(spec, grid: LocalGrid, out) -> list[Message]:  # noqa: ANN001
    """Every reply the nodes sent in a run of `spec` (query, train, evaluate)."""
    replies = []
    send = grid.send_and_receive

    def recording(messages, *, timeout=None):  # noqa: ANN001, ANN202
        got = send(messages, timeout=timeout)
        replies.extend(r for r in got if not r.has_error())
        return got

    grid.send_and_receive = recording
    Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(out)
    return replies


def _fields(reply: Message) -> list[str]:
    """The reply's values as REPLY_FIELDS names them (client ids replaced by <c>; replies other
    than train prefixed by their message type)."""
    kind = reply.metadata.message_type
    prefix = "" if kind == MessageType.TRAIN else f"{kind}:"
    return [prefix + name for name in _names(reply)]


def _names(reply: Message) -> list[str]:
    names = []
    for key, record in reply.content.items():
        if key.startswith("update."):
            names.append("update.<c>")
        elif key.startswith("metrics."):
            names += [f"metrics.<c>.{metric}" for metric in record]
        else:
            names += [f"{key}.{field}" for field in record]
    return names


@pytest.mark.parametrize("private", [True, False], ids=["dp", "no-dp"])
def test_every_value_a_node_sends_is_in_the_table(tmp_path, private):
    spec = tiny_spec(
        federation__rounds=2, federation__clients=3, federation__clients_per_round=3,
        privacy__epsilon=6.0 if private else float("inf"), model__client_ranks=(2, 4),
    )  # fmt: skip
    replies = _replies(spec, LocalGrid(3), tmp_path / "run")
    assert sum(r.metadata.message_type == MessageType.TRAIN for r in replies) == 6
    seen = {name for reply in replies for name in _fields(reply)}
    unknown = seen - set(wire.REPLY_FIELDS)
    assert not unknown, f"values on the wire that the privacy table does not declare: {sorted(unknown)}"
    kinds = {wire.REPLY_FIELDS[name][0] for name in seen}
    if private:
        assert kinds <= DP_OR_PUBLIC, f"under DP a reply carried {kinds - DP_OR_PUBLIC}"
        assert {"metrics.<c>.epsilon", "metrics.<c>.num_examples", "update.<c>"} <= seen
    else:
        assert "metrics.<c>.train_loss" in seen  # privacy off: the diagnostics travel
    assert "query:config.partition-id" in seen


def test_personalised_evaluation_replies_are_in_the_table(tmp_path):
    spec = tiny_spec(federation__rounds=2, federation__clients=2, federation__clients_per_round=2,
                     strategy__name="fedsa", privacy__epsilon=6.0)  # fmt: skip
    replies = _replies(spec, LocalGrid(2), tmp_path / "run")
    seen = {name for reply in replies for name in _fields(reply)}
    assert "evaluate:metrics.<c>.accuracy" in seen
    assert seen <= set(wire.REPLY_FIELDS), sorted(seen - set(wire.REPLY_FIELDS))
    assert {wire.REPLY_FIELDS[name][0] for name in seen} <= DP_OR_PUBLIC


def test_under_dp_the_reply_drops_any_value_not_declared_public():
    update = ClientUpdate(0, 10, {"x": torch.zeros(2)}, {"steps": 5.0, "epsilon": 1.0, "train_loss": 0.3, "new": 1})
    content = wire.train_reply([update], private=True)
    assert set(content["metrics.0"]) == {"steps", "epsilon", "num_examples"}
    assert set(wire.train_reply([update], private=False)["metrics.0"]) >= {"train_loss", "new"}


def test_the_server_learns_no_train_loss_under_dp(tmp_path):
    spec = tiny_spec(federation__rounds=1, privacy__epsilon=6.0)
    result = Federation.build(spec).run(tmp_path / "run")
    assert result.history[0]["train_loss"] is None
    assert result.summary["noise"] == "seeded"


# -- the node owns its policy -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("policy", "asked", "why"),
    [
        ({"max-epsilon": 4.0}, {"privacy__epsilon": 8.0}, "max-epsilon 4"),
        ({"allow-no-dp": "false"}, {"privacy__epsilon": float("inf")}, "without DP"),
        ({"max-delta": 1e-6}, {"privacy__epsilon": 3.0}, "max-delta"),
    ],
    ids=["epsilon", "no-dp", "delta"],
)
def test_a_node_refuses_a_spec_weaker_than_its_policy(tmp_path, caplog, policy, asked, why):
    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2, **asked)
    grid = LocalGrid(2, node_config=policy)
    result = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(tmp_path / "run")
    assert result.history[0]["clients"] == []
    # the server is told the category; why (with the node's numbers) stays in the node's log
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert all(reason == "policy" for reason in rounds[0]["dropped"].values())
    assert why in caplog.text and "node policy" in caplog.text


def test_a_node_within_its_policy_trains(tmp_path):
    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=3.0)
    grid = LocalGrid(2, node_config={"max-epsilon": 4.0, "allow-no-dp": "false"})
    result = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(tmp_path / "run")
    assert result.history[0]["clients"] == [0, 1]


def test_a_restarted_node_without_state_dir_keeps_its_ledger(tmp_path, caplog):
    """Under DP, no state-dir: the ledger goes to the per-user default directory (FEDPEFT_STATE_DIR
    in tests), so a node restarted between the runs of the same Flower run refuses a spent budget."""
    spec = tiny_spec(federation__rounds=2, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=4.0)
    grid = LocalGrid(2)
    Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(tmp_path / "first")
    grid.restart(100)
    grid.restart(101)
    again = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(tmp_path / "again")
    assert all(r["clients"] == [] for r in again.history)
    assert all(why == "budget exhausted" for r in again.history for why in r["dropped"].values())
    assert "refuses to train" in caplog.text


def test_a_ledger_kept_at_another_delta_is_never_spent_past(tmp_path, caplog):
    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=4.0)
    grid = LocalGrid(2)
    Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(tmp_path / "first")
    other = spec.with_flat({"privacy.delta": 1e-6})
    result = Federation.build(other, executor=FlowerExecutor(grid, other, connect_timeout=0)).run(tmp_path / "again")
    assert all(why == "policy" for why in result.history[0]["dropped"].values())
    assert "ledger is kept at delta 1e-05" in caplog.text


def test_a_spec_with_a_smaller_epsilon_lowers_the_kept_ledgers_target(tmp_path, caplog):
    spec = tiny_spec(federation__rounds=2, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=8.0)
    grid = LocalGrid(2)
    first = Federation.build(
        spec.with_flat({"federation.rounds": 1}), executor=FlowerExecutor(grid, spec, connect_timeout=0)
    )
    first.run(tmp_path / "first")  # one round at epsilon 8's sigma
    stricter = spec.with_flat({"privacy.epsilon": 0.5})
    result = Federation.build(stricter, executor=FlowerExecutor(grid, stricter, connect_timeout=0)).run(tmp_path / "b")
    assert all(r["clients"] == [] for r in result.history)  # already past 0.5: refuses
    assert all(why == "budget exhausted" for r in result.history for why in r["dropped"].values())
    assert "its budget 0.5" in caplog.text


def test_a_data_file_node_under_dp_must_declare_its_public_size(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"text": f"fine {i}", "label": i % 2}) + "\n" for i in range(30)))
    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=5.0)
    grid = LocalGrid(2, state_dir=tmp_path / "nodes")
    grid.contexts[100].node_config["data-file"] = str(path)
    result = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(tmp_path / "run")
    assert "public-size" in result.history[0]["dropped"]["0"]
    assert result.history[0]["clients"] == [1]


def test_a_data_file_node_fails_closed_without_a_state_dir_and_a_bad_file_is_one_fixed_sentence(tmp_path, caplog):
    from fedpeft.flower.policy import DATA_FILE_PROBLEM

    good, path = tmp_path / "good.jsonl", tmp_path / "mine.jsonl"
    good.write_text("".join(json.dumps({"text": f"fine {i}", "label": i % 2}) + "\n" for i in range(30)))
    path.write_text(json.dumps({"text": "fine", "label": 0}) + '\n{"text": "the secret row", "label": 7}\n')
    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=5.0)
    for grid, told, file in [(LocalGrid(2), "needs state-dir", good), (LocalGrid(2, state_dir=tmp_path / "n"), DATA_FILE_PROBLEM, path)]:  # fmt: skip
        grid.contexts[100].node_config.update({"data-file": str(file), "public-size": 30})
        result = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(tmp_path / told[:9])
        assert told in result.history[0]["dropped"]["0"] and result.history[0]["clients"] == [1]
    reason = result.history[0]["dropped"]["0"]
    assert "mine.jsonl" not in reason and ":2" not in reason and "label" not in reason  # no row, no key
    assert "mine.jsonl:2" in caplog.text  # the node's own log has the details


def test_a_data_file_nodes_default_max_delta_is_well_below_one_over_its_size():
    from flwr.app import Context, RecordDict

    from fedpeft.flower.policy import Policy

    def policy(size: int) -> Policy:
        config = {"data-file": "x.jsonl", "public-size": size}
        return Policy.of(Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={}))

    assert policy(1000).max_delta == 1e-5 and policy(10**6).max_delta == pytest.approx(1e-7)


def test_an_unexpected_node_error_reaches_the_server_without_its_text(tmp_path, monkeypatch):
    """Flower forwards an exception's text to the server; a node forwards only its type."""
    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=5.0)

    def leaky(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyError("the secret text of example 17")

    from fedpeft.flower import node as node_module

    monkeypatch.setattr(node_module.Node, "train", leaky)
    grid = LocalGrid(2)
    result = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(tmp_path / "run")
    reasons = list(result.history[0]["dropped"].values())
    assert reasons and all("KeyError on the node" in r and "secret" not in r for r in reasons)
