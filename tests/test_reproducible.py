"""The default run (`fedpeft simulate` with no arguments, shortened) is reproducible across
processes and across a kill and resume. Apart from test_quickstart.py so that the two slow files
run on two workers at once."""

import pytest


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
