"""The Flower wiring: ServerApp's executor + ClientApp against the in-process reference path.

A LocalGrid delivers the server's messages to the real ClientApp in this process, one Flower
Context per node (what a SuperNode keeps between messages), so these tests exercise the same
message encoding, node state and failure handling as a deployment, in seconds. The slow tests in
test_flower_simulation.py and test_flower_deployment.py run the same app through Flower's own runtimes.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fedpeft.build import client_budget
from fedpeft.config import ConfigError
from fedpeft.federation import Callbacks, Federation
from fedpeft.flower.executor import FlowerExecutor
from fedpeft.flower.local import LocalGrid
from fedpeft.runfiles import RESULT_FILES
from fedpeft.spec_io import default_spec, spec_from_run_config, to_run_config
from tests.conftest import tiny_spec

ROOT = Path(__file__).resolve().parents[1]


def _run_flower(spec, out: Path, grid: LocalGrid):  # noqa: ANN001, ANN202
    return Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(out)


def _assert_same_state(a, b, atol: float = 1e-6) -> None:  # noqa: ANN001
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], atol=atol, rtol=0, msg=name)


# -- run-config <-> spec -------------------------------------------------------------------------
def _flatten(table: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_pyproject_run_config_is_the_quickstart_spec():
    config = _flatten(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    expected = to_run_config(default_spec())
    assert config == {"spec": "", "out": "", "resume": False, **expected}
    assert spec_from_run_config(config, default_spec()) == default_spec()


def test_run_config_overrides_map_onto_spec_keys(tmp_path):
    config = {**default_spec().to_flat(), "spec": "", "out": ""}
    spec = spec_from_run_config({**config, "federation.rounds": 3, "privacy.epsilon": float("inf")}, default_spec())
    assert spec.federation.rounds == 3 and not spec.privacy.enabled
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[federation]\nrounds = 9\nclients = 6\n[strategy]\nname = "ffa"\n')
    spec = spec_from_run_config({**config, "spec": str(path), "train.lr": 0.2}, default_spec())
    # the file is the base; only keys set away from the default override it, and name the run
    assert (spec.name, spec.federation.rounds, spec.federation.clients) == ("mine-lr0.2", 9, 6)
    assert (spec.strategy.name, spec.train.lr) == ("ffa", 0.2)
    with pytest.raises(ConfigError, match="federation.rounds must be >= 1"):
        spec_from_run_config({**config, "federation.rounds": 0}, default_spec())


# -- the Flower path equals the in-process reference ---------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"strategy__name": "fedsvd"},
        {"strategy__name": "fedsa", "model__train_head": False},
        {"strategy__name": "fedex"},
        {"strategy__name": "hetlora", "model__client_ranks": (2, 4)},
    ],
    ids=["fedavg", "fedsvd", "fedsa", "fedex", "hetlora"],
)
def test_flower_executor_equals_in_process(tmp_path, overrides):
    """Privacy off: batches follow the server's seeds, so the Flower path is the in-process run."""
    spec = tiny_spec(federation__rounds=2, federation__clients=3, federation__clients_per_round=2, **overrides)
    reference = Federation.build(spec).run(tmp_path / "in-process")
    flower = _run_flower(spec, tmp_path / "flower", LocalGrid(3))
    _assert_same_state(flower.state, reference.state)
    for mine, ref in zip(flower.history, reference.history, strict=True):
        assert mine["clients"] == ref["clients"]
        assert mine["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-6)
        assert mine["bytes_up"] == ref["bytes_up"] and mine["bytes_down"] == ref["bytes_down"]


def test_under_dp_nodes_draw_secret_noise_the_server_cannot_replay(tmp_path):
    """Under DP a node's batches and noise come from its own secret randomness: two Flower runs of
    the same spec and seed differ, neither equals the in-process run seeded as the server would
    seed it, and yet every node spends exactly the reference ledger's epsilon."""
    spec = tiny_spec(federation__rounds=2, federation__clients=3, federation__clients_per_round=2,
                     strategy__name="fedsvd", privacy__epsilon=6.0)  # fmt: skip
    replay = Federation.build(spec).run(tmp_path / "in-process")  # the server's seeds, replayed
    first = _run_flower(spec, tmp_path / "flower-1", LocalGrid(3))
    second = _run_flower(spec, tmp_path / "flower-2", LocalGrid(3, run_id=8))  # a new run: new ledgers
    for name, tensor in first.state.tensors.items():
        if not torch.equal(tensor, replay.state.tensors[name]):
            break
    else:
        pytest.fail("a Flower node's update equals the replay from the server's seeds")
    assert any(not torch.equal(t, second.state.tensors[n]) for n, t in first.state.tensors.items())
    assert first.summary["noise"] == "secret" and replay.summary["noise"] == "seeded"
    assert first.summary["epsilon_per_client"] == pytest.approx(replay.summary["epsilon_per_client"])
    assert second.summary["epsilon_per_client"] == pytest.approx(replay.summary["epsilon_per_client"])
    assert 0 < first.summary["epsilon"] <= 6.0


def test_secret_noise_in_process_is_not_reproducible_and_says_so(tmp_path):
    spec = tiny_spec(federation__rounds=1, privacy__epsilon=6.0, privacy__noise="secret")
    a, b = Federation.build(spec).run(tmp_path / "a"), Federation.build(spec).run(tmp_path / "b")
    assert a.summary["noise"] == "secret"
    assert any(not torch.equal(t, b.state.tensors[n]) for n, t in a.state.tensors.items())
    assert a.summary["epsilon_per_client"] == pytest.approx(b.summary["epsilon_per_client"])


@pytest.mark.parametrize("executor", ["sequential", "cohort"])
def test_fewer_nodes_than_clients_each_trains_its_share(tmp_path, executor):
    """Two nodes (one per GPU, say) for five clients: node k holds clients k, k+2, k+4 and trains a
    round's share with the spec's executor; the result equals the in-process reference."""
    spec = tiny_spec(
        federation__rounds=2, federation__clients=5, federation__clients_per_round=4, federation__executor=executor,
        model__dropout=0.0,
    )  # fmt: skip
    reference = Federation.build(spec.with_flat({"federation.executor": "sequential"})).run(tmp_path / "ref")
    grid = LocalGrid(2)
    flower = _run_flower(spec, tmp_path / "flower", grid)
    _assert_same_state(flower.state, reference.state, atol=1e-5)
    assert [r["clients"] for r in flower.history] == [r["clients"] for r in reference.history]
    trains = [nid for nid, kind in grid.calls if kind == "train"]
    assert len(trains) == 4  # one message per node per round, not one per client


def test_the_server_app_writes_the_same_files_as_simulate(tmp_path):
    """`flwr run .` ends with the result files of `fedpeft simulate`, accuracy.png included."""
    from fedpeft.flower import server_app

    spec = tiny_spec(federation__rounds=2)
    out = tmp_path / "flwr"
    run_config = {**to_run_config(spec), "out": str(out)}
    server_app.main(LocalGrid(spec.federation.clients), Context(7, 0, {}, RecordDict(), run_config))
    missing = [name for name in RESULT_FILES if not (out / name).is_file()]
    assert not missing, f"the ServerApp did not write {missing}"


class _SuperLinkDies(LocalGrid):
    """The SuperLink dies in round `dies_in`: the ServerApp's grid call fails mid-run."""

    def __init__(self, *args, dies_in: int, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.dies_in, self.rounds = dies_in, 0

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        if any(m.metadata.message_type == "train" for m in messages):
            self.rounds += 1
            if self.rounds == self.dies_in:
                raise ConnectionError("SuperLink unreachable")
        return super().send_and_receive(messages, timeout=timeout)


def test_a_flower_run_cut_by_a_superlink_restart_resumes_on_its_nodes_ledgers(tmp_path, caplog, monkeypatch):
    from fedpeft.flower import server_app

    monkeypatch.setattr(server_app, "_show_progress", lambda: None)  # its own handler would hide the log from caplog

    spec = tiny_spec(federation__rounds=3, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=4.0)
    reference = Federation.build(spec).run(tmp_path / "ref")
    out, nodes = tmp_path / "flwr", tmp_path / "node-state"
    run_config = {**to_run_config(spec), "out": str(out)}
    with pytest.raises(ConnectionError):  # run 7 dies in round 3, after round 2's checkpoint
        server_app.main(
            _SuperLinkDies(2, state_dir=nodes, run_id=7, dies_in=3), Context(7, 0, {}, RecordDict(), run_config)
        )
    assert not (out / "summary.json").exists()
    # resubmitted as it was (the SuperLink restarted: a new run id): refused, one line saying how
    server_app.main(LocalGrid(2, state_dir=nodes, run_id=8), Context(8, 0, {}, RecordDict(), run_config))
    assert f"--run-config \"out='{out.resolve()}' resume=true\"" in caplog.text
    assert not (out / "summary.json").exists()
    # resumed with another spec: one line, nothing written
    changed = {**run_config, "resume": True, "train.lr": spec.train.lr * 2}
    server_app.main(LocalGrid(2, state_dir=nodes, run_id=8), Context(8, 0, {}, RecordDict(), changed))
    assert "cannot resume with a different spec" in caplog.text
    # with resume=true: rounds 1-2 from the checkpoint, round 3 trained on the nodes' run-7 ledgers
    server_app.main(
        LocalGrid(2, state_dir=nodes, run_id=9), Context(9, 0, {}, RecordDict(), {**run_config, "resume": True})
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3
    assert [r["round"] for r in map(json.loads, (out / "rounds.jsonl").read_text().splitlines())] == [1, 2, 3]
    # the clients spent what an uninterrupted run spends (their ledgers continued, not restarted)
    assert summary["epsilon_per_client"] == pytest.approx(reference.summary["epsilon_per_client"])
    assert sorted(p.name for p in nodes.glob("run-*")) == ["run-7"]
    ledger = json.loads((nodes / "run-7" / "client-0.json").read_text())["budget"]
    assert sum(steps for *_, steps in ledger["history"]) == 3 * spec.train.local_steps


def test_pyproject_components_are_importable():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    for ref in table.values():
        module, _, attr = ref.partition(":")
        assert getattr(__import__(module, fromlist=[attr]), attr) is not None


# -- node state -----------------------------------------------------------------------------------
def test_node_keeps_its_ledger_across_a_restart_only_on_disk(tmp_path):
    spec = tiny_spec(federation__rounds=2, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=4.0)
    reference = Federation.build(spec).run(tmp_path / "ref")

    grid = LocalGrid(2, state_dir=tmp_path / "node-state")
    fed = Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0))
    restarted = []

    def restart_after_round_1(record: dict) -> None:
        if record["round"] == 1:
            ledger = json.loads((tmp_path / "node-state" / "run-7" / "client-0.json").read_text())["budget"]
            assert ledger["history"] and ledger["client_id"] == 0
            grid.restart(100)
            grid.restart(101)
            restarted.append(True)

    result = fed.run(tmp_path / "run", callbacks=Callbacks(on_round_end=restart_after_round_1))
    assert restarted
    # the restarted nodes continued their ledgers from disk: the same epsilon as never restarting
    assert result.summary["epsilon_per_client"] == pytest.approx(reference.summary["epsilon_per_client"])


def test_a_spent_node_refuses_even_after_a_restart(tmp_path, caplog):
    spec = tiny_spec(federation__rounds=2, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=4.0)
    grid = LocalGrid(2, state_dir=tmp_path / "node-state")
    _run_flower(spec, tmp_path / "first", grid)
    grid.restart(100)
    grid.restart(101)
    # the same run on the same nodes again: each client's budget is spent, so every node refuses
    again = _run_flower(spec, tmp_path / "again", grid)
    assert all(r["clients"] == [] for r in again.history)
    # the server reads a fixed category; the numbers stay in the node's own log
    assert all(reason == "budget exhausted" for r in again.history for reason in r["dropped"].values())
    assert "client 0 refused: client 0 refuses to train: 5 more steps would spend epsilon" in caplog.text


# -- failures -------------------------------------------------------------------------------------
def test_crashed_and_silent_nodes_do_not_end_the_federation(tmp_path, caplog):
    spec = tiny_spec(federation__rounds=2, federation__clients=4, federation__clients_per_round=4)
    grid = LocalGrid(4)
    grid.crash.add(101)
    grid.silent.add(103)
    result = _run_flower(spec, tmp_path / "run", grid)
    assert result.summary["rounds"] == 2
    for record in result.history:
        assert record["clients"] == [0, 2] and record["aggregated"]
        assert "node 101 failed: node crashed" in record["dropped"]["1"]
        assert "node 103 sent no reply" in record["dropped"]["3"]
    assert "client 1: node 101 failed" in caplog.text


def test_a_silent_node_is_waited_for_until_the_timeout(tmp_path):
    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2,
                     federation__timeout=0.5)  # fmt: skip
    grid = LocalGrid(2)
    grid.silent.add(101)
    tic = time.monotonic()
    result = _run_flower(spec, tmp_path / "run", grid)
    assert time.monotonic() - tic >= 0.5  # the round waited for node 101 as a real grid does
    assert result.history[0]["clients"] == [0]
    assert "node 101 sent no reply (waited 0.5 s)" in result.history[0]["dropped"]["1"]


