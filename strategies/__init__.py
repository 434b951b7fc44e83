"""Server strategies: pure functions of (global adapter, client updates, state). No Flower import.

Installed and imported as ``fedpeft.strategies`` (the folder is top-level in the repository).
Each module registers its strategies by name in STRATEGIES; `make_strategy(name, options)` builds
one, and an unknown name or option is an error that lists the valid ones.
"""

from . import fedavg, fedex, fedsa, fedsvd, ffa, flexlora, flora, hetlora, lora_fair  # noqa: F401  (register)
from .base import STRATEGIES, Strategy, make_strategy, weighted_mean

__all__ = ["STRATEGIES", "Strategy", "make_strategy", "weighted_mean"]
