"""`fedpeft sweep`: strategies (x adapter families) x epsilons x seeds in one process, resumable,
then the report.

Every cell is an ordinary run (the same files as `fedpeft simulate`) in
DIR/<strategy>/eps-<epsilon>/seed-<seed>/ (DIR/<strategy>+<family>/... for a linear family). A finished cell (summary.json) is skipped, an
interrupted one (checkpoint.pt) resumes, so a sweep started again loses nothing. The spec of the
sweep is written to DIR/sweep.json; a second start may add cells (seeds, strategies, families,
budgets: the finished cells are kept), and any other change is refused, as is any cell already run
with other values than the grid now gives it (the error names it and what to run).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from fedpeft.catalog import check_names, runs_family
from fedpeft.config import ConfigError, Spec, StrategyConfig
from fedpeft.federation import Federation
from fedpeft.progress import ProgressDisplay, make_console
from fedpeft.report import eps_label, run_label, write_report
from fedpeft.runfiles import SUMMARY, has_checkpoint, load_checkpoint, write_json
from fedpeft.spec_io import run_diff

__all__ = ["Cell", "cells", "prepare_sweep", "run_sweep"]

SWEEP_SPEC = "sweep.json"


@dataclass(frozen=True)
class Cell:
    spec: Spec
    path: Path

    @property
    def label(self) -> str:
        spec = self.spec
        eps, seed = eps_label(spec.privacy.epsilon), spec.federation.seed
        client = spec.privacy.client_epsilon if spec.privacy.client_enabled else None
        return f"{run_label(spec.strategy.name, spec.model.adapter, client)} ε={eps} seed {seed}"


def cells(spec: Spec, out: Path) -> list[Cell]:
    """The grid, in the order it runs: seeds outermost, so a partial sweep has whole seeds. With
    `sweep.adapters`, a linear family pairs only with the strategies that run any family; LoRA
    cells keep the directory DIR/<strategy>/..., a family's is DIR/<strategy>+<family>/...; with
    `sweep.client_epsilons`, DIR/<strategy>/client-eps-<epsilon>/eps-<epsilon>/seed-<seed>."""
    sweep = spec.sweep
    strategies = sweep.strategies or (spec.strategy.name,)
    adapters = sweep.adapters or (spec.model.adapter,)
    epsilons = sweep.epsilons or (spec.privacy.epsilon,)
    client_epsilons = sweep.client_epsilons or (spec.privacy.client_epsilon,)
    seeds = sweep.seeds or (spec.federation.seed,)
    pairs = [(s, a) for a in adapters for s in strategies if runs_family(s, a)]
    if not pairs:
        raise ConfigError(
            f"no strategy of sweep.strategies {list(strategies)} runs the adapter families {list(adapters)}; "
            "the linear families run with fedavg"
        )
    arms = {run_label(s, a) for s, a in pairs}
    per_arm = {key: arm_values(key, getattr(sweep, key), arms, epsilons) for key in ("lrs", "clips")}
    grid = []
    for seed, client_epsilon, epsilon, (strategy, adapter) in itertools.product(
        seeds, client_epsilons, epsilons, pairs
    ):
        # [strategy] options belong to the spec's own strategy; other strategies run with defaults
        options = spec.strategy.options if strategy == spec.strategy.name else ()
        flat = {"privacy.epsilon": epsilon, "privacy.client_epsilon": client_epsilon,
                "federation.seed": seed, "model.adapter": adapter}  # fmt: skip
        arm = run_label(strategy, adapter)
        for key, name in (("lrs", "train.lr"), ("clips", "privacy.clip")):
            value = per_arm[key].get((arm, epsilon), per_arm[key].get((arm, None)))
            if value is not None:
                flat[name] = value
        cell_spec = replace(spec.with_flat(flat), strategy=StrategyConfig(name=strategy, options=options))
        path = out / arm
        if sweep.client_epsilons:
            path = path / f"client-eps-{eps_label(client_epsilon)}"
        grid.append(Cell(cell_spec, path / f"eps-{eps_label(epsilon)}" / f"seed-{seed}"))
    return grid


def arm_values(key: str, entries: tuple[str, ...], arms: set[str], epsilons: tuple[float, ...]) -> dict[tuple, float]:
    """`sweep.lrs` or `sweep.clips` as {(arm, epsilon or None): value}; an entry that names no arm or
    budget of the grid, or is not ARM=VALUE / ARM@EPSILON=VALUE with VALUE > 0, is an error."""
    out: dict[tuple, float] = {}
    for entry in entries:
        text, sep, value_text = entry.partition("=")
        arm, at, eps_text = text.strip().partition("@")
        try:
            value, eps = float(value_text), float(eps_text) if at else None
        except ValueError:
            value = eps = None
        if not sep or value is None or not 0 < value < math.inf or (at and eps is None):
            raise ConfigError(
                f"sweep.{key} entry {entry!r} is not ARM=VALUE or ARM@EPSILON=VALUE with 0 < VALUE < inf (e.g. ffa@8=0.1)"
            )
        if arm not in arms:
            raise ConfigError(f"sweep.{key} entry {entry!r} names no arm of the grid: {', '.join(sorted(arms))}")
        if eps is not None and eps not in epsilons:
            raise ConfigError(f"sweep.{key} entry {entry!r} names no budget of the grid: {list(epsilons)}")
        out[(arm, eps)] = value
    return out


def _check_sweep_spec(out: Path, spec: Spec, grid: list[Cell]) -> None:
    """A sweep started again may add cells (seeds, strategies, families, budgets) to the one in `out`;
    any other change to what its runs depend on is refused, saying what to run."""
    path = out / SWEEP_SPEC
    if path.exists():
        try:
            saved = Spec.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as exc:
            raise ConfigError(
                f"{path} is not a readable sweep spec ({exc}); remove it (its cells are checked against the spec "
                f"you run) and run the sweep again into {out}"
            ) from None
        if diff := run_diff(saved, spec, "sweep"):
            raise ConfigError(
                f"{out} holds a sweep of a different spec ({diff}); run this one into another --out, or remove "
                f"{out} to start over"
            )
        if left := sorted({c.path for c in cells(saved, out)} - {c.path for c in grid}):
            raise ConfigError(
                f"this spec's grid leaves out {len(left)} cell(s) of the sweep in {out} (e.g. "
                f"{left[0].relative_to(out)}): a sweep started again may add seeds, strategies, families and "
                "budgets, not drop them; put them back, or run into another --out"
            )


def _check_cells(out: Path, grid: list[Cell]) -> None:
    """Every cell already run (finished or cut) in `out` was run with its spec in this grid: a cell
    run with other values (a changed lr, rounds after sweep.json was removed) is never reported beside
    the others, nor resumed; the error names them and what to run."""
    stale = []
    for cell in grid:
        if (cell.path / SUMMARY).exists():
            try:
                saved = Spec.from_dict(json.loads((cell.path / SUMMARY).read_text())["spec"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ConfigError):
                stale.append((cell, "its summary.json is not readable"))
                continue
        elif has_checkpoint(cell.path):
            saved = Spec.from_dict(load_checkpoint(cell.path)["spec"])
        else:
            continue
        if diff := run_diff(saved, cell.spec, "cell"):
            stale.append((cell, diff))
    if stale:
        rm = " ".join(str(c.path) for c, _ in stale[:3]) + (" ..." if len(stale) > 3 else "")
        raise ConfigError(
            f"{len(stale)} cell(s) in {out} were run with another spec than this sweep gives them, e.g. "
            f"{stale[0][0].path.relative_to(out)}: {stale[0][1]}; to re-run them with this spec: rm -r {rm} "
            "(or run the sweep into another --out)"
        )


def prepare_sweep(spec: Spec, out: Path) -> list[Cell]:
    """The grid, once the spec may (re)start the sweep in `out` (a ConfigError saying what to run if
    not); then `out`/sweep.json is written. A refused start leaves the sweep as it was."""
    grid = cells(spec, out)
    for cell in grid:
        check_names(cell.spec)  # fail before any work
    _check_sweep_spec(out, spec, grid)
    _check_cells(out, grid)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SWEEP_SPEC, spec.to_dict())
    return grid


def run_sweep(spec: Spec, out: Path, console: Console | None = None) -> dict[str, Path]:
    """Run every unfinished cell of the grid, then write the report. Returns the report's paths."""
    console = console or make_console()
    grid = prepare_sweep(spec, out)
    units = [c.spec.federation.rounds * c.spec.federation.clients_per_round for c in grid]
    done = [(c.path / SUMMARY).exists() for c in grid]
    console.print(f"[bold]sweep[/] {spec.name}: {len(grid)} runs ({sum(done)} already finished) into {out}/")
    tic = time.perf_counter()
    with ProgressDisplay(console, sum(units), rounds=False) as progress:
        progress.skip(sum(u for u, d in zip(units, done, strict=True) if d))  # cells finished before
        for i, cell in enumerate(grid):
            if done[i]:
                continue
            offset = sum(units[:i])
            resume = has_checkpoint(cell.path)
            federation = Federation.build(cell.spec)
            result = federation.run(
                cell.path,
                resume=resume,
                callbacks=progress.callbacks(cell.spec, f"[{i + 1}/{len(grid)}] {cell.label}: ", offset),
            )
            s = result.summary
            eps = "off" if s["epsilon"] is None else f"{s['epsilon']:.2f}"
            console.print(
                f"[{i + 1}/{len(grid)}] {cell.label}: accuracy {s['accuracy']:.4f}, epsilon {eps}, "
                f"{s['seconds']:.0f}s" + (" (resumed)" if resume else "")
            )
    paths = write_report(out)
    minutes = (time.perf_counter() - tic) / 60
    console.print(f"sweep done in {minutes:.1f} min; report: {paths['markdown']}")
    return paths