def test_too_few_updates_skip_aggregation(tmp_path):
    spec = tiny_spec(
        federation__rounds=1, federation__clients=3, federation__clients_per_round=3, federation__min_clients=2
    )
    grid = LocalGrid(3)
    grid.crash |= {100, 101}
    result = _run_flower(spec, tmp_path / "run", grid)
    assert not result.history[0]["aggregated"] and result.history[0]["clients"] == [2]


def test_misconfigured_nodes_are_reported_and_skipped(tmp_path, caplog):
    spec = tiny_spec(federation__rounds=1, federation__clients=3, federation__clients_per_round=3)
    grid = LocalGrid(3)
    grid.contexts[102] = Context(7, 102, {"partition-id": 0, "num-partitions": 5}, RecordDict(), {})  # wrong N
    result = _run_flower(spec, tmp_path / "run", grid)
    assert result.history[0]["clients"] == [0, 1]
    assert "no connected node holds client 2" in result.history[0]["dropped"]["2"]
    assert "is partition 0 of 5, but the federation has 3 clients" in caplog.text


def test_cohort_nodes_keep_each_clients_ledger(tmp_path):
    spec = tiny_spec(
        federation__rounds=3, federation__clients=5, federation__clients_per_round=3, federation__executor="cohort",
        privacy__epsilon=5.0,
    )  # fmt: skip
    reference = Federation.build(spec).run(tmp_path / "ref")  # in-process cohort: the same ledgers
    flower = _run_flower(spec, tmp_path / "flower", LocalGrid(2, state_dir=tmp_path / "nodes"))
    assert flower.summary["epsilon_per_client"] == pytest.approx(reference.summary["epsilon_per_client"])
    assert len(list((tmp_path / "nodes").glob("run-7/client-*.json"))) == len(flower.summary["epsilon_per_client"])


