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


@pytest.mark.slow
def test_the_default_run_is_byte_identical_in_two_processes(tmp_path):
    """`fedpeft simulate` with no spec, twice in separate processes (shortened to 2 rounds), and once
    killed after round 1 and resumed in a third: the same adapter bytes and rounds.jsonl scores. Its cohort executor is the one whose dropout came
    from torch's global generator; the sequential path's reproducibility has in-process tests."""
    import json
    import subprocess
    import sys
    import time

    outs = []
    for i in range(2):
        out = tmp_path / f"run-{i}"
        cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--set", "federation.rounds=2", "--out", str(out)]
        subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        outs.append(out)
    a, b = ((o / "adapter_model.safetensors").read_bytes() for o in outs)
    assert a == b
    scores = [[(r["accuracy"], r["loss"]) for r in map(json.loads, (o / "rounds.jsonl").read_text().splitlines())]
              for o in outs]  # fmt: skip
    assert scores[0] == scores[1]
    # killed (SIGKILL) after its first round's checkpoint, then resumed in a new process: the same bytes
    cut = tmp_path / "cut"
    killed = subprocess.Popen([*cmd[:-1], str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rounds, deadline = cut / "rounds.jsonl", time.monotonic() + 600
    while not (rounds.exists() and rounds.read_text().strip()) and killed.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    killed.kill()
    killed.wait()
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"
    subprocess.run([*cmd[:-1], str(cut), "--resume"], capture_output=True, text=True, timeout=600, check=True)
    assert (cut / "adapter_model.safetensors").read_bytes() == a
    assert [(r["accuracy"], r["loss"]) for r in map(json.loads, rounds.read_text().splitlines())] == scores[0]
