"""Flower ServerApp: the same round loop as `fedpeft simulate`, with clients on Flower nodes.

The spec comes from Flower's run-config (see `fedpeft.config.spec_from_run_config`): pyproject's
[tool.flwr.app.config] is the quickstart spec in flat form, `--run-config "federation.rounds=3"`
overrides a key as `fedpeft simulate --set` does, and `--run-config "spec='path/to.toml'"` starts
from a spec file. Results go to `out` (default runs/<name>-flwr-<run id>): the same rounds.jsonl,
summary.json and PEFT adapter as an in-process run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.cli import resolve_spec
from fedpeft.config import Spec, spec_from_run_config
from fedpeft.executors.flower import FlowerExecutor
from fedpeft.federation import CHECKPOINT, Callbacks, Federation, check_names

__all__ = ["app", "default_spec"]

log = logging.getLogger("fedpeft")

app = ServerApp()


def default_spec() -> Spec:
    """The quickstart spec, `fedpeft simulate`'s default; pyproject's run-config is its flat form."""
    return resolve_spec(None, [])


def _log_round(record: dict) -> None:
    eps = record.get("epsilon_max")
    missing = ", ".join(f"client {k}: {v}" for k, v in record["dropped"].items())
    log.info(
        "round %d: accuracy %.4f, loss %.4f%s, %d update(s)%s",
        record["round"], record["accuracy"], record["loss"],
        f", epsilon {eps:.3f}" if eps is not None else "", len(record["clients"]),
        f"; missing {missing}" if missing else "",
    )  # fmt: skip


def _show_progress() -> None:
    """fedpeft's round lines on the ServerApp's stderr (Flower streams them with `flwr run --stream`)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s fedpeft: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    _show_progress()
    spec = spec_from_run_config(context.run_config, default_spec())
    check_names(spec)
    out = Path(str(context.run_config.get("out") or f"runs/{spec.name}-flwr-{context.run_id}")).resolve()
    if (out / CHECKPOINT).exists():
        raise FileExistsError(f"{out} already holds a run; choose another out")
    log.info("run %d: %s with %s, writing to %s", context.run_id, spec.name, spec.strategy.name, out)
    federation = Federation.build(spec, executor=FlowerExecutor(grid, spec))
    result = federation.run(out, callbacks=Callbacks(on_round_end=_log_round))
    summary = result.summary
    eps = summary["epsilon"]
    log.info(
        "done: accuracy %.4f after %d rounds%s; results in %s",
        summary["accuracy"], summary["rounds"], f", epsilon {eps:.3f}" if eps is not None else "", out,
    )  # fmt: skip
