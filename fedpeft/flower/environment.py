"""Is this app running in a per-run environment that Flower's SuperLink/SuperNode installed?

Unless it is told not to, Flower installs an app's `[project].dependencies` with `uv sync` into a
fresh environment for every run (under FLWR_HOME/runtime-envs/) and puts it first on `sys.path`.
For fedpeft that means a second torch per run, by default PyPI's CUDA build on Linux (several GB),
shadowing the torch the user set up. Where that happened the apps say so once, naming the setting.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["RUNTIME_INSTALL_HINT", "runtime_install_warning"]

RUNTIME_INSTALL_HINT = (
    "start the SuperLink and every SuperNode with FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 "
    "(or flower-superlink/flower-supernode --disable-runtime-dependency-installation) from the "
    "environment that `bash scripts/setup.sh` made, so runs use its packages"
)


def runtime_install_warning(virtual_env: str | None = None, torch_file: str | None = None) -> str | None:
    """A one-line warning when torch was imported from a Flower per-run environment, else None.
    Defaults: $VIRTUAL_ENV and the imported torch's file."""
    virtual_env = os.environ.get("VIRTUAL_ENV") if virtual_env is None else virtual_env
    if not virtual_env or "runtime-envs" not in Path(virtual_env).parts:
        return None
    if torch_file is None:
        import torch

        torch_file = torch.__file__
    if not Path(torch_file).resolve().is_relative_to(Path(virtual_env).resolve()):
        return None  # the per-run environment added nothing that matters: torch is the user's own
    return f"this run's torch was installed by Flower into {virtual_env} for this run alone; " + RUNTIME_INSTALL_HINT
