"""Datasets (registry), the server's held-out test split, and client partitions, tokenised once."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedpeft.config import DataConfig
from fedpeft.data import rotten_tomatoes, synthetic
from fedpeft.data.base import FederatedData, TextDataset, TokenizedData
from fedpeft.data.partition import partition
from fedpeft.models import Tokenizer
from fedpeft.registry import Registry

__all__ = ["DATASETS", "FederatedData", "TextDataset", "TokenizedData", "prepare"]

DATASETS: Registry[Callable[[], TextDataset]] = Registry("dataset")
DATASETS.register("rotten-tomatoes")(rotten_tomatoes.load)
DATASETS.register("synthetic")(synthetic.load)


def prepare(
    cfg: DataConfig,
    num_clients: int,
    tokenizer: Tokenizer,
    max_length: int,
    seed: int,
    raw: TextDataset | None = None,
) -> FederatedData:
    """Hold out the server's test split, partition the rest, tokenise everything once.

    `raw` is the loaded dataset `cfg.name`; it is loaded here when not given."""
    raw = raw if raw is not None else DATASETS.get(cfg.name)()
    n = len(raw.texts)
    if cfg.test_size >= n:
        raise ValueError(f"data.test_size={cfg.test_size} leaves no training data ({n} examples)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    test_rows, pool = order[: cfg.test_size], sorted(order[cfg.test_size :])
    if cfg.max_examples:
        keep = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 1))[: cfg.max_examples]
        pool = sorted(pool[i] for i in keep.tolist())

    input_ids, attention_mask = tokenizer.encode_batch(raw.texts, max_length)
    everything = TokenizedData(input_ids, attention_mask, torch.tensor(raw.labels, dtype=torch.long))
    parts = partition(
        [raw.labels[i] for i in pool],
        [raw.groups[i] for i in pool],
        num_clients,
        cfg.partition,
        cfg.dirichlet_alpha,
        seed,
    )
    pool_t = torch.tensor(pool, dtype=torch.long)
    clients = [everything.select(pool_t[torch.tensor(rows, dtype=torch.long)]) for rows in parts]
    return FederatedData(clients, everything.select(torch.tensor(test_rows)), raw.label_names)
