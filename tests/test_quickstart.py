"""The README's default federation meets its bar: real MiniLM, real reviews, DP at epsilon 8.

Slow (about 2.5 minutes on 2 CPU cores): run with `pytest -m slow`.
"""

import pytest

from fedpeft.federation import Federation
from fedpeft.spec_io import default_spec_path as _default_spec_path
from fedpeft.spec_io import load_spec


@pytest.mark.slow
def test_quickstart_is_private_and_beats_majority_by_ten_points(tmp_path):
    spec = load_spec(_default_spec_path())
    assert spec.privacy.enabled and spec.privacy.epsilon == 8.0
    result = Federation.build(spec).run(tmp_path)
    summary = result.summary
    assert summary["epsilon"] <= spec.privacy.epsilon
    assert summary["accuracy"] >= summary["majority_rate"] + 0.10, summary
    # a score every round (the curve a newcomer looks at): the seeded subset, then the whole split
    assert all(r["accuracy"] is not None for r in result.history)
    assert [r["scored_on"] for r in result.history] == ["subset"] * (spec.federation.rounds - 1) + ["whole"]
