"""The README's default federation meets its bar: real MiniLM, real reviews, DP at epsilon 8, and
the adapters do the learning (the head is frozen at a random init, so the untrained model is the
same run with its adapters frozen).

Slow (about 2.5 CPU-minutes): run with `pytest -m slow`.
"""

import pytest

from fedpeft.client import evaluate
from fedpeft.federation import Federation
from fedpeft.spec_io import default_spec_path as _default_spec_path
from fedpeft.spec_io import load_spec


@pytest.mark.slow
def test_quickstart_is_private_and_its_adapters_beat_majority_and_the_frozen_model_by_ten_points(tmp_path):
    spec = load_spec(_default_spec_path())
    assert spec.privacy.enabled and spec.privacy.epsilon == 8.0
    assert not spec.model.train_head  # only the adapters train
    federation = Federation.build(spec)
    # before it trains, the federation's model is what the run scores with its adapters frozen
    model, test = federation.model, federation.data.test
    frozen = evaluate(model, model.state(), test, spec.train.eval_batch_size)["accuracy"]
    result = federation.run(tmp_path)
    summary = result.summary
    assert summary["epsilon"] <= spec.privacy.epsilon
    assert summary["accuracy"] >= summary["majority_rate"] + 0.10, summary
    assert summary["accuracy"] >= frozen + 0.10, (frozen, summary)
    # a score every round (the curve a newcomer looks at): the seeded subset, then the whole split
    assert all(r["accuracy"] is not None for r in result.history)
    assert [r["scored_on"] for r in result.history] == ["subset"] * (spec.federation.rounds - 1) + ["whole"]
