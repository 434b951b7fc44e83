"""Packaging: the declared Python range is one the dependencies can satisfy, and a Flower per-run
environment (dependencies installed by the SuperLink) is named with the setting that avoids it."""

from __future__ import annotations

import importlib.metadata as metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from fedpeft.flower.environment import runtime_install_warning

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# the Python minor versions a resolver considers for a project's range (uv splits on each)
PYTHONS = [Version(f"3.{minor}") for minor in range(8, 16)]


def _admitted(spec: str) -> list[Version]:
    return [v for v in PYTHONS if v in SpecifierSet(spec)]


def test_every_python_the_project_admits_is_admitted_by_each_installed_dependency():
    """A resolver that checks the whole declared range (uv, Flower's per-run `uv sync`) fails when
    one dependency refuses a Python the project admits, as flwr >= 1.41 refused 3.10."""
    ours = _admitted(PROJECT["requires-python"])
    assert ours, "requires-python admits no Python"
    refused = {}
    for line in PROJECT["dependencies"]:
        name = Requirement(line).name
        needs = metadata.metadata(name).get("Requires-Python") or ""
        if too_old := [str(v) for v in ours if v not in SpecifierSet(needs)]:
            refused[f"{name} {metadata.version(name)} (Requires-Python {needs})"] = too_old
    assert not refused, (
        f"requires-python {PROJECT['requires-python']} admits Pythons its dependencies refuse: {refused}"
    )


def test_the_readme_states_the_declared_python():
    lowest = min(_admitted(PROJECT["requires-python"]))
    assert f"Python {lowest}+" in (ROOT / "README.md").read_text()


def test_the_check_sees_a_range_that_is_too_wide():
    """The range check above is not vacuous: the range this project used to declare fails it."""
    flwr_needs = SpecifierSet(metadata.metadata("flwr").get("Requires-Python"))
    assert [v for v in _admitted(">=3.10") if v not in flwr_needs] == [Version("3.10")]


@pytest.mark.parametrize(
    ("venv", "torch_file", "warns"),
    [
        (None, None, False),  # no virtual environment at all
        ("/home/u/fedpeft/.venv", "/home/u/fedpeft/.venv/lib/python3.11/site-packages/torch/__init__.py", False),
        # Flower made a per-run environment, but torch still comes from the user's own environment
        ("/home/u/.flwr/runtime-envs/7", "/home/u/fedpeft/.venv/lib/python3.11/site-packages/torch/__init__.py", False),
        (
            "/home/u/.flwr/runtime-envs/7",
            "/home/u/.flwr/runtime-envs/7/lib/python3.11/site-packages/torch/__init__.py",
            True,
        ),
    ],
)
def test_a_per_run_flower_environment_is_named_with_the_setting(monkeypatch, venv, torch_file, warns):
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    if venv is not None:
        monkeypatch.setenv("VIRTUAL_ENV", venv)
    warning = runtime_install_warning(torch_file=torch_file)
    assert (warning is not None) == warns
    if warns:
        assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in warning and venv in warning
