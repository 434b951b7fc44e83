"""Plain data exchanged between clients, strategies and the round loop (torch only, no Flower).

Parameter names are normalised PEFT names without the ``base_model.model.`` prefix and the adapter
name, e.g. ``encoder.encoder.layer.0.attention.self.query.lora_A.weight`` or ``head.weight``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch

__all__ = [
    "AdapterState", "ClientUpdate", "LORA_A", "LORA_B", "HEAD", "BASE", "THETA",
    "lora_layers", "adapted_layers", "kind_of", "a_name", "b_name", "base_name", "theta_name",
]  # fmt: skip

# What a parameter is, as strategies see it. Defined once; used in upload declarations.
LORA_A = "A"
LORA_B = "B"
HEAD = "head"
BASE = "base"  # cumulative change of a frozen base weight (FedEx-LoRA, FLoRA), dense d_out x d_in
THETA = "theta"  # what a linear adapter family trains (fedpeft.families): delta W = s L(theta), L linear


_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
_THETA_SUFFIX = ".theta.weight"


def a_name(layer: str) -> str:
    """Name of the LoRA factor A (r x d_in) of an adapted layer."""
    return layer + _A_SUFFIX


def b_name(layer: str) -> str:
    """Name of the LoRA factor B (d_out x r) of an adapted layer."""
    return layer + _B_SUFFIX


def theta_name(layer: str) -> str:
    """Name of what a linear adapter family trains in an adapted layer."""
    return layer + _THETA_SUFFIX


def kind_of(name: str) -> str:
    """Kind of a normalised parameter name: A, B, theta, head or base."""
    if name.endswith(_A_SUFFIX):
        return LORA_A
    if name.endswith(_B_SUFFIX):
        return LORA_B
    if name.endswith(_THETA_SUFFIX):
        return THETA
    if name.endswith(".base_delta"):
        return BASE
    return HEAD


def base_name(layer: str) -> str:
    """Name of the base-weight change of an adapted layer."""
    return f"{layer}.base_delta"


def lora_layers(names: Iterator[str] | list[str]) -> list[str]:
    """Prefixes of the adapted layers (``...query``), in order, each having an A and a B."""
    return [n[: -len(_A_SUFFIX)] for n in names if n.endswith(_A_SUFFIX)]


def adapted_layers(names: Iterator[str] | list[str]) -> list[str]:
    """Prefixes of the adapted layers of any adapter family (LoRA's A, or a family's theta), in order."""
    names = list(names)
    return lora_layers(names) + [n[: -len(_THETA_SUFFIX)] for n in names if n.endswith(_THETA_SUFFIX)]


@dataclass(frozen=True)
class AdapterState:
    """The global adapter: every LoRA factor and trained head tensor, plus its LoRA hyper-parameters.

    Tensors are float32 on the CPU. Instances are treated as immutable: strategies build new ones.
    """

    tensors: Mapping[str, torch.Tensor]
    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def layers(self) -> list[str]:
        return lora_layers(list(self.tensors))

    @property
    def scale(self) -> float:
        """LoRA scale s = alpha / r: the layer computes W0 x + s B A x."""
        return self.alpha / self.rank

    def A(self, layer: str) -> torch.Tensor:  # noqa: N802 - the paper's name
        return self.tensors[a_name(layer)]

    def B(self, layer: str) -> torch.Tensor:  # noqa: N802
        return self.tensors[b_name(layer)]

    def with_tensors(self, updates: Mapping[str, torch.Tensor], new: bool = False) -> AdapterState:
        """A copy with some tensors replaced; keys must already exist unless `new` allows adding."""
        unknown = set(updates) - set(self.tensors)
        if unknown and not new:
            raise KeyError(f"unknown adapter tensors: {sorted(unknown)[:3]}")
        merged = {k: updates.get(k, v) for k, v in self.tensors.items()}
        merged.update({k: updates[k] for k in updates if k not in merged})
        return replace(self, tensors=merged)

    def clone(self) -> AdapterState:
        return replace(self, tensors={k: v.detach().clone() for k, v in self.tensors.items()})

    def num_bytes(self, names: list[str] | None = None) -> int:
        names = list(self.tensors) if names is None else names
        return sum(self.tensors[n].numel() * self.tensors[n].element_size() for n in names)


@dataclass
class ClientUpdate:
    """What one client sends back after a round of local training."""

    client_id: int
    num_examples: int
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    rank: int | None = None  # the client's own LoRA rank when ranks differ (factors are zero-padded)
