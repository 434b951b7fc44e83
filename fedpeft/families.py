"""Adapter families: how the weight change of an adapted layer is parameterised.

`lora` (PEFT's LoRA, the default) trains two factors, delta W = s B A, whose separate averages are
not the average of their products; every federated-LoRA strategy exists because of that. The
other families train a tensor theta that enters the weight change linearly,

    delta W = s L(theta),    s = model.alpha / model.rank,

with L fixed (a function of the public base weights or a public seed), so the weighted mean of the
clients' thetas gives exactly the weighted mean of their weight changes. L is moreover an isometry
(||L(theta)||_F = ||theta||): DP-SGD's clipping and noise on theta are clipping and noise of the
same size on delta W, and one learning rate is the same step size in delta W for every family.

- `svd`: delta W = U_r diag(theta) V_r^T on the top-r singular vectors of W0 (singular-value
  adaptation as in SVFit and SALT's singular-value part); theta has r entries.
- `core`: delta W = U_r R V_r^T with a trained r x r core R between frozen frames (the LoRA-XS /
  LoRA-SB / Fed-SB shape; here the frames are W0's top singular vectors, public); r^2 entries.
- `paca`: delta W[:, J] = P for a fixed random set J of r input columns of W0 (Partial Connection
  Adaptation, PaCA): the trained columns themselves; P has d_out x r entries.

Frames are computed on the CPU in float64 (signs fixed: each left singular vector's largest entry
positive), so every node computes the same ones; an export stores them, so a reload is exact.
PEFT has none of these three, so they are written here (`FamilyLinear`); each trains a submodule
named `theta` whose per-example gradients Opacus computes (nn.Linear, or `Diagonal` below).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.catalog import FAMILY_INFO
from fedpeft.registry import Registry
from fedpeft.state import LORA_A, LORA_B, THETA

__all__ = ["AdapterFamily", "FAMILIES", "FamilyLinear", "Diagonal", "inject", "replace_linear"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterFamily:
    """One way to adapt a linear layer: what trains, how many entries per layer, and (except
    LoRA, which PEFT injects) the layer that implements it."""

    name: str
    trains: frozenset[str]  # the tensor kinds the adapter trains (state.LORA_A / LORA_B / THETA)
    size: Callable[[int, int, int], int]  # (d_out, d_in, rank) -> trained entries per layer
    layer: type[FamilyLinear] | None = None  # None: PEFT's LoRA

    @property
    def summary(self) -> str:
        return FAMILY_INFO[self.name].summary

    @property
    def linear(self) -> bool:
        """delta W is linear in what trains: plain averaging of the uploads is exact."""
        return self.layer is not None


FAMILIES: Registry[AdapterFamily] = Registry("adapter family", FAMILY_INFO)


class Diagonal(nn.Module):
    """y = h * weight (elementwise over the last dimension); weight starts at zero."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.weight


