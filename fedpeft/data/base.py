"""Datasets as plain texts + labels (+ natural group ids), tokenised once into tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: `fedpeft list` and input errors stay fast
    import torch

__all__ = ["TextDataset", "TokenizedData", "FederatedData"]


@dataclass(frozen=True)
class TextDataset:
    """Raw examples. `groups` is a natural id per example (a movie, a topic) for natural splits.
    An instruction dataset (for a causal LM) also has `answers`: `texts` are then the prompts, and
    `labels` index `label_names` by topic (what the partitioners split by), not a prediction."""

    texts: list[str]
    labels: list[int]
    groups: list[str]
    label_names: tuple[str, ...]
    answers: list[str] | None = None
    # the unit the server's held-out splits are drawn by, whole (a conversation); None: each row its own
    units: list[str] | None = None
    # instruction data: a held-out pair whose answer is verbatim a prompt or answer of the training side is dropped
    novel_answers: bool = False
    pairs: list[str] | None = None  # each text's second text (sentence pairs), given to the tokenizer as a pair
    test_rows: tuple[int, ...] | None = None  # the dataset's own test split (None: held out from one pool)

    def __post_init__(self) -> None:
        if not (len(self.texts) == len(self.labels) == len(self.groups)):
            raise ValueError("texts, labels and groups must have the same length")
        if self.answers is not None and len(self.answers) != len(self.texts):
            raise ValueError("an instruction dataset needs one answer per prompt")
        if self.units is not None and len(self.units) != len(self.texts):
            raise ValueError("units must give one holdout unit per example")
        if self.pairs is not None and len(self.pairs) != len(self.texts):
            raise ValueError("sentence pairs need one second text per text")


@dataclass(frozen=True)
class TokenizedData:
    """Tokenised examples: input_ids and attention_mask [N, L] (right-padded), labels [N]; for a
    causal LM labels are the shifted answer-token targets [N, L] (fedpeft.causal)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: torch.Tensor) -> TokenizedData:
        return TokenizedData(self.input_ids[index], self.attention_mask[index], self.labels[index])

    def sample(self, n: int, seed: int) -> TokenizedData:
        """`n` rows drawn without replacement by `seed`, in their original order (all when n >= len)."""
        import torch

        if n >= len(self):
            return self
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return self.select(index.sort().values)

    @property
    def is_sequence(self) -> bool:
        """Targets per token (a causal LM's), not one label per example."""
        return self.labels.dim() == 2

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows `index`, with trailing all-padding columns trimmed (exact under mean pooling and
        under a causal mask)."""
        mask = self.attention_mask[index]
        width = max(int(mask.sum(1).max()) if len(index) else 1, 1)
        labels = self.labels[index, :width] if self.is_sequence else self.labels[index]
        return self.input_ids[index, :width], mask[:, :width], labels


@dataclass(frozen=True)
class FederatedData:
    """What a federation runs on: one tokenised partition per client, a server-side test split."""

    clients: list[TokenizedData]
    test: TokenizedData
    label_names: tuple[str, ...]
    public: TokenizedData | None = None  # data.public_size examples on the server, no client's
    test_pairs: tuple[tuple[str, str], ...] = ()  # instruction data: the test split's (prompt, answer)s
    client_rows: tuple[tuple[int, ...], ...] = ()  # each client's row ids in the loaded dataset (lifetime keys)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def majority_rate(self) -> float | None:
        """Accuracy of always predicting the test split's most common label (None for a causal LM)."""
        if self.test.is_sequence:
            return None
        import torch

        counts = torch.bincount(self.test.labels, minlength=self.num_labels)
        return float(counts.max()) / max(len(self.test), 1)
