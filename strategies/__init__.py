"""Server strategies: pure functions of (global adapter, client updates, state). No Flower import."""

from strategies import fedavg, fedsvd  # noqa: F401  (register)
from strategies.base import STRATEGIES, Strategy, make_strategy, weighted_mean

__all__ = ["STRATEGIES", "Strategy", "make_strategy", "weighted_mean"]
