"""What a person sees while a run goes: a live progress bar, a line per round, the final table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedpeft.config import Spec

__all__ = ["ProgressDisplay", "final_table"]


def _eps(value: Any) -> str:
    return "off" if value is None else f"{value:.2f}"


class ProgressDisplay:
    """One bar over every client training of a run or a whole sweep; a line per finished round
    (`rounds=True`) for a single run."""

    def __init__(self, console: Console, total: int, rounds: bool = True) -> None:
        self.console = console
        self.total = total
        self.rounds = rounds
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
        self.progress.__enter__()
        self.task = self.progress.add_task("starting", total=self.total, status="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def callbacks(self, spec: Spec, label: str = "", offset: int = 0):  # noqa: ANN201
        """Hooks for one run of `spec`; `offset` units of the bar were done before it."""
        from fedpeft.federation import Callbacks

        fed = spec.federation

        def on_round_start(rnd: int, clients: list[int]) -> None:
            # a resumed run starts with the finished rounds already counted
            self.progress.update(
                self.task,
                description=f"{label}round {rnd}/{fed.rounds}",
                completed=offset + (rnd - 1) * fed.clients_per_round,
            )

        def on_client_done(rnd: int, cid: int) -> None:
            self.progress.advance(self.task)

        def on_round_end(record: dict[str, Any]) -> None:
            self.progress.update(self.task, status=f"acc {record['accuracy']:.3f}  eps {_eps(record['epsilon_max'])}")
            if not self.rounds:
                return
            dropped = f"  dropped {sorted(int(k) for k in record['dropped'])}" if record["dropped"] else ""
            self.console.print(
                f"round {record['round']:>3}: accuracy {record['accuracy']:.4f}  loss {record['loss']:.4f}  "
                f"epsilon_max {_eps(record['epsilon_max'])}  clients {record['clients']}{dropped}  "
                f"{record['seconds']:.1f}s"
            )

        return Callbacks(on_round_start, on_client_done, on_round_end)


def final_table(summary: dict[str, Any], history: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{summary['name']}: {summary['strategy']}, seed {summary['seed']}")
    for column in ("round", "accuracy", "loss", "epsilon_max", "clients", "seconds"):
        table.add_column(column, justify="right")
    for r in history:
        table.add_row(
            str(r["round"]),
            f"{r['accuracy']:.4f}",
            f"{r['loss']:.4f}",
            _eps(r["epsilon_max"]),
            str(len(r["clients"])),
            f"{r['seconds']:.1f}",
        )
    eps = (
        "privacy off"
        if summary["epsilon"] is None
        else f"epsilon {summary['epsilon']:.3f} (target {summary['target_epsilon']:g}) at delta {summary['delta']:g}"
    )
    table.caption = (
        f"final accuracy {summary['accuracy']:.4f} (majority class {summary['majority_rate']:.4f}); {eps}; "
        f"{summary['seconds']:.0f}s"
    )
    return table
