"""Executors decide who trains the sampled clients of a round; the round loop is the same for all."""

from fedpeft.executors.base import ClientFailure, ClientResult, ClientStateStore, Executor
from fedpeft.executors.sequential import SequentialExecutor

__all__ = ["ClientFailure", "ClientResult", "ClientStateStore", "Executor", "SequentialExecutor"]
