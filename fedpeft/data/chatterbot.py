"""Question-answer pairs from the English ChatterBot corpus (`chatterbot-corpus`, BSD-3), by topic.

Each of the corpus's 21 English topic files lists conversations; in ChatterBot's own reading every
statement answers the one before it, so a conversation [s0, s1, s2] gives the pairs (s0, s1) and
(s1, s2). The topic is each pair's group (a natural non-IID split) and its label index (so the
Dirichlet partitioner splits by topic too). Files are read with a YAML parser, never by importing
the package. Duplicate (prompt, answer) pairs keep their first occurrence.

The server's test split is drawn by conversation (each pair's unit is its conversation), and a test
pair whose answer is verbatim a training prompt or answer is dropped (`novel_answers`): a split by
pair put 28-42 of 100 test pairs beside a training pair of their own conversation (issue 33).
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

from fedpeft.data.base import TextDataset

PACKAGE = "chatterbot_corpus"


def data_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "dataset 'chatterbot' needs the package chatterbot-corpus: pip install --no-deps chatterbot-corpus"
        )
    path = Path(spec.origin).parent / "data" / "english"
    if not path.is_dir():
        raise RuntimeError(f"chatterbot-corpus is installed but {path} is missing")
    return path


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else str(value).strip()


def load() -> TextDataset:
    import yaml

    files = sorted(data_dir().glob("*.yml"))
    topics = tuple(f.stem for f in files)
    prompts, answers, labels, units, seen = [], [], [], [], set()
    for index, path in enumerate(files):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for number, conversation in enumerate(doc.get("conversations") or []):
            lines = [_text(s) for s in conversation if s is not None and _text(s)]
            for prompt, answer in itertools.pairwise(lines):
                if (prompt, answer) in seen:
                    continue
                seen.add((prompt, answer))
                prompts.append(prompt)
                answers.append(answer)
                labels.append(index)
                units.append(f"{path.stem}/{number}")
    groups = [topics[i] for i in labels]
    return TextDataset(prompts, labels, groups, topics, answers=answers, units=units, novel_answers=True)
