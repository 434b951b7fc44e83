"""Tokenizers behind the small protocol fedpeft needs: a Hugging Face tokenizer's wrapper, and a
dependency-free hashing tokenizer for tiny test models."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

__all__ = ["HFTokenizer", "HashTokenizer", "Tokenizer"]


class Tokenizer(Protocol):
    """What fedpeft needs of a tokenizer (`encode_batch`), and what a user calls after training:
    `tok(text_or_texts, padding=..., truncation=..., max_length=..., return_tensors=None | "pt")`,
    answering a dict with input_ids and attention_mask, as a Hugging Face tokenizer does."""

    def encode_batch(
        self, texts: list[str], max_length: int, pairs: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (input_ids, attention_mask), both [N, max_length] int64, right-padded; with `pairs`,
        each row encodes (texts[i], pairs[i]) as the model's sentence pair."""

    def __call__(self, text: str | list[str], **kwargs: Any) -> Mapping[str, Any]: ...


class HFTokenizer:
    """A Hugging Face tokenizer behind the small `Tokenizer` protocol."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - any PreTrainedTokenizerBase
        self._tok = tokenizer

    def encode_batch(
        self, texts: list[str], max_length: int, pairs: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._tok(texts, pairs, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def __call__(self, text: str | list[str], **kwargs: Any) -> Mapping[str, Any]:
        return self._tok(text, **kwargs)

    def __getattr__(self, name: str) -> Any:  # decode, vocab_size, ...: the Hugging Face tokenizer's
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._tok, name)


class HashTokenizer:
    """Dependency-free word tokenizer for tiny test models: lower-cased words hashed into buckets.

    Ids: 0 = pad, 1 = [CLS], 2 = [SEP], 3.. = hashed words (crc32, so stable across processes).
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 8:
            raise ValueError("HashTokenizer needs vocab_size >= 8")
        self.vocab_size = vocab_size

    def _word_id(self, word: str) -> int:
        return 3 + zlib.crc32(word.encode()) % (self.vocab_size - 3)

    pad_token_id = 0
    model_max_length = 512

    def _row(self, text: str, max_length: int | None) -> list[int]:
        words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
        ids = [self._word_id(w) for w in words]
        if max_length is not None:
            ids = ids[: max(max_length - 2, 0)]
        return [1, *ids, 2]

    def encode_batch(
        self, texts: list[str], max_length: int, pairs: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [CLS] words [SEP] (a pair: [CLS] first [SEP] second [SEP], each cut to half the room)."""
        import torch

        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            row = self._row(text, max_length)
            if pairs is not None:
                half = max(max_length // 2, 2)
                row = self._row(text, half) + self._row(pairs[i], max_length - half)[1:]
            ids[i, : len(row)] = torch.tensor(row)
        return ids, (ids != 0).long()

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """Hugging Face's call: padding False, True/"longest" or "max_length"; return_tensors None
        (lists) or "pt" (which needs rows of one length, as Hugging Face's does)."""
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding={padding!r}: use False, True, 'longest' or 'max_length'")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}: this tokenizer returns lists or 'pt' tensors")
        texts = [text] if isinstance(text, str) else list(text)
        limit = (max_length or self.model_max_length) if truncation else None
        rows = [self._row(t, limit) for t in texts]
        width = (max_length or self.model_max_length) if padding == "max_length" else max(map(len, rows), default=0)
        if padding in (True, "longest", "max_length"):
            rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        masks = [[int(i != self.pad_token_id) for i in r] for r in rows]
        if return_tensors == "pt":
            import torch

            if len({len(r) for r in rows}) > 1:
                raise ValueError("rows of different lengths cannot be one tensor: pass padding=True")
            return {"input_ids": torch.tensor(rows, dtype=torch.long), "attention_mask": torch.tensor(masks)}
        if isinstance(text, str):
            return {"input_ids": rows[0], "attention_mask": masks[0]}
        return {"input_ids": rows, "attention_mask": masks}
