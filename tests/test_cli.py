"""The command line: errors that say what to change, output directories, a whole tiny run."""

import json
import subprocess
import sys

import pytest

from fedpeft.cli import main
from fedpeft.runfiles import RESULT_FILES

TINY = [
    "--set",
    "model.name=tiny-bert",
    "--set",
    "data.name=synthetic",
    "--set",
    "data.test_size=200",
    "--set",
    "federation.rounds=2",
    "--set",
    "train.local_steps=3",
    "--set",
    "train.batch_size=16",
    "--set",
    "model.max_length=24",
]


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.name=gpt9", "unknown model 'gpt9'; valid: minilm, smollm2, tiny-bert, tiny-llama"),
        ("data.name=imdb", "unknown dataset 'imdb'; valid: chatterbot, rotten-tomatoes, synthetic, synthetic-qa"),
        (
            "strategy.name=fedprox",
            "unknown strategy 'fedprox'; valid: fedavg, fedex, fedsa, fedsvd, ffa, flexlora, flora, hetlora, lora-fair",
        ),
        ("privacy.epsilon=0", "privacy.epsilon must be > 0"),
        ("federation.clients_per_round=99", "clients_per_round must be between 1 and"),
        ("model.rank=0", "model.rank must be >= 1"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["simulate", *TINY, "--set", override, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_spec_errors_and_list_answer_before_torch_is_imported(tmp_path):
    """A missing file, an unknown key, a bad value, an unknown name or a combination that cannot run
    is reported without importing torch (~2 s here), and so is `fedpeft list`, so a typo answers at
    once; checked in a fresh interpreter, where nothing else loaded it."""
    code = (
        "import sys; from fedpeft.cli import main\n"
        f"codes = [main(['simulate', {str(tmp_path / 'missing.toml')!r}]), main(['simulate', '--set', 'federaton.rounds=2']),"
        " main(['simulate', '--set', 'federation.rounds=0']), main(['simulate', '--set', 'model.name=nope']),"
        " main(['simulate', '--set', 'strategy.name=fedsvd', '--set', 'model.adapter=svd']), main(['list'])]\n"
        "print(codes, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.split()[-7:] == ["[2,", "2,", "2,", "2,", "2,", "0]", "False"], done.stdout + done.stderr
    assert done.stderr.count("fedpeft: error:") == 5
    assert "unknown model 'nope'; valid:" in done.stderr and "use fedavg" in done.stderr
    assert "strategies: fedavg, fedex," in done.stdout


def test_simulate_writes_results_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", *TINY, "--set", "privacy.epsilon=inf", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] is None and summary["rounds"] == 2
    assert summary["spec"]["privacy"]["epsilon"] == "inf"  # strict JSON
    for name in RESULT_FILES:
        assert (out / name).is_file(), name
    assert main(["simulate", *TINY, "--out", str(out)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_resume_needs_a_checkpoint_and_the_same_spec(tmp_path, capsys):
    assert main(["simulate", *TINY, "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["simulate", *TINY, "--out", str(out)]) == 0
    (out / "summary.json").unlink()  # pretend it was killed after its last checkpoint
    assert main(["simulate", *TINY, "--set", "train.lr=0.2", "--out", str(out), "--resume"]) == 2
    assert "train.lr: run has 0.1, now 0.2" in capsys.readouterr().err
    assert main(["simulate", *TINY, "--out", str(out), "--resume"]) == 0
    assert (out / "summary.json").is_file()


def test_privacy_calculator(capsys):
    assert main(["privacy", "--q", "0.0054", "--steps", "100", "--sigma", "0.454", "--accountant", "rdp"]) == 0
    assert "epsilon = 7.9" in capsys.readouterr().out
    assert main(["privacy", "--q", "0.01", "--steps", "100", "--epsilon", "3"]) == 0
    assert "sigma = " in capsys.readouterr().out


def test_progress_in_a_log_is_plain_lines(tmp_path):
    """Redirected to a file: no bar, no control codes, no wrapped lines; a line as each round starts."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", *TINY, "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    log = proc.stderr
    assert "\x1b[" not in log and "\r" not in log
    assert "round 1/2: training clients [0, 1, 2]" in log
    line = next(x for x in log.splitlines() if x.startswith("round   2: accuracy"))
    assert "epsilon_max" in line and line.rstrip().endswith("s")  # the whole round line on one line


def test_the_header_says_which_rounds_are_scored(tmp_path, capsys):
    """With eval_every > 1 the rounds between show "accuracy -"; the first line says why."""
    out = tmp_path / "run"
    assert main(["simulate", *TINY, "--set", "federation.eval_every=5", "--out", str(out)]) == 0
    printed = "".join(capsys.readouterr())
    assert "2 rounds (scored after the last)," in printed
    # in-process DP with the default seeded noise says so on screen, not only in summary.json
    assert "seeded noise: reproducible; no protection against anyone holding the spec" in printed
    assert "round   1: accuracy -" in printed and "round   2: accuracy 0." in printed


def test_every_round_prints_a_score_and_says_when_it_is_the_subset(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", *TINY, "--set", "federation.eval_subset=50", "--out", str(out)]) == 0
    printed = "".join(capsys.readouterr())
    assert "rounds before the last scored on 50 seeded test examples, the last on all" in printed
    first = next(x for x in printed.splitlines() if x.startswith("round   1: accuracy"))
    last = next(x for x in printed.splitlines() if x.startswith("round   2: accuracy"))
    assert "accuracy 0." in first and "(on 50 of the test split)" in first
    assert "accuracy 0." in last and "of the test split" not in last
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["scored_on"] for r in rounds] == ["subset", "whole"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trials", "1"], "--trials must be >= 2"),
        (["--size", "0"], "--size must be >= 1"),
        (["--epsilon", "inf"], "--epsilon takes finite claims"),
        (["--size", "100000"], "the audit needs more than 100000 examples"),
        (["--set", "privacy.clip=-1"], "privacy.clip must be > 0"),
    ],
)
def test_audit_rejects_bad_input_in_one_line(argv, message, capsys):
    assert main(["audit", *argv]) == 2
    assert message in capsys.readouterr().err
