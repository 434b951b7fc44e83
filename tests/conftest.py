"""Shared fixtures: a tiny random BERT on synthetic data, so every test runs in seconds."""

from __future__ import annotations

import os

import pytest
import torch

from fedpeft.config import Spec

# The processes tests start (Flower's SuperNodes and ClientApps, Ray's actors, the race test's
# workers) inherit one intra-op thread, as the tests' own process uses (`_threads`): up to 4 test
# workers already share 2 cores, and a tiny model gains nothing from a second thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = {
    "name": "tiny",
    "federation.rounds": 3,
    "federation.clients": 4,
    "federation.clients_per_round": 3,
    "federation.seed": 0,
    "model.name": "tiny-bert",
    "model.max_length": 24,
    "data.name": "synthetic",
    "data.partition": "iid",
    "data.test_size": 200,
    "strategy.name": "fedavg",
    "privacy.epsilon": float("inf"),
    "train.local_steps": 5,
    "train.batch_size": 16,
    "train.lr": 0.3,
}


def tiny_spec(**overrides) -> Spec:
    """The tiny spec with dotted-key overrides (underscores for dots: federation__rounds=2)."""
    flat = {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return Spec().with_flat(flat)


@pytest.fixture(autouse=True, scope="session")
def _accounting_cache(tmp_path_factory):
    """Accounting results are cached on disk (fedpeft.privacy.cache): one fresh cache per test session."""
    os.environ["FEDPEFT_CACHE_DIR"] = str(tmp_path_factory.mktemp("accounting-cache"))
    yield


@pytest.fixture(autouse=True)
def _node_state(tmp_path, monkeypatch):
    """Flower nodes under DP keep ledgers in a default per-user directory: one per test here."""
    monkeypatch.setenv("FEDPEFT_STATE_DIR", str(tmp_path / "default-node-state"))
    yield


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tests compare floats: keep reductions in one thread's order
    yield


# The slowest files first (loadfile schedules a file's tests on one worker, in the order files first
# appear; pyproject turns off xdist's reordering by size, which sent the one-test quickstart file last):
# the long end-to-end tests start at once and the short ones fill the cores around them.
SLOWEST_FIRST = (
    "test_quickstart.py", "test_flower_deployment.py", "test_audit.py", "test_flower_deployment_faults.py",
    "test_reproducible.py", "test_flower_simulation.py",
)  # fmt: skip


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):  # noqa: ANN201
    """A loopback Flower deployment (TLS SuperLink, 3 authenticated SuperNodes), one per test file."""
    from fedpeft.deploy import LocalDeployment

    with LocalDeployment(tmp_path_factory.mktemp("deployment"), nodes=3) as dep:
        yield dep


def pytest_collection_modifyitems(config, items):  # noqa: ANN001, ANN201
    def rank(item):  # noqa: ANN001, ANN202
        name = item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: each file's own order is kept
