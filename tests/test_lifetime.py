"""A node's privacy budget over its data's lifetime (issue 31): every run on the same data composes,
against Opacus's accountant by hand; secure defaults for a node with its own data; refusals that
tell the server a category only; a ledger two processes cannot race."""

from __future__ import annotations

import json
import multiprocessing
import warnings
from pathlib import Path

import pytest

from fedpeft.build import client_budget
from fedpeft.cli import main as cli
from fedpeft.config import ConfigError
from fedpeft.executors.base import ClientFailure
from fedpeft.federation import Callbacks, Federation
from fedpeft.flower import wire
from fedpeft.flower.client_app import make_app
from fedpeft.flower.executor import FlowerExecutor
from fedpeft.flower.lifetime import AUDIT_FILE, DataKey, Lifetime, LifetimeRefusal
from fedpeft.flower.local import LocalGrid
from fedpeft.flower.policy import BUDGET, POLICY, REAL_MAX_EPSILON, REFUSALS
from tests.conftest import tiny_spec


def _by_hand(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus's PRV accountant on the composed history (the steps of each (sigma, q) summed: the
    same mechanism composed n times), without fedpeft's accounting code."""
    from opacus.accountants import PRVAccountant

    total: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        total[(s, q)] = total.get((s, q), 0) + n
    acc = PRVAccountant()
    acc.history = [(s, q, n) for (s, q), n in total.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def _run(spec, out: Path, state: Path, run_id: int, config: dict | None = None, restart: bool = False):  # noqa: ANN001, ANN202
    """One Flower run against nodes whose process is new (fresh contexts) and whose disk is `state`;
    with `restart`, every node restarts again after each round."""
    grid = LocalGrid(spec.federation.clients, state_dir=state, run_id=run_id, node_config=config)

    def restart_all(record: dict) -> None:
        for nid in list(grid.contexts):
            grid.restart(nid)

    callbacks = Callbacks(on_round_end=restart_all) if restart else None
    return Federation.build(spec, executor=FlowerExecutor(grid, spec, connect_timeout=0)).run(out, callbacks=callbacks)


def test_three_runs_compose_and_the_third_stops_exactly_where_the_lifetime_total_would_pass(tmp_path):
    """Every run starts on restarted nodes (fresh Flower contexts, the same disk), and the nodes restart
    again after each round of the third: only the disk carries the lifetime ledger."""
    spec = tiny_spec(federation__rounds=3, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=2.0)
    sizes = [len(c) for c in Federation.build(spec).data.clients]
    steps, delta = spec.train.local_steps, spec.privacy.delta
    mech = [(b.sigma, b.q) for b in (client_budget(spec, c, sizes[c]) for c in range(2))]
    one_run = [[(s, q, steps)] * 3 for s, q in mech]  # per client: a whole run, round by round
    # max-epsilon halfway between "two runs + one round" and "two runs + two rounds", for the tighter client
    after = [[_by_hand(2 * one_run[c] + one_run[c][:k], delta) for k in (1, 2)] for c in range(2)]
    limit = min((a + b) / 2 for a, b in after)
    assert all(_by_hand(2 * one_run[c], delta) < limit for c in range(2))  # two whole runs fit
    config = {"max-epsilon": limit}
    state = tmp_path / "node"
    first = _run(spec, tmp_path / "r1", state, 1, config)
    second = _run(spec, tmp_path / "r2", state, 2, config)
    assert [r["clients"] for r in first.history + second.history] == [[0, 1]] * 6
    third = _run(spec, tmp_path / "r3", state, 3, config, restart=True)  # nodes restarted after every round
    # each client trains while its composed lifetime total stays within the limit, not a round more
    for c in range(2):
        rounds_trained = sum(c in r["clients"] for r in third.history)
        expected = max(k for k in range(4) if _by_hand(2 * one_run[c] + one_run[c][:k], delta) <= limit)
        assert rounds_trained == expected
        assert all(r["dropped"][str(c)] == BUDGET for r in third.history[expected:])
    assert min(sum(c in r["clients"] for r in third.history) for c in range(2)) == 1
    fourth = _run(spec, tmp_path / "r4", state, 4, config)
    assert all(r["clients"] == [] for r in fourth.history)
    assert all(why == BUDGET for r in fourth.history for why in r["dropped"].values())
    # the node's ledger reports the composed total, equal to the accountant by hand
    rows = {row["key"]: row for row in Lifetime(state).table()}
    for c in range(2):
        (row,) = [r for key, r in rows.items() if key.endswith(f":client-{c}")]
        trained = 6 + sum(c in r["clients"] for r in third.history)
        assert row["epsilon"] == pytest.approx(_by_hand([(mech[c][0], mech[c][1], steps)] * trained, delta), rel=1e-6)
        assert row["epsilon"] <= limit
        # the fourth was refused before it spent anything
        assert sorted(row["runs"]) == [f"{run}/client-{c}" for run in "123"]


def test_a_node_with_its_own_data_refuses_no_dp_and_stops_at_its_default_lifetime_epsilon(tmp_path, caplog):
    caplog.set_level("INFO", logger="fedpeft")
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"text": f"fine {i}", "label": i % 2}) + "\n" for i in range(40)))
    own = {"data-file": str(path), "public-size": 40}
    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2)
    grid = LocalGrid(2, state_dir=tmp_path / "node", app=make_app())  # its own node: it announces its policy
    grid.contexts[101].node_config.update(own)
    nodp = spec.with_flat({"privacy.epsilon": float("inf")})
    result = Federation.build(nodp, executor=FlowerExecutor(grid, nodp, connect_timeout=0)).run(tmp_path / "nodp")
    assert result.history[0]["clients"] == [0]  # the simulation default still runs; the real node refuses
    assert result.history[0]["dropped"] == {"1": POLICY}
    assert "allow-no-dp false" in caplog.text and f"max-epsilon {REAL_MAX_EPSILON:g}" in caplog.text
    over = spec.with_flat({"privacy.epsilon": REAL_MAX_EPSILON + 1})
    result = Federation.build(over, executor=FlowerExecutor(grid, over, connect_timeout=0)).run(tmp_path / "over")
    assert result.history[0]["dropped"] == {"1": POLICY}


