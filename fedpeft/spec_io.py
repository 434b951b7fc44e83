"""Reading and writing specs: TOML files, ``--set KEY=VALUE`` overrides, Flower's run-config.

Every value is coerced to the type of its field's default (one small function per type) and
then checked by the dataclass itself (fedpeft.config), so each error names the key to change.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import zlib
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from fedpeft.config import SECTIONS, ConfigError, Spec, StrategyConfig

__all__ = [
    "APP_KEYS", "DEFAULT_SPEC", "default_spec", "default_spec_path", "load_spec", "named_for_changes", "parse_overrides",
    "resolve_spec", "spec_diff", "spec_from_dict", "spec_from_run_config", "spec_to_flat", "spec_with_flat",
    "to_run_config",
]  # fmt: skip

DEFAULT_SPEC = "quickstart.toml"
# Keys of Flower's run-config that belong to the app, not to the spec.
APP_KEYS = ("spec", "out", "resume", "allow-unbound", "plugins")


# -- coercion: one function per field type -----------------------------------------------------
def _as_bool(where: str, value: Any, item: type) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false (got {value!r})")
    return value


def _as_int(where: str, value: Any, item: type) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer (got {value!r})")
    return value


def _as_float(where: str, value: Any, item: type) -> float:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number (got {value!r})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number (got {value!r})")
    return float(value)


def _as_str(where: str, value: Any, item: type) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string (got {value!r})")
    return value


def _as_tuple(where: str, value: Any, item: type) -> tuple:
    """A list of `item`s, from a list, a comma-joined string (flat form) or a single number."""
    numeric = item in (int, float)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    elif numeric and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list of {item.__name__}s (got {value!r})")
    if numeric:  # "3" -> 3; 6 -> 6.0; "inf" (strict JSON) -> inf; never 3.5 -> 3
        convertible = (int, str) if item is float else (str,)
        try:
            value = [item(v) if isinstance(v, convertible) and not isinstance(v, bool) else v for v in value]
        except ValueError:
            raise ConfigError(f"{where} must be a list of {item.__name__}s (got {value!r})") from None
    if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where} must be a list of {item.__name__}s (got {value!r})")
    return tuple(value)


# bool before int: a bool default is an int too
_COERCE: tuple[tuple[type, Callable[[str, Any, type], Any]], ...] = (
    (bool, _as_bool), (int, _as_int), (float, _as_float), (tuple, _as_tuple), (str, _as_str),
)  # fmt: skip


def _coerce(where: str, value: Any, default: Any, item: type = str) -> Any:
    for kind, coerce in _COERCE:
        if isinstance(default, kind):
            return coerce(where, value, item)
    return value


def _build_section(section: str, klass: type, table: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(klass)}
    defaults = klass()
    if klass is StrategyConfig:  # name plus the strategy's own options
        name = _coerce(f"{section}.name", table.get("name", defaults.name), defaults.name)
        return StrategyConfig(name=name, options=tuple(sorted((k, v) for k, v in table.items() if k != "name")))
    unknown = set(table) - set(fields)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(f'{section}.{k}' for k in unknown)}; "
            f"valid keys of [{section}]: {', '.join(fields)}"
        )
    return klass(
        **{
            k: _coerce(f"{section}.{k}", v, getattr(defaults, k), fields[k].metadata.get("item", str))
            for k, v in table.items()
        }
    )


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    """A validated spec from its nested form (a TOML file's tables, or `Spec.to_dict()`)."""
    unknown = set(data) - set(SECTIONS) - {"name"}
    if unknown:
        raise ConfigError(f"unknown spec section(s) {sorted(unknown)}; valid: name, {', '.join(SECTIONS)}")
    name = str(data.get("name", Spec.name))
    if not re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}", name):
        raise ConfigError(
            f"name {name!r} must be 1-128 letters, digits or . _ + - (not starting with .): it names the run's "
            "directory, which must stay inside runs/"
        )
    kwargs: dict[str, Any] = {"name": name}
    for section, klass in SECTIONS.items():
        table = data.get(section, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"[{section}] must be a table, got {type(table).__name__}")
        kwargs[section] = _build_section(section, klass, table)
    return Spec(**kwargs)


# -- files and overrides -------------------------------------------------------------------------
def spec_diff(old: Spec, new: Spec, what: str = "run") -> str:
    """The keys where two specs differ, as `key: run has X, now Y`; empty when equal."""
    before, after = old.to_flat(), new.to_flat()
    keys = sorted(set(before) | set(after))
    return "; ".join(
        f"{k}: {what} has {before.get(k)!r}, now {after.get(k)!r}" for k in keys if before.get(k) != after.get(k)
    )


def run_diff(old: Spec, new: Spec, what: str = "run") -> str:
    """`spec_diff` over what a run depends on: the [sweep] table is left out (it chooses cells;
    each cell's values are set in its spec), so a sweep may grow while one of its cells is cut."""
    return spec_diff(dataclasses.replace(old, sweep=new.sweep), new, what)


