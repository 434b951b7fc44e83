"""What a person sees while a run goes: a live progress bar, a line per round, the final table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedpeft.config import Spec

__all__ = ["ProgressDisplay", "final_table", "fmt_metric", "make_console"]


def _eps(value: Any) -> str:
    return "off" if value is None else f"{value:.2f}"


def fmt_metric(value: Any, digits: int = 4) -> str:
    """A metric, or "-" for a round that was not evaluated (federation.eval_every)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _scored_on(record: dict[str, Any]) -> str:
    """What a round was scored on (logs before federation.eval_subset scored the whole split)."""
    if record["accuracy"] is None:
        return "-"
    return "subset" if record.get("scored_on") == "subset" else "test split"


def make_console() -> Console:
    """The console for progress and results, on stderr. In a terminal: live bars. Redirected to a
    file or a pipe: plain lines, never wrapped, no control codes."""
    import sys

    if sys.stderr.isatty():
        return Console(stderr=True)
    return Console(stderr=True, soft_wrap=True, width=160, no_color=True, highlight=False)


PLAIN_EVERY = 5.0  # seconds between progress lines in a log (and a line per finished client when slower)


class ProgressDisplay:
    """One bar over every client training of a run or a whole sweep; a line per finished round
    (`rounds=True`) for a single run. When the console is not a terminal (output goes to a log),
    plain lines instead of the bar: one per finished client, at most one every PLAIN_EVERY seconds."""

    def __init__(self, console: Console, total: int, rounds: bool = True) -> None:
        import time

        self.console = console
        self.total = total
        self.rounds = rounds
        self.live = console.is_terminal
        self.done = 0
        self._clock = time.monotonic
        self._last = -PLAIN_EVERY
        self._started = self._clock()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = None

    def __enter__(self) -> ProgressDisplay:
        if self.live:
            self.progress.__enter__()
            self.task = self.progress.add_task("starting", total=self.total, status="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.__exit__(*exc)

    def skip(self, units: int) -> None:
        """Count `units` as done already (a resumed sweep's finished cells)."""
        self.done = units
        if self.live:
            self.progress.update(self.task, completed=units)

    def _plain(self, text: str, force: bool = False) -> None:
        now = self._clock()
        if force or now - self._last >= PLAIN_EVERY:
            self._last = now
            self.console.print(f"{text}  [{self.done}/{self.total}, {now - self._started:.0f}s]", markup=False)

    def callbacks(self, spec: Spec, label: str = "", offset: int = 0):  # noqa: ANN201
        """Hooks for one run of `spec`; `offset` units of the bar were done before it."""
        from fedpeft.federation import Callbacks

        fed = spec.federation

        def on_round_start(rnd: int, clients: list[int]) -> None:
            self.done = offset + (rnd - 1) * fed.clients_per_round
            if not self.live:
                self._plain(f"{label}round {rnd}/{fed.rounds}: training clients {clients}", force=True)
                return
            # a resumed run starts with the finished rounds already counted
            self.progress.update(
                self.task,
                description=f"{label}round {rnd}/{fed.rounds}",
                completed=offset + (rnd - 1) * fed.clients_per_round,
            )

        def on_client_done(rnd: int, cid: int) -> None:
            self.done += 1
            if not self.live:
                self._plain(f"{label}round {rnd}/{fed.rounds}: client {cid} done")
                return
            self.progress.advance(self.task)

        def on_round_end(record: dict[str, Any]) -> None:
            if self.live:
                status = f"acc {fmt_metric(record['accuracy'], 3)}  eps {_eps(record['epsilon_max'])}"
                self.progress.update(self.task, status=status)
            if not self.rounds:
                if not self.live:
                    self._plain(
                        f"{label}round {record['round']}: accuracy {fmt_metric(record['accuracy'])}", force=True
                    )
                return
            dropped = f"  dropped {sorted(int(k) for k in record['dropped'])}" if record["dropped"] else ""
            subset = f" (on {fed.eval_subset} of the test split)" if record.get("scored_on") == "subset" else ""
            line = (
                f"round {record['round']:>3}: accuracy {fmt_metric(record['accuracy'])}  loss {fmt_metric(record['loss'])}{subset}  "
                f"epsilon_max {_eps(record['epsilon_max'])}  clients {record['clients']}{dropped}  "
                f"{record['seconds']:.1f}s"
            )
            self.console.print(line, markup=False)

        return Callbacks(on_round_start, on_client_done, on_round_end)


def final_table(summary: dict[str, Any], history: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{summary['name']}: {summary['strategy']}, seed {summary['seed']}")
    for column in ("round", "accuracy", "loss", "scored on", "epsilon_max", "clients", "seconds"):
        table.add_column(column, justify="right")
    for r in history:
        table.add_row(
            str(r["round"]),
            fmt_metric(r["accuracy"]),
            fmt_metric(r["loss"]),
            _scored_on(r),
            _eps(r["epsilon_max"]),
            str(len(r["clients"])),
            f"{r['seconds']:.1f}",
        )
    eps = (
        "privacy off"
        if summary["epsilon"] is None
        else f"epsilon {summary['epsilon']:.3f} (target {summary['target_epsilon']:g}) at delta {summary['delta']:g}"
    )
    if summary.get("client_epsilon") is not None:
        eps = ("" if summary["epsilon"] is None else eps + "; ") + (
            f"client-level epsilon {summary['client_epsilon']:.3f} (target {summary['client_target_epsilon']:g})"
        )
    if summary.get("base_accuracy") is not None:  # a causal LM: token accuracy and answer loss, vs the base model
        score = (f"final token accuracy {summary['accuracy']:.4f} (base model {summary['base_accuracy']:.4f}), "
                 f"answer loss {summary['loss']:.4f} (base {summary['base_loss']:.4f})")  # fmt: skip
    else:
        score = f"final accuracy {summary['accuracy']:.4f} (majority class {summary['majority_rate']:.4f})"
    table.caption = f"{score}; {eps}; {summary['seconds']:.0f}s"
    return table