def _rows(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"text": f"fine {i}", "label": i % 2}) + "\n" for i in range(start, start + n))


def _own_runner(tmp_path: Path, spec, state: Path):  # noqa: ANN001, ANN202
    """Run `spec` on two nodes whose second holds `path` as its data file (public size 40)."""

    bound = spec.with_flat({"federation.public_sizes": [0, 40]})  # the server's binding of the node's size

    def run(name: str, run_id: int, path: Path, config: dict | None = None):  # noqa: ANN202
        grid = LocalGrid(2, state_dir=state, run_id=run_id)
        grid.contexts[101].node_config.update({"data-file": str(path), "public-size": 40, **(config or {})})
        return Federation.build(bound, executor=FlowerExecutor(grid, bound, connect_timeout=0)).run(tmp_path / name)

    return run


def _file_row(state: Path, path: Path) -> dict:
    (row,) = [r for r in Lifetime(state).table() if f"file:{path.resolve()}" in r["paths"]]
    return row


def test_a_grown_file_keeps_training_and_its_lifetime_epsilon_counts_the_old_rows(tmp_path, capsys):
    path = tmp_path / "mine.jsonl"
    path.write_text(_rows(40))
    spec = tiny_spec(federation__rounds=1, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=3.0)
    state = tmp_path / "node"
    run = _own_runner(tmp_path, spec, state)
    assert run("a", 1, path).history[0]["clients"] == [0, 1]
    one = _file_row(state, path)["epsilon"]
    path.write_text(path.read_text() + _rows(1, 40))  # one more example: the server learns nothing of it
    assert run("b", 2, path).history[0]["clients"] == [0, 1]
    row = _file_row(state, path)
    assert sorted(row["runs"]) == ["1/client-1", "2/client-1"] and row["epsilon"] > one  # both runs compose
    assert "changed" in (state / AUDIT_FILE).read_text()
    # --reset keeps composing the history; --forget drops it, audited
    assert cli(["node", "ledger", "--state-dir", str(state), "--reset", str(path)]) == 0
    assert _file_row(state, path)["epsilon"] == pytest.approx(row["epsilon"])
    assert cli(["node", "ledger", "--state-dir", str(state), "--forget", str(path)]) == 0
    assert "FORGET" in (state / AUDIT_FILE).read_text()
    assert not [r for r in Lifetime(state).table() if f"file:{path.resolve()}" in r["paths"]]
    assert cli(["node", "ledger", "--state-dir", str(state), "--reset", str(tmp_path / "nothing")]) == 2
    assert "no lifetime entry" in capsys.readouterr().err


