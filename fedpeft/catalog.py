"""What a spec can name, and what is known of each name without building it (no torch import).

The strategies (fedpeft.strategies), adapter families (fedpeft.families) and executors
(fedpeft.executors) are torch code. The families' and executors' registries accept only names
declared here (strategies import nothing above state and registry); tests/test_catalog.py checks
that the registered and declared names agree and that each declaration says what its object does. So
`fedpeft list` and a misspelt name in a spec answer at once, and by the same rules as a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedpeft.config import ConfigError
from fedpeft.registry import require_known

if TYPE_CHECKING:
    from fedpeft.config import Spec

__all__ = ["EXECUTOR_NAMES", "FAMILY_INFO", "STRATEGY_INFO", "FamilyInfo", "StrategyInfo", "check_names", "runs_family"]


@dataclass(frozen=True)
class StrategyInfo:
    any_family: bool  # the server step treats every upload alike: right for every adapter family
    sum_only: bool  # with its default options, the server step needs only the weighted sum of uploads


@dataclass(frozen=True)
class FamilyInfo:
    summary: str
    linear: bool  # delta W is linear in what trains (every family but LoRA)


STRATEGY_INFO: dict[str, StrategyInfo] = {
    "fedavg": StrategyInfo(any_family=True, sum_only=True),
    "fedex": StrategyInfo(any_family=False, sum_only=False),
    "fedsa": StrategyInfo(any_family=False, sum_only=True),
    "fedsvd": StrategyInfo(any_family=False, sum_only=True),
    "ffa": StrategyInfo(any_family=False, sum_only=True),
    "flexlora": StrategyInfo(any_family=False, sum_only=False),
    "flora": StrategyInfo(any_family=False, sum_only=False),
    "hetlora": StrategyInfo(any_family=False, sum_only=False),
    "lora-fair": StrategyInfo(any_family=False, sum_only=False),
}

FAMILY_INFO: dict[str, FamilyInfo] = {
    "lora": FamilyInfo("PEFT LoRA, delta W = s B A (r(d_in + d_out) per layer)", linear=False),
    "svd": FamilyInfo("singular values, delta W = s U diag(theta) V^T on W0's top r (r per layer)", linear=True),
    "core": FamilyInfo("r x r core, delta W = s U R V^T in W0's top-r frames (r^2 per layer)", linear=True),
    "paca": FamilyInfo("r random columns of W0 trained directly (PaCA; r d_out per layer)", linear=True),
}

EXECUTOR_NAMES: tuple[str, ...] = ("cohort", "sequential")


def runs_family(strategy: str, adapter: str) -> bool:
    """Whether `strategy` can aggregate what `adapter` trains: LoRA runs with every strategy, a
    linear family only with those that treat every upload alike (`StrategyInfo.any_family`)."""
    require_known("strategy", strategy, STRATEGY_INFO)
    require_known("adapter family", adapter, FAMILY_INFO)
    return not FAMILY_INFO[adapter].linear or STRATEGY_INFO[strategy].any_family


def check_names(spec: Spec) -> None:
    """Unknown names fail before any work, each listing the valid ones, and so does a combination
    that cannot run: an adapter family the strategy cannot aggregate, client-level DP or secure
    aggregation with a strategy that needs more than the sum of the updates."""
    from fedpeft.data import INSTRUCTION_DATASETS, is_instruction  # torch-free, as is fedpeft.models
    from fedpeft.models import model_entry

    causal = model_entry(spec.model.name).task == "causal-lm"
    if causal != (instruction := is_instruction(spec.data)):
        raise ConfigError(
            f"model {spec.model.name!r} is a {'causal LM' if causal else 'classifier'} and dataset {spec.data.name!r} "
            f"is {'instruction' if instruction else 'classification'} data: causal LMs train on instruction data "
            f"({', '.join(INSTRUCTION_DATASETS)}, or a file with prompt and answer columns), classifiers on the others"
        )
    if causal and (
        spec.federation.executor == "cohort" or spec.model.adapter != "lora" or spec.model.head_init != "random"
    ):
        raise ConfigError(
            "a causal LM runs with federation.executor = sequential, model.adapter = lora and model.head_init = random "
            "(the cohort executor, the linear families and the head settings are the classifiers')"
        )
    require_known("strategy", spec.strategy.name, STRATEGY_INFO)
    require_known("executor", spec.federation.executor, EXECUTOR_NAMES)
    require_known("adapter family", spec.model.adapter, FAMILY_INFO)
    sum_users = [what for on, what in (
        (spec.privacy.client_enabled, "client-level DP (privacy.client_epsilon) noises"),
        (spec.federation.secagg, "secure aggregation (federation.secagg) reveals only"),
    ) if on]  # fmt: skip
    if sum_users:
        from fedpeft.strategies import make_strategy  # the options decide (robust = median is no sum)

        if not make_strategy(spec.strategy.name, spec.strategy.kwargs).sum_only:
            valid = ", ".join(n for n in sorted(STRATEGY_INFO) if STRATEGY_INFO[n].sum_only)
            raise ConfigError(
                f"{sum_users[0]} the sum of the clients' updates, so it needs a strategy whose server step "
                f"uses only that sum; {spec.strategy.name!r} does not: use {valid}"
            )
    if spec.privacy.client_enabled and spec.federation.outlier_norm:
        raise ConfigError(
            "federation.outlier_norm drops updates far from the round's median: under client-level DP one client "
            "would decide which others enter the clipped sum; leave it 0 (client clipping bounds every update)"
        )
    adapter = spec.model.adapter
    if not runs_family(spec.strategy.name, adapter):
        valid = ", ".join(n for n in sorted(STRATEGY_INFO) if runs_family(n, adapter))
        raise ConfigError(
            f"strategy {spec.strategy.name!r} works on LoRA's factors B and A; model.adapter = {adapter!r} "
            f"trains one tensor whose weight change is linear, so plain averaging is exact: use {valid}"
        )
    if FAMILY_INFO[adapter].linear and spec.model.client_ranks:
        raise ConfigError(f"model.client_ranks are LoRA ranks; model.adapter = {adapter!r} has none")
