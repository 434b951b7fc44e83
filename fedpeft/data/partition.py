"""Split a training pool across clients: iid, Dirichlet label skew (flwr-datasets), natural ids."""

from __future__ import annotations

import random

import numpy as np

__all__ = ["partition"]


def _flwr_partitions(partitioner, labels: list[int]) -> list[list[int]]:  # noqa: ANN001
    from datasets import Dataset

    partitioner.dataset = Dataset.from_dict({"label": labels, "row": list(range(len(labels)))})
    return [list(partitioner.load_partition(i)["row"]) for i in range(partitioner.num_partitions)]


def _natural(groups: list[str], num_clients: int, seed: int) -> list[list[int]]:
    """Whole groups (e.g. movies) go to clients: groups in seeded random order, each to the client
    holding the fewest examples so far, so client sizes stay close while no group is split."""
    by_group: dict[str, list[int]] = {}
    for row, group in enumerate(groups):
        by_group.setdefault(group, []).append(row)
    if len(by_group) < num_clients:
        raise ValueError(
            f"natural partition: {len(by_group)} groups cannot fill {num_clients} clients; "
            "lower federation.clients or use data.partition = 'iid' or 'dirichlet'"
            + (" (a file without a group column is one group: name one with data.columns = ['group=COLUMN'])"
               if len(by_group) == 1 else "")
        )  # fmt: skip
    names = sorted(by_group)
    random.Random(seed).shuffle(names)
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for name in names:
        min(clients, key=len).extend(by_group[name])
    return [sorted(rows) for rows in clients]


def partition(
    labels: list[int], groups: list[str], num_clients: int, how: str, alpha: float, seed: int
) -> list[list[int]]:
    """Return, per client, the row indices of its examples (disjoint, covering the pool)."""
    if len(labels) < num_clients:
        raise ValueError(f"{len(labels)} training examples cannot be split across {num_clients} clients")
    if how == "natural":
        return _natural(groups, num_clients, seed)
    if how == "iid":
        order = np.random.default_rng(seed).permutation(len(labels))
        return [sorted(order[i::num_clients].tolist()) for i in range(num_clients)]
    if how == "dirichlet":
        from flwr_datasets.partitioner import DirichletPartitioner

        min_size = max(1, min(10, len(labels) // (2 * num_clients)))
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
        return [sorted(rows) for rows in _flwr_partitions(partitioner, labels)]
    raise ValueError(f"unknown partition {how!r}; valid: iid, dirichlet, natural")
