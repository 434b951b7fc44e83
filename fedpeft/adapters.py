"""Adapter injection (LoRA through PEFT, or a linear family of fedpeft.families), which tensors
train, get/set of the adapter state, export (PEFT's format for LoRA).

`AdaptedModel` owns one adapted classifier. The in-process executor reuses it for every
client: it loads the global `AdapterState`, trains, and reads the new tensors back.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fedpeft.classifier import label_name_rows
from fedpeft.config import ConfigError, ModelConfig
from fedpeft.data.base import TokenizedData
from fedpeft.families import FAMILIES, inject, load_family, save_family
from fedpeft.models import Tokenizer, build_model, model_entry, model_source
from fedpeft.state import (
    BASE,
    HEAD,
    LORA_A,
    LORA_B,
    THETA,
    AdapterState,
    adapted_layers,
    base_name,
    kind_of,
    theta_name,
)

__all__ = ["AdaptedModel", "load_exported", "logits_of", "EXPORT_META"]

ADAPTER_NAME = "default"
EXPORT_META = "fedpeft_model.json"  # how to rebuild the base model of an exported adapter
EXPORT_BASE = "fedpeft_base_delta.safetensors"  # base-weight changes (fedex, flora), if any


def resolve_device(name: str) -> torch.device:
    """ "auto" is CUDA when available, else the CPU; a CUDA device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"federation.device={name!r} but CUDA is not available; use auto or cpu")
    return device


def _normalise(peft_name: str, peft: bool = True) -> str | None:
    """Parameter name -> normalised adapter name, or None for frozen base weights. Without PEFT
    (a linear family) names are the classifier's own: `<layer>.theta.weight`, `head.*`."""
    if not peft:
        return peft_name if kind_of(peft_name) == THETA or peft_name.startswith("head.") else None
    name = peft_name.removeprefix("base_model.model.")
    if ".lora_A." in name or ".lora_B." in name:
        return name.replace(f".{ADAPTER_NAME}.", ".")
    if name.startswith("head.modules_to_save."):
        return name.replace(f"head.modules_to_save.{ADAPTER_NAME}.", "head.")
    return None