def _diagonal_grad_sample(layer: Diagonal, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Opacus grad sampler of `Diagonal`: per example, sum over positions of h * dL/dy."""
    h = activations[0].to(backprops.dtype)
    return {layer.weight: torch.einsum("n...i,n...i->ni", backprops, h)} if layer.weight.requires_grad else {}


def _register_opacus() -> None:
    from opacus.grad_sample.utils import register_grad_sampler

    register_grad_sampler(Diagonal)(_diagonal_grad_sample)


def top_singular_frames(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U_r [d_out, r] and V_r [d_in, r] of W0 = U S V^T, in float64 on the CPU, each pair's sign
    fixed so that the largest-magnitude entry of u_i is positive."""
    w = weight.detach().to("cpu", torch.float64)
    if rank > min(w.shape):
        raise ValueError(f"model.rank={rank} exceeds the smaller dimension {min(w.shape)} of a {tuple(w.shape)} weight")
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    u, v = u[:, :rank], vh[:rank].T
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    return (u * sign).float(), (v * sign).float()


class FamilyLinear(nn.Module):
    """A frozen nn.Linear `base_layer` plus s L(theta) x. Subclasses build `theta` and the frozen
    buffers of L in `setup`, and define `adapter(x)` = L(theta) x, `delta()` = L(theta), and
    `batched(x, thetas)`: example i's L(thetas[i]) x[i] (the cohort executor's per-example thetas)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float, seed: int) -> None:
        super().__init__()
        self.base_layer = base
        self.rank, self.scale, self.dropout = rank, scale, dropout
        self.setup(base.weight, seed)

    def setup(self, weight: torch.Tensor, seed: int) -> None:
        raise NotImplementedError

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    def batched(self, x: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * self.adapter(F.dropout(x, self.dropout, self.training))


class FramedLinear(FamilyLinear):
    """A family acting between W0's top-r singular frames: delta W = U_r M(theta) V_r^T, with
    theta (`new_theta`) mapping the r frame coordinates of x to r."""

    def new_theta(self) -> nn.Module:
        raise NotImplementedError

    def setup(self, weight: torch.Tensor, seed: int) -> None:
        u, v = top_singular_frames(weight, self.rank)
        self.register_buffer("u", u.to(weight.device))
        self.register_buffer("v", v.to(weight.device))
        self.theta = self.new_theta().to(weight.device)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta(x @ self.v) @ self.u.T


class SVDLinear(FramedLinear):
    def new_theta(self) -> nn.Module:
        return Diagonal(self.rank)

    def delta(self) -> torch.Tensor:
        return (self.u * self.theta.weight) @ self.v.T

    def batched(self, x: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:  # thetas [N, r]
        return ((x @ self.v) * thetas[:, None, :]) @ self.u.T


class CoreLinear(FramedLinear):
    def new_theta(self) -> nn.Module:
        core = nn.Linear(self.rank, self.rank, bias=False)
        nn.init.zeros_(core.weight)
        return core

    def delta(self) -> torch.Tensor:
        return self.u @ self.theta.weight @ self.v.T

    def batched(self, x: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:  # thetas [N, r, r]
        return torch.einsum("nli,noi->nlo", x @ self.v, thetas) @ self.u.T


class PaCALinear(FamilyLinear):
    def setup(self, weight: torch.Tensor, seed: int) -> None:
        d_out, d_in = weight.shape
        if self.rank > d_in:
            raise ValueError(f"model.rank={self.rank} exceeds the {d_in} input columns of a layer")
        columns = torch.randperm(d_in, generator=torch.Generator().manual_seed(seed))[: self.rank].sort().values
        self.register_buffer("columns", columns.to(weight.device))
        self.theta = nn.Linear(self.rank, d_out, bias=False).to(weight.device)
        nn.init.zeros_(self.theta.weight)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta(x.index_select(-1, self.columns))

    def delta(self) -> torch.Tensor:
        out = self.theta.weight.new_zeros(self.base_layer.weight.shape)
        out[:, self.columns] = self.theta.weight
        return out

    def batched(self, x: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:  # thetas [N, d_out, r]
        return torch.einsum("nli,noi->nlo", x.index_select(-1, self.columns), thetas)


FAMILIES.register("lora")(
    AdapterFamily("lora", frozenset({LORA_A, LORA_B}),
                  lambda d_out, d_in, r: r * (d_in + d_out))
)  # fmt: skip
FAMILIES.register("svd")(
    AdapterFamily("svd", frozenset({THETA}), lambda d_out, d_in, r: r, SVDLinear)
)  # fmt: skip
FAMILIES.register("core")(
    AdapterFamily("core", frozenset({THETA}), lambda d_out, d_in, r: r * r, CoreLinear)
)  # fmt: skip
FAMILIES.register("paca")(
    AdapterFamily("paca", frozenset({THETA}), lambda d_out, d_in, r: r * d_out, PaCALinear)
)  # fmt: skip


def replace_linear(model: nn.Module, targets: tuple[str, ...], make: Callable[[str, nn.Linear], nn.Module]) -> dict:
    """Replace every nn.Linear named in `targets` (outside the head) by `make(full_name, layer)`;
    returns {full name: new module}, in module order."""
    replaced = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and child_name in targets and not full.startswith("head"):
                replaced[full] = make(full, child)
                setattr(module, child_name, replaced[full])
    return replaced


def inject(
    model: nn.Module,
    family: str,
    targets: tuple[str, ...],
    rank: int,
    scale: float,
    dropout: float,
    seed: int,
    wrap: Callable[[FamilyLinear], nn.Module] | None = None,
) -> dict[str, nn.Module]:
    """Put a linear family's layer (or `wrap` of it) in place of each target; layer i's public
    seed is seed + 1 + i (PaCA's columns). The frozen base weights stay as they were."""
    klass = FAMILIES.get(family).layer
    if klass is None:
        raise ValueError("inject builds the linear families; LoRA is injected by PEFT")
    _register_opacus()
    index = itertools.count()

    def make(_: str, child: nn.Linear) -> nn.Module:
        layer = klass(child, rank, scale, dropout, seed + 1 + next(index))
        return wrap(layer) if wrap is not None else layer

    return replace_linear(model, targets, make)


# ---- export: a documented safetensors layout (PEFT has no such adapter types) -------------------
def save_family(model: nn.Module, directory: Path, family: str, config: dict) -> None:
    """WEIGHTS_FILE: every adapter tensor and frozen frame under its module name (`<layer>.theta.weight`,
    `<layer>.u`, `<layer>.v`, `<layer>.columns`) plus the head (`head.weight`, `head.bias`);
    CONFIG_FILE: {"fedpeft_adapter": family, "r", "alpha", "dropout", "target_modules"}."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in _exported(model).items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps({"fedpeft_adapter": family, **config}, indent=2) + "\n")


def load_family(base: nn.Module, directory: Path, seed: int) -> nn.Module:
    """The inverse of `save_family` on a rebuilt base: inject the family, then load every tensor
    (the stored frames replace the recomputed ones, so the loaded model is exactly the exported one)."""
    from safetensors.torch import load_file

    config = json.loads((directory / CONFIG_FILE).read_text())
    family = config["fedpeft_adapter"]
    inject(base, family, tuple(config["target_modules"]), config["r"], config["alpha"] / config["r"], 0.0, seed)
    state = load_file(str(directory / WEIGHTS_FILE))
    expected = set(_exported(base))
    if set(state) != expected:
        wrong = sorted(set(state) ^ expected)[:3]
        raise ValueError(f"{directory / WEIGHTS_FILE} does not match a {family} adapter on this base: {wrong}")
    base.load_state_dict(state, strict=False)
    return base


def _exported(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an export holds: each family layer's frames and theta, and the head."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, FamilyLinear):
            for key, value in [*module.named_buffers(recurse=False), *module.theta.named_parameters(prefix="theta")]:
                tensors[f"{name}.{key}"] = value
    tensors.update({f"head.{k}": v for k, v in model.head.named_parameters()})
    return tensors
