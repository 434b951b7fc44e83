"""Flower ServerApp: the same round loop as `fedpeft simulate`, with clients on Flower nodes.

The spec comes from Flower's run-config (see `fedpeft.spec_io.spec_from_run_config`): pyproject's
[tool.flwr.app.config] is the quickstart spec in flat form, `--run-config "federation.rounds=3"`
overrides a key as `fedpeft simulate --set` does, and `--run-config "spec='path/to.toml'"` starts
from a spec file. Results go to `out` (default runs/<name>-flwr-<run id>): the same rounds.jsonl,
summary.json and PEFT adapter as an in-process run. A run stopped mid-way (the SuperLink or the
ServerApp died) resumes from its last checkpoint when resubmitted with the same out and
`resume=true` in its run-config; the nodes then continue that run's privacy ledgers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.catalog import check_names
from fedpeft.config import ConfigError, Spec
from fedpeft.federation import Callbacks, Federation
from fedpeft.flower.environment import runtime_install_warning
from fedpeft.flower.executor import FlowerExecutor
from fedpeft.plots import write_run_plot
from fedpeft.plugins import PLUGINS, load_plugins
from fedpeft.progress import fmt_metric
from fedpeft.runfiles import SUMMARY, has_checkpoint, load_checkpoint
from fedpeft.spec_io import default_spec, spec_from_run_config

__all__ = ["app"]

log = logging.getLogger("fedpeft")

app = ServerApp()


def _log_round(record: dict) -> None:
    eps = record.get("epsilon_max")
    missing = ", ".join(f"client {k}: {v}" for k, v in record["dropped"].items())
    log.info(
        "round %d: accuracy %s, loss %s%s, %d update(s)%s",
        record["round"], fmt_metric(record["accuracy"]), fmt_metric(record["loss"]),
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


def unbound_warning(grid: Grid, spec: Spec, allowed: bool = False) -> str | None:
    """A deployment (the SuperLink's grid, not the simulation's in-memory one) whose partitions no
    federation.node_ids binds: any registered node could claim any partition, first come first served.
    The run is refused (`main` logs this and stops) unless the operator allows it (`allowed`, the
    run-config key allow-unbound=true); then it is a warning."""
    from flwr.superlink.grid.http_grid import HttpGrid

    if spec.federation.node_ids or not isinstance(grid, HttpGrid):
        return None
    return (
        "UNBOUND PARTITIONS: federation.node_ids is not set, so the first node to claim a partition would hold it; "
        "node authentication proves a node is registered, not which data it should hold. Set "
        "federation.node_ids = [id of partition 0, ...] (the ids `flwr supernode register` printed)"
        + (" (allowed by allow-unbound=true)" if allowed else "; or submit with --run-config allow-unbound=true "
           "to let the first claim win: refused")
    )  # fmt: skip


def _refusal(out: Path, resume: bool) -> str | None:
    """Why this run may not start on `out`, saying what to run instead (Federation.run checks again
    under the run directory's lock; this is the message a Flower user needs)."""
    how = f"--run-config \"out='{out}' resume=true\""
    if (out / SUMMARY).exists():
        return f"{out} already holds a finished run; choose another out"
    if resume and not has_checkpoint(out):
        return f"nothing to resume in {out}: it holds no checkpoint; submit without resume=true to start it"
    if not resume and has_checkpoint(out):
        return (f"{out} holds an unfinished run (a SuperLink or ServerApp stopped mid-run?): resubmit with {how} "
                "to continue it from its last round (same spec; the nodes continue its ledgers), or choose another out")  # fmt: skip
    return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    _show_progress()
    if warning := runtime_install_warning():
        log.warning(warning)
    try:  # user code the operator names for this run (fedpeft.plugins), before the spec names it
        load_plugins(str(context.run_config.get(PLUGINS, "")))
    except ConfigError as exc:
        log.error("%s", exc)
        return
    spec = spec_from_run_config(context.run_config, default_spec())
    check_names(spec)
    allow_unbound = str(context.run_config.get("allow-unbound", "false")).lower() in ("true", "1", "yes")
    if warning := unbound_warning(grid, spec, allow_unbound):
        (log.warning if allow_unbound else log.error)(warning)
        if not allow_unbound:
            return
    out = Path(str(context.run_config.get("out") or f"runs/{spec.name}-flwr-{context.run_id}")).resolve()
    resume = str(context.run_config.get("resume", "false")).lower() in ("true", "1", "yes")
    if (why := _refusal(out, resume)) is not None:
        log.error("%s", why)  # one line, no traceback: `flwr run` shows it with --stream, and the log keeps it
        return
    # the nodes keep their clients' ledgers under the run id spec.federation.continues names: this
    # run's own, or, resumed after a SuperLink restart (a new Flower run id), the first run's
    first = Spec.from_dict(load_checkpoint(out)["spec"]).federation.continues if resume else 0
    spec = spec.with_flat({"federation.continues": first or spec.federation.continues or context.run_id})
    log.info("run %d: %s with %s, writing to %s", context.run_id, spec.name, spec.strategy.name, out)
    federation = Federation.build(spec, executor=FlowerExecutor(grid, spec))
    try:
        result = federation.run(out, resume=resume, callbacks=Callbacks(on_round_end=_log_round))
    except ConfigError as exc:  # e.g. resumed with another spec, or another run took `out` meanwhile
        log.error("%s", exc)
        return
    write_run_plot(result, spec, out)  # the same files as `fedpeft simulate`
    summary = result.summary
    eps = summary["epsilon"]
    log.info(
        "done: accuracy %.4f after %d rounds%s; results in %s",
        summary["accuracy"], summary["rounds"], f", epsilon {eps:.3f}" if eps is not None else "", out,
    )  # fmt: skip
