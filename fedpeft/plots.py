"""Plots: one run's test accuracy per round and epsilon spent (accuracy.png), and a sweep's
accuracy against the privacy budget."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def budget_label(epsilon: float) -> str:
    """A privacy budget as tables and plots name it: "no DP" for infinity, else "ε = 8"."""
    return "no DP" if math.isinf(epsilon) else f"ε = {epsilon:g}"


__all__ = ["plot_accuracy_vs_epsilon", "plot_per_epsilon", "plot_run", "pyplot", "write_run_plot"]


def pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(history: list[dict[str, Any]], path: Path, title: str = "", majority: float | None = None) -> Path:
    """Test accuracy per round (with the majority-class rate for reference) and, when privacy is
    on, the epsilon spent so far on a second axis."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    evaluated = [r for r in history if r["accuracy"] is not None]  # federation.eval_every
    accuracy = [r["accuracy"] for r in evaluated]
    # rounds scored on federation.eval_subset: hollow markers; on the whole test split: filled
    subset = [r for r in evaluated if r.get("scored_on") == "subset"]
    whole = [r for r in evaluated if r.get("scored_on") != "subset"]
    ax.plot([r["round"] for r in evaluated], accuracy, color="tab:blue", alpha=0.5)
    lines = []
    if subset:
        lines += ax.plot(
            [r["round"] for r in subset], [r["accuracy"] for r in subset], "o", markerfacecolor="white",
            color="tab:blue", label="test accuracy (seeded subset)",
        )  # fmt: skip
    lines += ax.plot(
        [r["round"] for r in whole], [r["accuracy"] for r in whole], "o", color="tab:blue",
        label="test accuracy (whole split)" if subset else "test accuracy",
    )  # fmt: skip
    if majority is not None:
        lines += [ax.axhline(majority, color="grey", linestyle=":", label=f"majority class ({majority:.3f})")]
    low = min(accuracy + ([majority] if majority is not None else []))
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
    # below the axes, where it covers no data
    ax.legend(
        lines, [line.get_label() for line in lines], loc="upper center", bbox_to_anchor=(0.5, -0.14),
        ncol=len(lines), fontsize=8, frameon=False,
    )  # fmt: skip
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- sweeps: from result files alone -------------------------------------------------------------
def write_run_plot(result: Any, spec: Any, out: Path) -> Path:
    """accuracy.png of a finished run (a `RunResult` of `spec`), as `fedpeft simulate` and the
    Flower ServerApp both write it."""
    title = f"{spec.name}: {spec.strategy.name}"
    return plot_run(result.history, Path(out) / "accuracy.png", title, result.summary.get("majority_rate"))


def plot_accuracy_vs_epsilon(
    rows: list[dict[str, Any]], strategies: list[str], targets: list[float], path: Path
) -> None:
    """A sweep's final accuracy (mean ± 95% CI) per strategy against the privacy budget."""
    plt = pyplot()
    finite = sorted(e for e in targets if not math.isinf(e))
    xs = {e: i for i, e in enumerate(finite)}
    if any(math.isinf(e) for e in targets):
        xs[math.inf] = len(finite)
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=130)
    width = 0.08
    for k, strategy in enumerate(strategies):
        points = sorted(
            (
                (xs[float("inf") if r["epsilon"] == "inf" else float(r["epsilon"])], r)
                for r in rows
                if r["strategy"] == strategy
            ),
            key=lambda p: p[0],
        )
        x = [p + (k - (len(strategies) - 1) / 2) * width for p, _ in points]
        y = [100 * r["accuracy_mean"] for _, r in points]
        err = [0 if math.isnan(r["accuracy_ci95"]) else 100 * r["accuracy_ci95"] for _, r in points]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=strategy)
    if not any(math.isnan(r["majority_rate"]) for r in rows):  # a causal LM has none
        ax.axhline(100 * sum(r["majority_rate"] for r in rows) / len(rows), color="grey", linestyle=":",
                   label="majority class")  # fmt: skip
    ax.set_xticks(sorted(xs.values()), [budget_label(e) for e in sorted(xs, key=xs.get)])
    low, high = ax.get_ylim()
    ax.set_ylim(max(0.0, low), min(100.0, high))  # a CI past 0 or 100 is cut at the axis
    ax.set_xlabel("privacy budget (per client, δ fixed)")
    ax.set_ylabel("final test accuracy (%), mean ± 95% CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _stderr(values: list[float]) -> float:
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def _curves(runs, key: str, strategies: list[str], targets: list[float]):  # noqa: ANN001, ANN202
    """(strategy, target) -> (rounds, mean, standard error) of `key` per round over seeds."""
    out = {}
    for strategy in strategies:
        for target in targets:
            cell = [r["history"] for r in runs if r["strategy"] == strategy and r["target"] == target and r["history"]]
            if not cell or any(h[0].get(key) is None for h in cell):  # not evaluated every round
                continue
            n = min(len(h) for h in cell)
            rounds = [cell[0][i]["round"] for i in range(n)]
            values = [[h[i][key] for h in cell] for i in range(n)]
            out[strategy, target] = (rounds, [sum(v) / len(v) for v in values], [_stderr(v) for v in values])
    return out


def plot_per_epsilon(  # noqa: ANN001
    runs, strategies: list[str], targets: list[float], key: str, ylabel: str, path: Path, scale: float = 1.0,
    skip_inf: bool = False,
) -> None:  # fmt: skip
    """One panel per budget: `key` per round, mean ± standard error over seeds, per strategy (runs
    as `fedpeft.report.collect` gives them; a strategy not evaluated every round is left out)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    targets = [t for t in targets if not (skip_inf and math.isinf(t))]
    if not targets:
        return
    curves = _curves(runs, key, strategies, targets)
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), dpi=130, sharey=True, squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        for strategy in strategies:
            if (strategy, target) not in curves:
                continue
            rounds, mean, err = curves[strategy, target]
            mean = [scale * m for m in mean]
            ax.plot(rounds, mean, marker=".", label=strategy)
            if not any(math.isnan(e) for e in err):
                ax.fill_between(
                    rounds,
                    [m - scale * e for m, e in zip(mean, err, strict=True)],
                    [m + scale * e for m, e in zip(mean, err, strict=True)],
                    alpha=0.12,
                )
        if key == "epsilon_max":  # the budget every client's ledger must stay under
            ax.axhline(target, color="grey", linestyle="--", label="target ε")
            ax.set_ylim(bottom=0)
        ax.set_title(budget_label(target))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=8)
    if key == "accuracy":  # a band past 0 or 100 is cut at the axis
        low, high = axes[0][0].get_ylim()
        axes[0][0].set_ylim(max(0.0, low), min(100.0, high))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