def test_a_hard_link_a_copy_a_grown_copy_and_a_reset_cannot_exceed_max_epsilon(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(_rows(40))
    spec = tiny_spec(federation__rounds=2, federation__clients=2, federation__clients_per_round=2, privacy__epsilon=3.0)
    state = tmp_path / "node"
    run = _own_runner(tmp_path, spec, state)
    first = run("a", 1, path)
    cap = {"max-epsilon": _file_row(state, path)["epsilon"] * 1.01}  # the first run spent all of it
    assert [r["clients"] for r in first.history] == [[0, 1]] * 2
    link = tmp_path / "link.jsonl"
    link.hardlink_to(path)
    copy = tmp_path / "copy.jsonl"
    copy.write_text(path.read_text())
    grown = tmp_path / "grown.jsonl"
    grown.write_text(path.read_text() + _rows(3, 40))
    for i, other in enumerate([link, copy, grown, path]):
        result = run(f"again-{i}", 10 + i, other, cap)
        assert all(r["dropped"] == {"1": BUDGET} for r in result.history), other.name
    assert cli(["node", "ledger", "--state-dir", str(state), "--reset", str(path)]) == 0
    assert run("after-reset", 20, path, cap).history[0]["dropped"] == {"1": BUDGET}
    rows = [r for r in Lifetime(state).table() if f"file:{path.resolve()}" in r["paths"]]
    assert len(rows) == 1 and rows[0]["epsilon"] <= cap["max-epsilon"]


def test_two_clients_on_one_file_in_one_run_compose(tmp_path):
    ledger, key = Lifetime(tmp_path), DataKey("file:/data", "abc")
    mech = [(1.0, 0.1, 20)]
    for cid in (0, 1):
        ledger.reserve(key, "7", mech, 1e-5, "prv", float("inf"), cid)
    (row,) = ledger.table()
    assert row["epsilon"] == pytest.approx(_by_hand(mech * 2, 1e-5), rel=1e-6)
    assert row["epsilon"] > _by_hand(mech, 1e-5) * 1.2


def test_bundled_partitions_are_keyed_by_their_rows_not_by_spec_fields(tmp_path):
    from fedpeft.flower.lifetime import bundled_key

    ledger, mech = Lifetime(tmp_path), [(1.0, 0.1, 20)]
    ledger.reserve(bundled_key("rt", 0, [1, 2, 3]), "1", mech, 1e-5, "prv", float("inf"))
    ledger.reserve(bundled_key("rt", 5, [3, 4]), "2", mech, 1e-5, "prv", float("inf"))  # shares row 3
    ledger.reserve(bundled_key("rt", 1, [8, 9]), "3", mech, 1e-5, "prv", float("inf"))  # disjoint
    eps = sorted(r["epsilon"] for r in ledger.table())
    assert eps == pytest.approx([_by_hand(mech, 1e-5), _by_hand(mech * 2, 1e-5)], rel=1e-6)


def test_a_torn_ledger_is_recovered_never_started_afresh(tmp_path):
    ledger, key, mech = Lifetime(tmp_path), DataKey("file:/data", "abc"), [(1.0, 0.1, 20)]
    ledger.reserve(key, "1", mech, 1e-5, "prv", float("inf"))
    spent = ledger.table()[0]["epsilon"]
    (tmp_path / "lifetime.json").write_text('{"data": {"file:/da')  # torn
    assert Lifetime(tmp_path).table()[0]["epsilon"] == pytest.approx(spent)  # from the kept copy
    (tmp_path / "lifetime.prev.json").write_text("garbage")
    run_dir = tmp_path / "run-1"
    run_dir.mkdir()
    budget = {"history": mech, "delta": 1e-5, "accountant": "prv"}
    (run_dir / "client-0.json").write_text(json.dumps({"budget": budget, "data": "file:/data"}))
    assert Lifetime(tmp_path).table()[0]["epsilon"] == pytest.approx(spent)  # rebuilt from the run ledger
    (run_dir / "client-0.json").unlink()
    with pytest.raises(ValueError, match="restore it from a backup"):
        Lifetime(tmp_path).read()


def test_a_data_file_node_without_a_state_dir_fails_closed(tmp_path):
    from flwr.app import Context, RecordDict

    from fedpeft.flower.node import ClientRecords

    path = tmp_path / "mine.jsonl"
    path.write_text(_rows(10))
    context = Context(run_id=1, node_id=1, node_config={"data-file": str(path)}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="needs state-dir"):
        ClientRecords(context, 0, tiny_spec(privacy__epsilon=3.0))


def test_refusal_reasons_leave_a_node_as_categories_only():
    failures = [
        ClientFailure(
            0, "client 0 refuses to train: 5 more steps would spend epsilon 4.261 > its budget 4", refused=True
        ),
        ClientFailure(1, POLICY, refused=True),
    ]
    sent = json.loads(str(wire.train_reply(failures, private=True)[wire.STATUS][wire.REFUSED]))
    assert sent == {"0": BUDGET, "1": POLICY} and set(sent.values()) <= set(REFUSALS)


def _spend(root: str, name: str, attempts: int, limit: float, out) -> None:  # noqa: ANN001
    ledger, done = Lifetime(Path(root)), 0
    for i in range(attempts):
        try:
            ledger.reserve(DataKey("bundled:x"), f"{name}-{i}", [(1.0, 0.1, 20)], 1e-5, "prv", limit)
            done += 1
        except LifetimeRefusal:
            pass
    out.put(done)


def test_two_processes_cannot_race_the_ledger_past_its_limit(tmp_path):
    one = _by_hand([(1.0, 0.1, 20)], 1e-5)
    limit = (_by_hand([(1.0, 0.1, 20 * 5)], 1e-5) + _by_hand([(1.0, 0.1, 20 * 6)], 1e-5)) / 2  # room for 5 runs
    assert one < limit
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_spend, args=(str(tmp_path), name, 6, limit, out)) for name in ("p", "q")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    granted = out.get(timeout=5) + out.get(timeout=5)
    book = Lifetime(tmp_path).read()
    assert granted == 5 == len(book["data"]["bundled:x"]["records"])  # no reservation lost, none past the limit


def test_a_wait_on_a_held_ledger_says_what_it_waits_for(tmp_path, caplog):
    """Before: `node ledger --reset` waited up to 120 s in silence while a node held the ledger."""
    import fcntl
    import threading

    from fedpeft.flower.lifetime import LOCK_FILE

    ledger = Lifetime(tmp_path)
    ledger.table()  # makes the state dir
    holder = (tmp_path / LOCK_FILE).open("a+")  # another open file: flock blocks this process too
    fcntl.flock(holder, fcntl.LOCK_EX)
    threading.Timer(1.6, lambda: fcntl.flock(holder, fcntl.LOCK_UN)).start()
    with caplog.at_level("WARNING", logger="fedpeft"):
        with pytest.raises(ConfigError, match="no lifetime entry"):  # it waited, then did its work
            ledger.reset("nothing-here.jsonl")
    holder.close()
    assert f"waiting for {tmp_path / LOCK_FILE}, held by a node training on this data" in caplog.text
    with (tmp_path / LOCK_FILE).open("a+") as again:
        fcntl.flock(again, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match="held for over 0.2 s"):
            with ledger._held(timeout=0.2):
                pass