def test_a_node_trains_on_its_own_data_file(tmp_path):
    rows = [{"text": f"good great fine {i}", "label": "positive" if i % 2 else 0} for i in range(40)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    unbound = tiny_spec(
        federation__rounds=2, federation__clients=3, federation__clients_per_round=3, privacy__epsilon=5.0
    )
    spec = unbound.with_flat({"federation.public_sizes": [0, 40, 0]})  # the server's binding of its size
    grid = LocalGrid(3, state_dir=tmp_path / "nodes")  # a data-file node names where its ledgers live
    grid.contexts[101].node_config["data-file"] = str(path)
    grid.contexts[101].node_config["public-size"] = 40  # what the node declares public
    result = _run_flower(spec, tmp_path / "run", grid)
    reference = Federation.build(unbound)
    sizes = [len(c) for c in reference.data.clients]
    assert result.history[-1]["clients"] == [0, 1, 2]
    # client 1 calibrated its sigma on its declared 40 examples, and the server derived the same
    own = client_budget(spec, 1, 40).sigma
    assert result.summary["sigma_per_client"][1] == pytest.approx(own)
    assert result.summary["sigma_per_client"][0] == pytest.approx(client_budget(spec, 0, sizes[0]).sigma)
    assert own != pytest.approx(client_budget(spec, 1, sizes[1]).sigma)
    # without the binding the server expects the bundled partition's sigma: the reply is dropped, with why
    grid = LocalGrid(3, state_dir=tmp_path / "nodes2")
    grid.contexts[101].node_config.update({"data-file": str(path), "public-size": 40})
    dropped = _run_flower(unbound, tmp_path / "unbound", grid).history[0]["dropped"]
    assert "federation.public_sizes" in dropped["1"]


def test_a_node_lying_about_its_sigma_is_dropped_every_round(tmp_path):
    """A node that claims the largest honest sigma (to widen its norm bound) and sends 5.5 x the
    opposite of its change: every reply is dropped, since the server derives each sigma itself."""
    from fedpeft.flower import wire
    from fedpeft.validation import spec_limits

    spec = tiny_spec(federation__rounds=3, federation__clients=3, federation__clients_per_round=3, privacy__epsilon=5.0)
    fed = Federation.build(spec)
    sigma_max = spec_limits(spec, fed.plan).dp[3]

    def lie(request, reply):  # noqa: ANN001, ANN202
        content = reply.content
        if wire.update_key(1) in content:
            sent = wire.read_train(request.content).adapter
            update = wire.from_record(content[wire.update_key(1)])
            forged = {n: sent[n] - 5.5 * (t - sent[n]) if n in sent else t for n, t in update.items()}
            content[wire.update_key(1)] = wire.to_record(forged)
            content[wire.metrics_key(1)]["sigma"] = sigma_max
        return reply

    grid = LocalGrid(3)
    grid.tamper[101] = lie
    result = _run_flower(spec, tmp_path / "run", grid)
    assert all(r["clients"] == [0, 2] and "sigma" in r["dropped"]["1"] for r in result.history)
    # its replies left the node: the server's accounting charges them, dropped or not
    honest = client_budget(spec, 1, len(fed.data.clients[1]))
    assert result.summary["epsilon_per_client"]["1"] == pytest.approx(honest.epsilon_after(3 * fed.plan.steps))


def test_data_file_errors_are_clear(tmp_path):
    from fedpeft.data import load_file

    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,maybe\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: its label is none of"):
        load_file(bad, ("negative", "positive"))
    with pytest.raises(ValueError, match="does not exist"):
        load_file(tmp_path / "missing.jsonl", ("negative", "positive"))
    good = tmp_path / "good.csv"
    good.write_text("label,text\npositive,nice\n0,bad\n")
    data = load_file(good, ("negative", "positive"))
    assert data.labels == [1, 0] and data.texts == ["nice", "bad"]


def test_no_usable_node_is_a_clear_error(tmp_path):
    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2)
    grid = LocalGrid(3)  # three nodes for two clients: every node says "partition k of 3"
    with pytest.raises(ConfigError, match="no connected node holds any of the 2 clients.*partition 0 of 3"):
        _run_flower(spec, tmp_path / "run", grid)
    assert not (tmp_path / "run").exists()  # failed before its first checkpoint: nothing left behind


