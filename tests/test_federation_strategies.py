"""Each strategy inside the real round loop on the tiny model: trains, exports, accounts bytes."""

from __future__ import annotations

import pytest
import torch
from fedpeft.strategies import STRATEGIES

from fedpeft.adapters import load_exported
from fedpeft.federation import Federation
from fedpeft.state import base_name, kind_of
from tests.conftest import tiny_spec


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_runs_privately_and_exports(tmp_path, name):
    spec = tiny_spec(strategy__name=name, privacy__epsilon=8.0, federation__rounds=2)
    fed = Federation.build(spec)
    result = fed.run(tmp_path)
    assert all(torch.isfinite(t).all() for t in result.state.tensors.values())
    assert result.summary["epsilon"] <= 8.0 and result.summary["bytes_up"] > 0
    assert all(r["aggregated"] and not r["dropped"] for r in result.history)
    if not fed.strategy.personal:  # the exported adapter is the global model
        loaded, _ = load_exported(tmp_path)
        ids, mask, _ = fed.data.test.batch(torch.arange(16))
        fed.model.load(result.state)
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(input_ids=ids, attention_mask=mask), fed.model.forward(ids, mask), rtol=1e-4, atol=1e-5
            )


def test_fedex_base_changes_reach_every_client_and_are_counted(tmp_path):
    spec = tiny_spec(strategy__name="fedex", federation__rounds=3, federation__clients_per_round=2)
    fed = Federation.build(spec)
    result = fed.run(tmp_path)
    deltas = [t for n, t in result.state.tensors.items() if n.endswith(".base_delta")]
    assert deltas and all(d.abs().sum() > 0 for d in deltas)
    # a client that loads the global state computes with W0 + delta
    layer = result.state.layers[0]
    fed.model.load(result.state)
    torch.testing.assert_close(
        fed.model._base[layer].detach(), fed.model._w0[layer] + result.state.tensors[base_name(layer)]
    )
    # bytes down include the factored residuals of the rounds a client missed
    adapter_bytes = result.state.num_bytes([n for n in result.state.tensors if kind_of(n) != "base"])
    assert result.history[0]["bytes_down"] == 2 * adapter_bytes
    assert all(r["bytes_down"] > 2 * adapter_bytes for r in result.history[1:])


def test_fedsa_keeps_b_on_each_client(tmp_path):
    spec = tiny_spec(strategy__name="fedsa", federation__rounds=3, federation__clients_per_round=4)
    fed = Federation.build(spec)
    initial = fed.model.state()
    result = fed.run(tmp_path)
    b_names = [n for n in initial.tensors if ".lora_B." in n]
    for n in b_names:  # the global B never moves: it is never uploaded
        assert torch.equal(result.state.tensors[n], initial.tensors[n])
    personal = fed.executor.store.personal
    assert sorted(personal) == [0, 1, 2, 3]
    assert not torch.equal(personal[0][b_names[0]], personal[1][b_names[0]])
    assert result.summary["accuracy"] >= result.summary["majority_rate"] + 0.1


@pytest.mark.parametrize("name", ["flexlora", "hetlora", "fedavg"])
def test_heterogeneous_ranks_stay_within_each_clients_rank(tmp_path, name):
    spec = tiny_spec(
        strategy__name=name,
        model__rank=8,
        model__client_ranks=[2, 4, 8],
        privacy__epsilon=8.0,
        federation__clients_per_round=4,
    )
    fed = Federation.build(spec)
    state = fed.model.state()
    plan_ranks = {0: 2, 1: 4, 2: 8, 3: 2}
    results = fed.executor.run_round(1, [0, 1, 2, 3], state, fed.plan, {c: c + 10 for c in range(4)})
    for update in results:
        rank = plan_ranks[update.client_id]
        assert update.rank == rank
        for n, t in update.tensors.items():
            if kind_of(n) == "A":
                assert torch.count_nonzero(t[rank:]) == 0 and torch.count_nonzero(t[:rank]) > 0
            elif kind_of(n) == "B":
                assert torch.count_nonzero(t[:, rank:]) == 0 and torch.count_nonzero(t[:, :rank]) > 0
    result = fed.run(tmp_path)
    assert result.summary["rounds"] == 3 and result.summary["accuracy"] > 0
    full = state.num_bytes(list(fed.plan.uploads))
    assert result.history[0]["bytes_up"] < len(result.history[0]["clients"]) * full  # ranks 2 and 4 send less


def test_client_ranks_are_validated():
    from fedpeft.config import ConfigError

    with pytest.raises(ConfigError, match="client_ranks must each be between 1 and model.rank=4"):
        tiny_spec(model__rank=4, model__client_ranks=[2, 8])
