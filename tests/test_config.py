import math
from pathlib import Path

import pytest

from fedpeft.config import ConfigError, Spec
from fedpeft.spec_io import load_spec, parse_overrides
from tests.conftest import tiny_spec


def test_defaults_are_valid_and_round_trip():
    spec = Spec()
    assert Spec.from_dict(spec.to_dict()) == spec
    assert Spec().with_flat(spec.to_flat()) == spec


def test_flat_overrides_parse_toml_values():
    flat = parse_overrides(
        ["privacy.epsilon=inf", "federation.rounds=3", "model.targets=query,value", "strategy.refactor_period=2"]
    )
    spec = Spec().with_flat(flat)
    assert math.isinf(spec.privacy.epsilon) and not spec.privacy.enabled
    assert spec.federation.rounds == 3
    assert spec.model.targets == ("query", "value")
    assert spec.strategy.kwargs == {"refactor_period": 2}
    assert Spec().with_flat({"privacy.epsilon": 8}).privacy.epsilon == 8.0


def test_quickstart_spec_loads():
    from fedpeft.spec_io import default_spec_path as _default_spec_path

    spec = load_spec(_default_spec_path())
    assert spec.name == "quickstart" and spec.privacy.enabled and spec.model.name == "minilm"


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("privacy.epsilon", 0, "privacy.epsilon must be > 0"),
        ("privacy.epsilon", -1.0, "use inf to turn privacy off"),
        ("federation.clients_per_round", 9, "clients_per_round must be between 1 and federation.clients=4"),
        ("model.rank", 0, "model.rank must be >= 1"),
        ("privacy.delta", 1.5, "privacy.delta"),
        ("data.partition", "random", "data.partition must be one of"),
        ("federation.rounds", "three", "must be an integer"),
        ("federation.bogus", 1, "valid keys of [federation]"),
        ("nosection.x", 1, "unknown key"),
    ],
)
def test_invalid_values_say_what_to_change(key, value, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        tiny_spec(**{key.replace(".", "__"): value})
    assert fragment in str(info.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["federation.rounds"])


def test_load_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 2")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_spec(bad)
    ok = tmp_path / "mine.toml"
    ok.write_text("[federation]\nrounds = 2\n[privacy]\nepsilon = inf\n")
    spec = load_spec(ok)
    assert spec.name == "mine" and spec.federation.rounds == 2 and not spec.privacy.enabled


def test_the_readme_lists_every_spec_key():
    """README's key list (between "Keys are" and "Values are read as TOML") names every field of
    every section, so a new key cannot go undocumented there."""
    import dataclasses
    import re
    from pathlib import Path

    from fedpeft.config import SECTIONS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("Keys are `section.field`") : readme.index("Values are read as TOML")]
    missing = []
    for section, klass in SECTIONS.items():
        found = re.search(rf"`{section}\.([^`]*)`", block)
        listed = set(re.findall(r"[a-z_]+", found.group(1))) if found else set()
        missing += [
            f"{section}.{f.name}" for f in dataclasses.fields(klass) if f.name != "options" and f.name not in listed
        ]
    assert not missing, f"README's key list lacks {missing}"


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("simulations/*.toml")), ids=lambda p: p.stem)
def test_every_shipped_spec_loads_and_can_run(path):
    """Each spec in simulations/ parses, and its names and combinations pass the checks a run
    makes before any work (instruct and instruct-gpu: a causal LM on instruction data)."""
    from fedpeft.catalog import check_names
    from fedpeft.models import HUB_ID

    spec = load_spec(path)
    if HUB_ID.fullmatch(spec.model.name):  # a hub spec (glue-fedsvd): its names need the hub; the rest is
        spec = spec.with_flat({"model.name": "minilm", "data.name": "rotten-tomatoes"})  # checked here, and
    check_names(spec)  # it runs on local stand-ins in tests/test_your_model.py
