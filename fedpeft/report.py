"""What a person sees: a live progress display, the final table, and the accuracy plot of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedpeft.config import Spec

__all__ = ["ProgressDisplay", "final_table", "plot_run"]


def _eps(value: Any) -> str:
    return "off" if value is None else f"{value:.2f}"


class ProgressDisplay:
    """A bar over all client trainings of the run, and one line per finished round."""

    def __init__(self, console: Console, spec: Spec) -> None:
        self.console = console
        self.spec = spec
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
        fed = self.spec.federation
        self.progress.__enter__()
        self.task = self.progress.add_task("round 1", total=fed.rounds * fed.clients_per_round, status="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def callbacks(self):  # noqa: ANN201
        from fedpeft.federation import Callbacks

        fed = self.spec.federation

        def on_round_start(rnd: int, clients: list[int]) -> None:
            # a resumed run starts with the finished rounds already counted
            self.progress.update(
                self.task, description=f"round {rnd}/{fed.rounds}", completed=(rnd - 1) * fed.clients_per_round
            )

        def on_client_done(rnd: int, cid: int) -> None:
            self.progress.advance(self.task)

        def on_round_end(record: dict[str, Any]) -> None:
            self.progress.update(self.task, status=f"acc {record['accuracy']:.3f}  eps {_eps(record['epsilon_max'])}")
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


def plot_run(history: list[dict[str, Any]], path: Path, title: str = "", majority: float | None = None) -> Path:
    """Test accuracy per round (with the majority-class rate for reference) and, when privacy is
    on, the epsilon spent so far on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    lines = ax.plot(rounds, [r["accuracy"] for r in history], marker="o", color="tab:blue", label="test accuracy")
    if majority is not None:
        lines += [ax.axhline(majority, color="grey", linestyle=":", label=f"majority class ({majority:.3f})")]
    low = min([r["accuracy"] for r in history] + ([majority] if majority is not None else []))
    ax.set_ylim(bottom=max(0.0, low - 0.03))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    eps = [r["epsilon_max"] for r in history]
    if any(e is not None for e in eps):
        ax2 = ax.twinx()
        lines += ax2.plot(
            rounds,
            [e or 0.0 for e in eps],
            marker="s",
            linestyle="--",
            color="tab:red",
            label="epsilon spent (max over clients)",
        )
        ax2.set_ylabel("epsilon spent")
        ax2.set_ylim(bottom=0)
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
