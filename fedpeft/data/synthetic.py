"""A small synthetic sentiment task for tests: learnable in a few steps by a tiny model.

Each text mixes neutral filler with a few words from its label's vocabulary; groups are topics
(a topic word shared by the group) so natural partitions exist.
"""

from __future__ import annotations

import random

from fedpeft.data.base import TextDataset

POSITIVE = ("good", "great", "superb", "lovely", "brilliant", "fun", "moving", "smart")
NEGATIVE = ("bad", "dull", "awful", "boring", "weak", "messy", "tedious", "bland")
FILLER = ("the", "film", "story", "cast", "plot", "scene", "movie", "score", "script", "ending")


def load(size: int = 2000, topics: int = 24, seed: int = 1234) -> TextDataset:
    rng = random.Random(seed)
    texts, labels, groups = [], [], []
    for _ in range(size):
        label = rng.random() < 0.55  # mildly imbalanced, like real review data
        topic = rng.randrange(topics)
        words = [f"topic{topic}"] + rng.choices(FILLER, k=rng.randint(3, 8))
        words += rng.choices(POSITIVE if label else NEGATIVE, k=rng.randint(1, 3))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(int(label))
        groups.append(f"topic{topic}")
    return TextDataset(texts, labels, groups, ("negative", "positive"))


COLOURS = ("red", "blue", "green", "yellow", "black", "white")
THINGS = ("apple", "sky", "leaf", "sun", "night", "snow", "car", "door", "cup", "bird", "fish", "hat")


def load_qa(size: int = 600, seed: int = 1234) -> TextDataset:
    """Instruction pairs for tiny causal LMs: "what colour is the <thing>?" -> "the <thing> is
    <colour>." with a fixed colour per thing, so a model can learn the answers; topics are the things.
    A test fixture, not data: its 12 answers repeat by design, so it keeps the split by row (a split
    by conversation or without repeated answers, as ChatterBot's, would leave nothing to learn)."""
    rng = random.Random(seed)
    colour = {thing: COLOURS[i % len(COLOURS)] for i, thing in enumerate(THINGS)}
    prompts, answers, labels = [], [], []
    for _ in range(size):
        index = rng.randrange(len(THINGS))
        thing = THINGS[index]
        prompts.append(f"what colour is the {thing}?")
        answers.append(f"the {thing} is {colour[thing]}.")
        labels.append(index)
    return TextDataset(prompts, labels, [THINGS[i] for i in labels], THINGS, answers=answers)
