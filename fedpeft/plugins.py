"""User code that registers models, datasets and strategies, loaded by name before a spec is read.

A plugin is a module (`my_pkg.fedpeft_ext`) or a Python file (`./my_strategy.py`) that registers
on import: `fedpeft.models.MODELS.register(name)(ModelEntry(...))`, `fedpeft.data.DATASETS.register(
name)(loader)`, or `register_strategy(name, ...)` below (a strategy also needs what the catalog knows
of it). Who names plugins, so that every process that builds the spec has them:

- `fedpeft simulate | sweep | audit | predict | list --plugin MODULE_OR_FILE` (repeatable);
- the ServerApp: the run-config key `plugins` (comma-separated), e.g. `--run-config 'plugins="my_ext"'`;
- a SuperNode: its node-config key `plugins` (a node imports only what its operator names, never
  what a server asks for);
- `FEDPEFT_PLUGINS` in the environment (comma-separated), for every process of one machine, and
  packages installed with an entry point in the group `fedpeft.plugins` (installing is consent).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TypeVar

from fedpeft.config import ConfigError

__all__ = ["PLUGINS", "load_plugins", "register_strategy"]

PLUGINS = "plugins"  # the run-config and node-config key
ENTRY_POINTS = "fedpeft.plugins"
T = TypeVar("T")
_loaded: set[str] = set()  # the plugins named so far, imported once each
_entry_points_loaded = False


def load_plugins(names: Iterable[str] | str = ()) -> None:
    """Import each named plugin once (a comma-separated string is split), then those of
    FEDPEFT_PLUGINS and the installed entry points; a ConfigError names one that fails."""
    if isinstance(names, str):
        names = [n for n in (part.strip() for part in names.split(",")) if n]
    env = [n.strip() for n in os.environ.get("FEDPEFT_PLUGINS", "").split(",") if n.strip()]
    for name in [*names, *env]:
        if name not in _loaded:
            _import(name)
            _loaded.add(name)
    global _entry_points_loaded
    if not _entry_points_loaded:  # scanned once per process: a node calls this for every message
        _entry_points_loaded = True
        for point in entry_points(group=ENTRY_POINTS):
            point.load()


def _import(name: str) -> None:
    try:
        if name.endswith(".py"):
            path = Path(name).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"plugin file {name!r} does not exist")
            module_name = f"fedpeft_plugin_{path.stem}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[module_name] = module
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            importlib.import_module(name)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: any error is one line naming the plugin
        raise ConfigError(f"plugin {name!r} failed to load: {type(exc).__name__}: {exc}") from None


def register_strategy(name: str, *, any_family: bool = False, sum_only: bool = False) -> Callable[[T], T]:
    """Register a strategy class (a `fedpeft.strategies.Strategy`) under `name`, with what the catalog
    knows of it: `any_family` (its server step treats every upload alike: right for the linear adapter
    families) and `sum_only` (it needs only the weighted sum of the uploads: SecAgg+ and client-level
    DP may run it)."""
    from fedpeft.catalog import STRATEGY_INFO, StrategyInfo
    from fedpeft.strategies import STRATEGIES

    def decorator(cls: T) -> T:
        if name in STRATEGY_INFO:
            raise ConfigError(f"strategy {name!r} is registered already")
        STRATEGY_INFO[name] = StrategyInfo(any_family=any_family, sum_only=sum_only)
        return STRATEGIES.register(name)(cls)

    return decorator
