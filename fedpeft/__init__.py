"""fedpeft: federated, differentially private fine-tuning of transformer adapters (LoRA).

The public API, in the order of a run::

    from fedpeft import Federation, load_spec

    spec = load_spec("simulations/quickstart.toml").with_flat({"federation.rounds": 2})
    result = Federation.build(spec).run(Path("runs/demo"))
    print(result.summary["accuracy"], result.summary["epsilon"])

- `Spec`, `load_spec`, `default_spec`, `resolve_spec`: the federation spec and where it comes from.
- `Federation`, `RunResult`: build a federation from a spec and run its rounds.
- `STRATEGIES`, `Strategy`, `make_strategy`: the server strategies and their base class.
- `EXECUTORS`: who trains the sampled clients in process (sequential, cohort).
- `load_exported`: a finished run's exported adapter (and base-weight changes) on its base model.
- `predict`, `Predictor`: labels with probabilities for new texts from a finished run.
- `generate`: a causal LM's run: greedy answers to prompts.

Names load on first use, so ``import fedpeft`` (and the command line's help) stays fast.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("fedpeft")  # pyproject.toml is the one place it is written
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "Spec": "fedpeft.config",
    "ConfigError": "fedpeft.config",
    "load_spec": "fedpeft.spec_io",
    "default_spec": "fedpeft.spec_io",
    "resolve_spec": "fedpeft.spec_io",
    "Federation": "fedpeft.federation",
    "RunResult": "fedpeft.federation",
    "Callbacks": "fedpeft.federation",
    "STRATEGIES": "fedpeft.strategies",
    "Strategy": "fedpeft.strategies",
    "make_strategy": "fedpeft.strategies",
    "EXECUTORS": "fedpeft.executors",
    "AdapterState": "fedpeft.state",
    "ClientUpdate": "fedpeft.state",
    "load_exported": "fedpeft.adapters",
    "predict": "fedpeft.inference",
    "Predictor": "fedpeft.inference",
    "generate": "fedpeft.inference",
}

__all__ = [
    "EXECUTORS", "STRATEGIES", "AdapterState", "Callbacks", "ClientUpdate", "ConfigError", "Federation", "Predictor",
    "RunResult", "Spec", "Strategy", "__version__", "default_spec", "generate", "load_exported", "load_spec", "make_strategy",
    "predict", "resolve_spec",
]  # fmt: skip
assert set(__all__) == {"__version__", *_EXPORTS}

if TYPE_CHECKING:
    from fedpeft.adapters import load_exported
    from fedpeft.config import ConfigError, Spec
    from fedpeft.executors import EXECUTORS
    from fedpeft.federation import Callbacks, Federation, RunResult
    from fedpeft.inference import Predictor, generate, predict
    from fedpeft.spec_io import default_spec, load_spec, resolve_spec
    from fedpeft.state import AdapterState, ClientUpdate
    from fedpeft.strategies import STRATEGIES, Strategy, make_strategy


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedpeft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
