"""Shared by the slow tests of Flower's runtimes (tests/test_flower_simulation.py and
tests/test_flower_deployment.py, separate files so that pytest-xdist runs them side by side), and
`load_script`, which imports one of scripts/ for the tests of its functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from fedpeft.federation import Federation
from tests.conftest import tiny_spec

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runtime_spec(**overrides):  # noqa: ANN003, ANN202
    return tiny_spec(
        **{"federation__rounds": 2, "federation__clients": 3, "federation__clients_per_round": 3, **overrides}
    )


def adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def assert_same_adapter(out: Path, reference: Path) -> None:
    mine, ref = adapter(out), adapter(reference)
    assert set(mine) == set(ref)
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], atol=1e-5, rtol=0, msg=name)


def run_in_process(spec, out: Path):  # noqa: ANN001, ANN202
    return Federation.build(spec).run(out)


# SecAgg+ through Flower's runtimes: the plain run within quantisation
SECAGG_TOLERANCE = 2 * 20 * 2 * 8.0 / 2**22  # 2 rounds of a few SecAgg+ quantisation levels


def assert_close_adapter(out: Path, reference: Path, atol: float) -> None:
    mine, ref = adapter(out), adapter(reference)
    assert set(mine) == set(ref)
    assert max(float((mine[n] - ref[n]).abs().max()) for n in ref) < atol
