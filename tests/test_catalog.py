"""fedpeft.catalog declares, without torch, what the registries' objects do: check each declaration
against the object it describes, so `fedpeft list` and the spec checks cannot drift from a run."""

from __future__ import annotations

import pytest
from fedpeft.strategies import STRATEGIES, make_strategy

from fedpeft.catalog import EXECUTOR_NAMES, FAMILY_INFO, STRATEGY_INFO, runs_family
from fedpeft.executors import EXECUTORS
from fedpeft.families import FAMILIES
from fedpeft.registry import Registry
from fedpeft.state import LORA_A, LORA_B, THETA


def test_every_registered_name_is_declared_and_every_declared_name_registered():
    hint = "declare every registered name in fedpeft/catalog.py"
    assert sorted(STRATEGIES.names()) == sorted(STRATEGY_INFO), hint
    assert sorted(FAMILIES.names()) == sorted(FAMILY_INFO), hint
    assert sorted(EXECUTORS.names()) == sorted(EXECUTOR_NAMES), hint


@pytest.mark.parametrize("name", sorted(STRATEGY_INFO))
def test_strategy_declarations_match_the_strategy(name):
    strategy = make_strategy(name)
    info = STRATEGY_INFO[name]
    assert strategy.sum_only == info.sum_only
    # a strategy that trains THETA (the linear families' one tensor) is the one that treats every
    # upload alike; the LoRA strategies train only B and/or A
    assert (THETA in strategy.trains) == info.any_family
    assert strategy.trains & {LORA_A, LORA_B}


@pytest.mark.parametrize("name", sorted(FAMILY_INFO))
def test_family_declarations_match_the_family(name):
    family = FAMILIES.get(name)
    assert family.linear == FAMILY_INFO[name].linear
    assert family.summary == FAMILY_INFO[name].summary
    assert (family.trains == {THETA}) == family.linear
    # LoRA runs with every strategy; a linear family with exactly the any-family ones
    runners = {s for s in STRATEGY_INFO if runs_family(s, name)}
    assert runners == (set(STRATEGY_INFO) if not family.linear else {"fedavg"})


def test_a_registry_refuses_an_undeclared_name_and_unknown_names_list_the_valid_ones():
    registry: Registry[int] = Registry("strategy", STRATEGY_INFO)
    with pytest.raises(ValueError, match="not declared in fedpeft.catalog"):
        registry.register("fedprox")(1)
    registry.register("fedavg")(1)
    assert registry.get("fedavg") == 1
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'; valid: fedavg, fedex"):
        runs_family("fedprox", "lora")