class AdaptedModel:
    """A classifier with adapters of the spec's family (`model.adapter`): LoRA injected by PEFT,
    the head a PEFT `modules_to_save`; or a linear family's layers put in place of the targets."""

    def __init__(self, cfg: ModelConfig, num_labels: int, seed: int, device: str = "cpu") -> None:
        self.device = resolve_device(device)
        self.cfg = cfg
        self.num_labels = num_labels
        self.seed = seed
        base, self.tokenizer = build_model(cfg.name, num_labels, cfg.layers, seed)
        entry = model_entry(cfg.name)
        self.causal = entry.task == "causal-lm"  # a causal LM (no head) or a classifier
        self.targets = cfg.targets or entry.default_targets
        self.family = FAMILIES.get(cfg.adapter)
        base = base.to(self.device)  # before the adapters: injected into a model then moved, Opacus keeps stale ones
        if self.family.linear:
            inject(base, cfg.adapter, tuple(self.targets), cfg.rank, cfg.alpha / cfg.rank, cfg.dropout, seed)
            self.module, self.classifier, prefix = base.to(self.device), base, ""
        else:
            self.module = self._peft(base, cfg, seed)
            self.classifier, prefix = self.module.base_model.model, "base_model.model."
        self._params: dict[str, nn.Parameter] = {}
        for peft_name, param in self.module.named_parameters():
            name = _normalise(peft_name, peft=not self.family.linear)
            if name is not None:
                self._params[name] = param
        if not any(kind_of(n) != HEAD for n in self._params):
            raise ValueError(f"no layer matched model.targets={list(self.targets)} in model {cfg.name!r}")
        # frozen base weights of the adapted layers, kept to apply base-weight changes exactly
        modules = dict(self.module.named_modules())
        self._base: dict[str, nn.Parameter] = {}
        self._w0: dict[str, torch.Tensor] = {}
        for layer in adapted_layers(list(self._params)):
            weight = modules[prefix + layer].base_layer.weight
            self._base[layer], self._w0[layer] = weight, weight.detach().clone()
        self._w0_norm = {layer: float(w0.double().norm()) for layer, w0 in self._w0.items()}  # for relative_change
        self._base_applied: set[str] = set()
        self.set_trainable(set())

    def _peft(self, base: nn.Module, cfg: ModelConfig, seed: int) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(self.targets),
            modules_to_save=None if self.causal else ["head"],
            task_type="CAUSAL_LM" if self.causal else None,
        )
        base.name_or_path = model_source(cfg.name)  # PEFT records it as base_model_name_or_path
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)  # the shared initial A (PEFT: kaiming-uniform; B = 0)
            with warnings.catch_warnings():  # transformers 5 deprecation that PEFT 0.21 triggers
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                try:
                    return get_peft_model(base, lora).to(self.device)
                except ValueError as exc:
                    if "not found in the base model" not in str(exc):
                        raise
        default = list(model_entry(cfg.name).default_targets)
        raise ConfigError(
            f"model.targets = {list(self.targets)} names no module of model {cfg.name!r}; its default is {default} "
            "(model.targets = [] picks it)"
        )

    # ---- adapter state --------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._params)

    def state(self) -> AdapterState:
        tensors = {n: p.detach().to("cpu", torch.float32).clone() for n, p in self._params.items()}
        return AdapterState(tensors, rank=self.cfg.rank, alpha=self.cfg.alpha, targets=tuple(self.targets))

    def load(self, state: AdapterState, rank: int | None = None) -> None:
        """Set every adapter tensor from `state`; BASE tensors set W0 + delta (absent: W0).
        With `rank`, keep only the first `rank` components of each LoRA (heterogeneous ranks)."""
        missing = set(self._params) - set(state.tensors)
        if missing:
            raise KeyError(f"adapter state lacks {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(state.tensors[name])
            for layer, weight in self._base.items():
                delta = state.tensors.get(base_name(layer))
                if delta is not None:
                    weight.copy_(self._w0[layer] + delta.to(weight.device))
                    self._base_applied.add(layer)
                elif layer in self._base_applied:
                    weight.copy_(self._w0[layer])
                    self._base_applied.discard(layer)
        if rank is not None:
            self.truncate_rank(rank)

    @torch.no_grad()
    def truncate_rank(self, rank: int) -> None:
        """Zero every LoRA component past `rank` (rows of A, columns of B)."""
        if self.family.linear:
            raise ValueError(f"heterogeneous ranks are LoRA's; model.adapter = {self.cfg.adapter!r} has none")
        if not 1 <= rank <= self.cfg.rank:
            raise ValueError(f"client rank must be in [1, {self.cfg.rank}] (got {rank})")
        for name, param in self._params.items():
            if kind_of(name) == LORA_A:
                param[rank:].zero_()
            elif kind_of(name) == LORA_B:
                param[:, rank:].zero_()

    def init_head(self, how: str, label_names: Sequence[str], public: TokenizedData | None = None) -> None:
        """Set the head before round 1 from public information (`model.head_init`): "random"
        keeps the seeded init; "label-names" takes `label_name_rows` (bias 0); "public" fits the
        L2-regularised logistic regression (L-BFGS, float64) of `public`'s labels on the base
        encoder's features. Both read the base model (every B is still 0), without dropout, and are
        deterministic for the same model and data."""
        if how == "random":
            return
        if self.causal:
            raise ValueError(f"model.head_init = {how!r} sets a classifier's head; a causal LM has none")
        if any(float(p.abs().max()) > 0 for n, p in self._params.items() if kind_of(n) in (LORA_B, THETA)):
            raise RuntimeError("the head is set from the base model: the adapter must still be zero")
        classifier = self.classifier
        training = self.module.training
        self.module.eval()
        try:
            if how == "label-names":
                weight = label_name_rows(classifier, self.tokenizer, tuple(label_names))
                bias = torch.zeros(self.num_labels)
            else:
                weight, bias = self._logistic_head(classifier, public)
        finally:
            self.module.train(training)
        with torch.no_grad():
            self._params["head.weight"].copy_(weight)
            self._params["head.bias"].copy_(bias)

    def _logistic_head(
        self, classifier: nn.Module, data: TokenizedData, l2: float = 1e-3, steps: int = 100
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            x = torch.cat([
                classifier.features(data.input_ids[i : i + 256].to(self.device),
                                    data.attention_mask[i : i + 256].to(self.device)).double().cpu()
                for i in range(0, len(data), 256)
            ])  # fmt: skip
        w = torch.zeros(self.num_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(self.num_labels, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def loss() -> torch.Tensor:
            optimizer.zero_grad()
            value = nn.functional.cross_entropy(x @ w.T + b, data.labels) + l2 * w.pow(2).sum()
            value.backward()
            return value

        with torch.enable_grad():
            optimizer.step(loss)
        return w.detach().float(), b.detach().float()

    @torch.no_grad()
    def relative_change(self, state: AdapterState) -> float:
        """How far `state` moves the adapted layers: the mean over layers of ||W - W0|| / ||W0||
        (Frobenius), W - W0 = s B A plus any base change; from the factors when there is none.
        For a linear family, s ||theta|| (L is an isometry)."""
        ratios = []
        for layer, w0_norm in self._w0_norm.items():
            if self.family.linear:
                ratios.append(state.scale * float(state.tensors[theta_name(layer)].double().norm()) / w0_norm)
                continue
            b, a = state.B(layer).double(), state.A(layer).double()
            delta = state.tensors.get(base_name(layer))
            if delta is None:  # ||s B A||^2 = s^2 tr((B^T B)(A A^T)), r x r
                change = state.scale * float(torch.trace((b.T @ b) @ (a @ a.T)).clamp_min(0).sqrt())
            else:
                change = float((delta.double() + state.scale * b @ a).norm())
            ratios.append(change / w0_norm)
        return sum(ratios) / len(ratios)

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self._params[n].detach().to("cpu", torch.float32).clone() for n in names}

    # ---- what trains ----------------------------------------------------------------------
    def set_trainable(self, kinds: set[str]) -> list[str]:
        """Freeze everything, then unfreeze adapter tensors of the given kinds (A, B, head)."""
        for param in self.module.parameters():
            param.requires_grad_(False)
        trained = []
        for name, param in self._params.items():
            if kind_of(name) in kinds:
                param.requires_grad_(True)
                trained.append(name)
        return trained

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self._params.values() if p.requires_grad]

    def trainable_named(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by their normalised (AdapterState) names."""
        return {n: p for n, p in self._params.items() if p.requires_grad}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: int) -> torch.Tensor:
        """Logits: [N, labels] of a classifier, [N, L, vocabulary] of a causal LM (`kwargs`: its
        `logits_to_keep`, fedpeft.causal.answer_window)."""
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        return logits_of(self.module(input_ids=ids, attention_mask=mask, **kwargs))

    # ---- export ---------------------------------------------------------------------------
    def export(self, state: AdapterState, directory: str | Path, label_names: Sequence[str] = ()) -> Path:
        """Write `state` in the PEFT format (adapter_config.json + adapter_model.safetensors), and
        EXPORT_META: how to rebuild the base model, and the names of the labels (for `predict`).
        A linear family writes the same two files in the layout of `families.save_family`.

        Strategies that change base weights (fedex, flora) also write EXPORT_BASE: the changes of
        W0, which `load_exported` applies before loading the adapter."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.load(state)
        with torch.no_grad():  # save the adapter over the original W0; base changes go separately
            for layer in self._base_applied:
                self._base[layer].copy_(self._w0[layer])
        if self.family.linear:
            config = {"r": self.cfg.rank, "alpha": self.cfg.alpha, "target_modules": list(self.targets)}
            save_family(self.module, directory, self.cfg.adapter, config)
        else:
            self.module.save_pretrained(str(directory), save_embedding_layers=False)
            (directory / "README.md").unlink(missing_ok=True)  # PEFT's generic model card
        deltas = {n: t.contiguous() for n, t in state.tensors.items() if kind_of(n) == BASE}
        if deltas:
            from safetensors.torch import save_file

            save_file(deltas, str(directory / EXPORT_BASE))
        self.load(state)
        meta = {
            "model": model_source(self.cfg.name),  # a directory as its absolute path: loads from any process
            "layers": self.cfg.layers,
            "num_labels": self.num_labels,
            "seed": self.seed,
            "adapter": self.cfg.adapter,
            "task": "causal-lm" if self.causal else "classify",
            "max_length": self.cfg.max_length,
            "label_names": list(label_names) or default_label_names(self.num_labels),
        }
        (directory / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
        return directory


def logits_of(output: torch.Tensor | object) -> torch.Tensor:
    """A model's logits: a classifier returns them, a Hugging Face causal LM an output with them."""
    return output if isinstance(output, torch.Tensor) else output.logits


def default_label_names(num_labels: int) -> list[str]:
    """Names for labels that have none (an export written before label names were recorded)."""
    return [f"label {i}" for i in range(num_labels)]


def load_exported(directory: str | Path) -> tuple[nn.Module, Tokenizer]:
    """Load an exported federated adapter: rebuild the offline base model, then
    `PeftModel.from_pretrained(base, directory)` (a linear family: `families.load_family`).
    Returns (model in eval mode, tokenizer)."""
    from peft import PeftModel
    from safetensors import SafetensorError

    directory = Path(directory)
    meta_path = directory / EXPORT_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} has no {EXPORT_META}; is it a fedpeft export?")
    try:
        meta = json.loads(meta_path.read_text())
        base, tokenizer = build_model(meta["model"], meta["num_labels"], meta["layers"], meta["seed"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta_path} is not a readable fedpeft export record ({exc!r})") from None
    try:
        if FAMILIES.get(meta.get("adapter", "lora")).linear:
            return load_family(base, directory, meta["seed"]).eval(), tokenizer
        if (directory / EXPORT_BASE).is_file():
            from safetensors.torch import load_file

            modules = dict(base.named_modules())
            with torch.no_grad():
                for name, delta in load_file(str(directory / EXPORT_BASE)).items():
                    modules[name.removesuffix(".base_delta")].weight.add_(delta)
        model = PeftModel.from_pretrained(base, str(directory))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # e.g. a torn or truncated weights file
        raise ValueError(f"the exported adapter in {directory} cannot be read ({exc}); re-export it") from None
    return model.eval(), tokenizer
