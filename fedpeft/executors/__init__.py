"""Executors decide who trains the sampled clients of a round; the round loop is the same for all.

In-process executors register in EXECUTORS by name (`federation.executor`); the Flower grid
executor lives in fedpeft.flower.
"""

from fedpeft.executors import cohort, sequential  # noqa: F401  (register)
from fedpeft.executors.base import EXECUTORS, ClientFailure, ClientResult, ClientStore, Executor, SecureSum
from fedpeft.executors.cohort import CohortExecutor
from fedpeft.executors.sequential import SequentialExecutor

__all__ = [
    "EXECUTORS", "ClientFailure", "ClientResult", "ClientStore", "CohortExecutor", "Executor", "SecureSum",
    "SequentialExecutor",
]  # fmt: skip
