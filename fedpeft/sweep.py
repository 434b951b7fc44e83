"""`fedpeft sweep`: strategies (x adapter families) x epsilons x seeds in one process, resumable,
then the report.

Every cell is an ordinary run (the same files as `fedpeft simulate`) in
DIR/<strategy>/eps-<epsilon>/seed-<seed>/ (DIR/<strategy>+<family>/... for a linear family). A finished cell (summary.json) is skipped, an
interrupted one (checkpoint.pt) resumes, so a sweep started again loses nothing. The spec of the
sweep is written to DIR/sweep.json; a second start with a different spec is refused, unless it only
adds seeds (more power for the same design: the finished cells are kept).
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
from fedpeft.runfiles import SUMMARY, has_checkpoint, write_json
from fedpeft.spec_io import spec_diff

__all__ = ["Cell", "cells", "run_sweep"]

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


def _check_sweep_spec(out: Path, spec: Spec) -> None:
    path = out / SWEEP_SPEC
    if path.exists():
        try:
            saved = Spec.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as exc:
            raise ConfigError(
                f"{path} is not a readable sweep spec ({exc}); remove it to start this sweep again in {out}"
            ) from None
        if saved != spec:  # allowed only as the same sweep with seeds added: its cells so far stay valid
            same_design = replace(spec, sweep=replace(spec.sweep, seeds=saved.sweep.seeds)) == saved
            if not (same_design and set(saved.sweep.seeds) <= set(spec.sweep.seeds)):
                raise ConfigError(
                    f"{out} holds a sweep of a different spec ({spec_diff(saved, spec, 'sweep')}); choose another --out"
                )
            write_json(path, spec.to_dict())
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, spec.to_dict())


def run_sweep(spec: Spec, out: Path, console: Console | None = None) -> dict[str, Path]:
    """Run every unfinished cell of the grid, then write the report. Returns the report's paths."""
    console = console or make_console()
    grid = cells(spec, out)
    for cell in grid:
        check_names(cell.spec)  # fail before any work
    _check_sweep_spec(out, spec)
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