@pytest.mark.parametrize("epsilon", [0.0, 1e300, 5.5])
def test_a_reply_reporting_an_impossible_epsilon_is_dropped(tmp_path, epsilon):
    """No honest ledger reports 0 after training, or more than the spec's target (5): the summary's
    epsilon is never a node's invention."""
    from fedpeft.flower import wire

    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=5.0)

    def forge(request, reply):  # noqa: ANN001, ANN202
        if wire.metrics_key(1) in reply.content:
            reply.content[wire.metrics_key(1)]["epsilon"] = epsilon
        return reply

    grid = LocalGrid(2)
    grid.tamper[101] = forge
    result = _run_flower(spec, tmp_path / "run", grid)
    assert result.history[0]["clients"] == [0] and "epsilon" in result.history[0]["dropped"]["1"]
    assert result.summary["epsilon"] <= 5.0


def test_the_summary_epsilon_is_the_servers_accounting_not_a_nodes_word(tmp_path):
    """A node that reports a plausible but false epsilon (0.001, inside (0, target]) is aggregated (its
    update is sound) but moves nothing the server reports: summary.json's epsilon is the server's own
    accounting, which for the honest nodes equals what they report."""
    from fedpeft.flower import wire

    spec = tiny_spec(federation__rounds=2, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=5.0)

    def understate(request, reply):  # noqa: ANN001, ANN202
        if wire.metrics_key(1) in reply.content:
            reply.content[wire.metrics_key(1)]["epsilon"] = 0.001
        return reply

    grid = LocalGrid(2)
    grid.tamper[101] = understate
    summary = _run_flower(spec, tmp_path / "run", grid).summary
    ours, said = summary["epsilon_per_client"], summary["epsilon_reported_per_client"]
    assert said["1"] == 0.001 and ours["0"] == pytest.approx(said["0"], rel=1e-9)
    parts = Federation.build(spec)
    steps = 2 * parts.plan.steps
    for cid in (0, 1):
        assert ours[str(cid)] == pytest.approx(
            client_budget(spec, cid, len(parts.data.clients[cid])).epsilon_after(steps)
        )
    assert summary["epsilon"] == max(ours.values()) > 1.0