def load_spec(path: str | Path) -> Spec:
    """Read a spec from a TOML file. Missing keys take the defaults of fedpeft.config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"spec file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data.setdefault("name", path.stem)
    return Spec.from_dict(data)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; VALUE is read as a TOML value (``inf``, ``3``, ``"x"``, ``[..]``),
    falling back to the bare string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, e.g. federation.rounds=3 (got {item!r})")
        raw = raw.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def default_spec_path() -> Path:
    """The embedded quickstart spec (simulations/quickstart.toml, installed as fedpeft.simulations)."""
    return Path(str(resources.files("fedpeft.simulations").joinpath(DEFAULT_SPEC)))


def _name_part(key: str, value: Any) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(value, float) and (math.isinf(value) or value == int(value)):
        value = "inf" if math.isinf(value) else int(value)
    text = "_".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    if leaf == "name":  # a model or dataset path or id by its last part: /data/sst2.parquet -> sst2
        head, _, config = text.rstrip("/").partition(":")
        last = Path(head).name
        last = Path(last).stem if Path(last).suffix in (".csv", ".json", ".jsonl", ".parquet") else last
        return last + (f"_{config}" if config else "")
    return f"{leaf}{text}"


def named_for_changes(base: Spec, spec: Spec, limit: int = 64) -> Spec:
    """`spec` named after what it changes from `base`, so a run's directory, plots and tables say
    what ran: `quickstart` with model.name=tiny-bert and federation.rounds=3 becomes
    `quickstart-tiny-bert-rounds3`. A name set explicitly, or no change (outside the [sweep] grid),
    keeps the name. Long names are cut and end in a short hash of the whole."""
    before, after = base.to_flat(), spec.to_flat()
    if after["name"] != before["name"]:
        return spec
    changed = [k for k in after if k != "name" and not k.startswith("sweep.") and after[k] != before.get(k)]
    if not changed:
        return spec
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", "-".join(_name_part(k, after[k]) for k in changed))
    if len(slug) > limit:
        slug = f"{slug[: limit - 9]}-{zlib.crc32(slug.encode()):08x}"
    return spec.with_flat({"name": f"{spec.name}-{slug}"})


def resolve_spec(path: str | Path | None, overrides: list[str]) -> Spec:
    """A spec file (default: the quickstart) with ``KEY=VALUE`` overrides applied; overrides that
    change it rename it after the change (`named_for_changes`) unless they set `name`."""
    spec = load_spec(path or default_spec_path())
    return named_for_changes(spec, spec.with_flat(parse_overrides(overrides))) if overrides else spec


def default_spec() -> Spec:
    """The quickstart spec, `fedpeft simulate`'s default; pyproject's run-config is its flat form."""
    return resolve_spec(None, [])


# -- Flower run-config ------------------------------------------------------------------------------
def to_run_config(spec: Spec) -> dict[str, Any]:
    """A spec as Flower run-config keys: its flat form without the [sweep] table (a Flower run is
    one federation, not a grid). pyproject's [tool.flwr.app.config] is this of the quickstart."""
    return {k: v for k, v in spec.to_flat().items() if not k.startswith("sweep.")}


def spec_from_run_config(run_config: Mapping[str, Any], default: Spec) -> Spec:
    """The spec of a Flower run. Flower's run-config is the flat form of `default` (pyproject's
    [tool.flwr.app.config] carries it) plus the app keys `spec` and `out`. With `spec` = a TOML
    file, that file is the base and only the keys set away from the default override it; with no
    `spec`, every key applies, exactly like `fedpeft simulate --set`."""
    flat = {k: v for k, v in run_config.items() if k not in APP_KEYS}
    path = str(run_config.get("spec") or "")
    if not path:
        return named_for_changes(default, default.with_flat(flat))
    defaults = default.to_flat()
    base = load_spec(path)
    return named_for_changes(base, base.with_flat({k: v for k, v in flat.items() if defaults.get(k) != v}))


def spec_to_flat(spec: Spec) -> dict[str, Any]:
    """Flat ``section.key -> scalar`` mapping of `spec`; tuples become comma-joined strings."""
    flat: dict[str, Any] = {"name": spec.name}
    for section, values in spec.to_dict().items():
        if section == "name":
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat


def spec_with_flat(spec: Spec, flat: Mapping[str, Any]) -> Spec:
    """A copy of `spec` with dotted keys (``federation.rounds``) overridden."""
    nested = spec.to_dict()
    for dotted, value in flat.items():
        if dotted == "name":
            nested["name"] = str(value)
            continue
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise ConfigError(
                f"unknown key {dotted!r}: keys are section.field with section one of "
                f"{', '.join(SECTIONS)} (e.g. federation.rounds)"
            )
        nested[section][key] = value
    return spec_from_dict(nested)
