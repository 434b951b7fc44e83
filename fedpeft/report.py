"""Results from files: tables and plots of a sweep (`fedpeft report`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from fedpeft.plots import budget_label, plot_accuracy_vs_epsilon, plot_per_epsilon

__all__ = ["collect", "markdown", "run_label", "summarise", "write_report"]

INF = float("inf")


def _target(summary: dict[str, Any]) -> float:
    eps = summary.get("target_epsilon")
    return INF if eps is None else float(eps)


def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def run_label(strategy: str, adapter: str | None, client_epsilon: float | None = None) -> str:
    """How tables name a run: its strategy, with `+family` for an adapter family other than LoRA
    and the client-level target epsilon when client-level DP is on (columns are sample-level)."""
    label = strategy if adapter in (None, "lora") else f"{strategy}+{adapter}"
    return label if client_epsilon is None else f"{label} (client ε={client_epsilon:g})"


# what every table reads of a run's summary.json
REQUIRED = ("strategy", "accuracy", "seed", "majority_rate", "bytes_up", "bytes_down", "seconds")


def collect(directory: Path) -> list[dict[str, Any]]:
    """Every finished run under `directory` (a summary.json, its rounds.jsonl beside it)."""
    runs = []
    for path in sorted(Path(directory).rglob("summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not readable JSON ({exc}); remove it or re-run that cell") from None
        missing = [k for k in REQUIRED if not isinstance(summary, dict) or k not in summary]
        if missing:
            raise ValueError(
                f"{path} is not a fedpeft summary (no {', '.join(missing)}); remove it or re-run that cell"
            )
        rounds_file = path.with_name("rounds.jsonl")
        history = [json.loads(line) for line in rounds_file.read_text().splitlines()] if rounds_file.exists() else []
        label = run_label(summary["strategy"], summary.get("adapter"), summary.get("client_target_epsilon"))
        runs.append(
            {**summary, "strategy": label, "target": _target(summary), "history": history, "dir": str(path.parent)}
        )
    sweep_file = Path(directory) / "sweep.json"
    if sweep_file.exists():  # a sweep's tables list strategies (and families) in the order its spec gives
        spec = json.loads(sweep_file.read_text())
        sweep = spec.get("sweep", {})
        adapters = sweep.get("adapters") or [spec.get("model", {}).get("adapter")]
        strategies = sweep.get("strategies") or [spec.get("strategy", {}).get("name")]
        clients = [None if math.isinf(float(c)) else float(c) for c in sweep.get("client_epsilons") or ["inf"]]
        order = [run_label(s, a, c) for c in clients for a in adapters for s in strategies]
        runs.sort(key=lambda r: order.index(r["strategy"]) if r["strategy"] in order else len(order))
    return runs


def _sd(values: list[float]) -> float:
    """The sample standard deviation (n - 1); nan for fewer than two values."""
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _ci95(values: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t); nan for one value."""
    if len(values) < 2:
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1)) * _sd(values) / math.sqrt(len(values))


def _order(runs: list[dict[str, Any]]) -> tuple[list[str], list[float]]:
    """Strategies in the order runs were collected; budgets: no DP first, then epsilon descending."""
    strategies = list(dict.fromkeys(r["strategy"] for r in runs))
    targets = sorted({r["target"] for r in runs}, reverse=True)  # inf sorts first
    return strategies, targets


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (strategy, target epsilon): mean and 95% CI of final accuracy over seeds,
    epsilon actually spent, bytes communicated and wall time (means over seeds)."""
    strategies, targets = _order(runs)
    rows = []
    for strategy in strategies:
        for target in targets:
            cell = [r for r in runs if r["strategy"] == strategy and r["target"] == target]
            if not cell:
                continue
            acc = [r["accuracy"] for r in cell]
            last3 = [r.get("accuracy_last3") for r in cell]
            change = [r.get("adapter_change") for r in cell]
            spent = [r["epsilon"] for r in cell if r.get("epsilon") is not None]
            trained = [r.get("trained_parameters") for r in cell]
            client = [r["client_epsilon"] for r in cell if r.get("client_epsilon") is not None]
            rows.append(
                {
                    "strategy": strategy,
                    "epsilon": eps_label(target),
                    "seeds": len(cell),
                    "accuracy_mean": sum(acc) / len(acc),
                    "accuracy_ci95": _ci95(acc),
                    "accuracy_min": min(acc),
                    "accuracy_max": max(acc),
                    "accuracy_last3_mean": _mean_or_nan(last3),
                    "accuracy_last3_ci95": _ci95(last3) if None not in last3 else math.nan,
                    "adapter_change": _mean_or_nan(change),  # mean ||W - W0|| / ||W0|| at the end
                    "trained_parameters": _mean_or_nan(trained),  # per client
                    "epsilon_spent": max(spent) if spent else None,
                    "client_epsilon": max(client) if client else None,  # client-level, of the run
                    "majority_rate": _mean_or_nan([r["majority_rate"] for r in cell]),  # nan: a causal LM
                    "base_accuracy": _mean_or_nan([r.get("base_accuracy") for r in cell]),  # a causal LM's base
                    "loss_mean": _mean_or_nan([r.get("loss") for r in cell]),
                    "base_loss": _mean_or_nan([r.get("base_loss") for r in cell]),
                    **_gains(cell),
                    "mbytes_up": sum(r["bytes_up"] for r in cell) / len(cell) / 1e6,
                    "mbytes_down": sum(r["bytes_down"] for r in cell) / len(cell) / 1e6,
                    "seconds": sum(r["seconds"] for r in cell) / len(cell),
                }
            )
    return rows


def _gains(cell: list[dict[str, Any]]) -> dict[str, float]:
    """A causal LM's final - base token accuracy and answer loss, paired by seed (each seed has its
    own test split): mean and 95% CI (nan for a classifier)."""
    diffs = {k: [r[k] - r[f"base_{k}"] for r in cell if r.get(f"base_{k}") is not None] for k in ("accuracy", "loss")}
    means = {f"{k}_gain_mean": sum(d) / len(d) if d else math.nan for k, d in diffs.items()}
    return means | {f"{k}_gain_ci95": _ci95(d) for k, d in diffs.items()}


def _mean_or_nan(values: list[float | None]) -> float:
    return math.nan if not values or None in values else sum(values) / len(values)


def detectable(diffs: list[float], power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true mean paired difference a two-sided paired t-test at `alpha` detects with
    probability `power`, at the spread of `diffs` and their number: (t_{1-alpha/2} + t_power) sd / sqrt(n)
    (the usual normal-approximation formula with Student t quantiles); nan below 2 values."""
    n = len(diffs)
    if n < 2:
        return math.nan
    from scipy.stats import t

    return float(t.ppf(1 - alpha / 2, n - 1) + t.ppf(power, n - 1)) * _sd(diffs) / math.sqrt(n)


def _pm(mean: float, ci: float) -> str:
    return f"{100 * mean:.1f}" + ("" if math.isnan(ci) else f" ± {100 * ci:.1f}")


def _byte_unit(megabytes: list[float]) -> tuple[str, float]:
    """The largest of MB, kB, B in which the biggest value is at least 1 (so no column reads 0.0),
    and the factor from MB to it."""
    top = max(megabytes, default=0.0)
    for unit, per_mb in (("MB", 1.0), ("kB", 1e3)):
        if top >= 1 / per_mb:
            return unit, per_mb
    return "B", 1e6


def _lm_table(rows: list[dict[str, Any]]) -> str:
    """A causal LM's scores against its base model, paired by seed."""
    base = sum(r["base_accuracy"] for r in rows) / len(rows)
    lines = [
        f"Base model (no adapter), mean over the seeds' test splits: token accuracy {100 * base:.1f}%, answer loss "
        f"{sum(r['base_loss'] for r in rows) / len(rows):.3f}. Change from the base model, paired by seed "
        "(mean ± 95% CI; a CI that excludes 0 is a measured change):",
        "",
        "| strategy | ε target | seeds | answer loss | change | token accuracy (%) | change (points) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        loss_ci = "" if math.isnan(r["loss_gain_ci95"]) else f" ± {r['loss_gain_ci95']:.3f}"
        sign = "+" if r["accuracy_gain_mean"] >= 0 else ""
        lines.append(
            f"| {r['strategy']} | {r['epsilon']} | {r['seeds']} | {r['loss_mean']:.3f} | {r['loss_gain_mean']:+.3f}"
            f"{loss_ci} | {_pm(r['accuracy_mean'], r['accuracy_ci95'])} | "
            f"{sign}{_pm(r['accuracy_gain_mean'], r['accuracy_gain_ci95'])} |"
        )
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]]) -> str:
    """A paper-style table (accuracy per strategy and epsilon) and the detailed table."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    # no DP first, then epsilon descending (float("inf") parses the "inf" label)
    targets = list(dict.fromkeys(r["epsilon"] for r in sorted(rows, key=lambda r: -float(r["epsilon"]))))
    by = {(r["strategy"], r["epsilon"]): r for r in rows}
    head = ["strategy"] + [budget_label(float(e)) for e in targets]
    lines = [
        "Final test accuracy (%), mean ± 95% CI over seeds:",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(targets),
    ]
    for s in strategies:
        cells = [_pm(by[s, e]["accuracy_mean"], by[s, e]["accuracy_ci95"]) if (s, e) in by else "" for e in targets]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    majority = sum(r["majority_rate"] for r in rows) / len(rows)
    if math.isnan(majority):  # a causal LM: accuracy is of the answer tokens; the base model is the reference
        lines[0] = "Final token accuracy of the test answers (%), mean ± 95% CI over seeds:"
        lines += ["", _lm_table(rows), ""]
    else:
        lines += ["", f"Majority-class rate of the test splits: {100 * majority:.1f}%.", ""]
    unit, per_mb = _byte_unit([v for r in rows for v in (r["mbytes_up"], r["mbytes_down"])])
    lines += [
        "Last 3 rounds: the mean accuracy of the last three evaluated rounds. ‖ΔW‖/‖W0‖: how far the final "
        "adapter moves the adapted weights (mean over layers). Trained: parameters each client trains. "
        f"{unit} up and down: the whole run's traffic, all clients.",
        "",
        f"| strategy | ε target | seeds | accuracy (%) | min–max | last 3 rounds (%) | ‖ΔW‖/‖W0‖ | trained "
        f"| ε spent (max) | client-level ε | {unit} up | {unit} down | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        spent = "–" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
        last3 = "–" if math.isnan(r["accuracy_last3_mean"]) else _pm(r["accuracy_last3_mean"], r["accuracy_last3_ci95"])
        change = "–" if math.isnan(r["adapter_change"]) else f"{r['adapter_change']:.2g}"
        client = "–" if r.get("client_epsilon") is None else f"{r['client_epsilon']:.2f}"
        trained = "–" if math.isnan(r.get("trained_parameters", math.nan)) else f"{r['trained_parameters']:,.0f}"
        lines.append(
            f"| {r['strategy']} | {r['epsilon']} | {r['seeds']} | {_pm(r['accuracy_mean'], r['accuracy_ci95'])} | "
            f"{100 * r['accuracy_min']:.1f}–{100 * r['accuracy_max']:.1f} | {last3} | {change} | {trained} | {spent} | {client} | "
            f"{per_mb * r['mbytes_up']:.3g} | {per_mb * r['mbytes_down']:.3g} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def paired(runs: list[dict[str, Any]], baseline: str, key: str = "accuracy", what: str = "final accuracy") -> str:
    """Markdown: each strategy minus `baseline` in `key`, paired by seed (same data split and
    client sampling), per budget: mean difference in points with its 95% CI, how many seeds favour
    it, and the design's power: the smallest difference it detects (`detectable`, 80%, 5%)."""
    strategies, targets = _order(runs)
    acc = {(r["strategy"], r["target"], r["seed"]): r.get(key) for r in runs if r.get(key) is not None}
    head = ["strategy"] + [budget_label(t) for t in targets]
    lines = [
        f"Difference to {baseline} in {what}, points, paired by seed (mean ± 95% CI; seeds where it is ahead; "
        "MDE = the smallest true difference this many seeds detect with 80% power at the 5% level, at the "
        "observed spread):",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(targets),
    ]
    for strategy in strategies:
        if strategy == baseline:
            continue
        cells = []
        for t in targets:
            seeds = sorted(s for (name, tt, s) in acc if name == strategy and tt == t and (baseline, t, s) in acc)
            d = [100 * (acc[strategy, t, s] - acc[baseline, t, s]) for s in seeds]
            if not d:
                cells.append("")
                continue
            ci, mde = _ci95(d), detectable(d)
            cells.append(
                f"{sum(d) / len(d):+.1f}"
                + ("" if math.isnan(ci) else f" ± {ci:.1f}")
                + f" ({sum(x > 0 for x in d)}/{len(d)}"
                + ("" if math.isnan(mde) else f"; MDE {mde:.1f}")
                + ")"
            )
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    directory: Path | list[Path], out: Path | None = None, baselines: list[str] | None = None
) -> dict[str, Path]:
    """Tables (CSV, Markdown) and plots (PNG) of every finished run under `directory` (or under
    each of several, e.g. a sweep and its ablation: one table; written to `out`, default the first)."""
    directories = [Path(d) for d in directory] if isinstance(directory, list) else [Path(directory)]
    out = Path(out) if out is not None else directories[0]
    runs = [run for d in directories for run in collect(d)]
    if not runs:
        raise ValueError(f"no finished runs (summary.json) under {', '.join(map(str, directories))}")
    rows = summarise(runs)
    strategies = [r["strategy"] for r in rows]
    unknown = [b for b in baselines or [] if b not in strategies]
    if unknown:  # before anything is written
        raise ValueError(
            f"baseline {unknown[0]!r} is not a strategy of these runs ({', '.join(dict.fromkeys(strategies))})"
        )
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "markdown": out / "results.md"}
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows)
    comparable = len(set(strategies)) > 1 and any("seed" in r for r in runs)
    for baseline in (baselines or ["fedavg" if "fedavg" in strategies else strategies[0]]) if comparable else []:
        text += "\n" + paired(runs, baseline)
        if all(r.get("accuracy_last3") is not None for r in runs):
            text += "\n" + paired(runs, baseline, "accuracy_last3", "accuracy over the last 3 rounds")
    paths["markdown"].write_text(text)
    paths["accuracy_vs_epsilon"] = out / "accuracy_vs_epsilon.png"
    plot_accuracy_vs_epsilon(rows, *_order(runs), paths["accuracy_vs_epsilon"])
    paths["accuracy_vs_round"] = out / "accuracy_vs_round.png"
    plot_per_epsilon(runs, *_order(runs), "accuracy", "test accuracy (%), mean ± std. error", paths["accuracy_vs_round"],
                     scale=100)  # fmt: skip
    if any(not math.isinf(r["target"]) for r in runs):
        paths["epsilon_vs_round"] = out / "epsilon_vs_round.png"
        plot_per_epsilon(runs, *_order(runs), "epsilon_max", "epsilon spent (max over clients), mean",
                         paths["epsilon_vs_round"], skip_inf=True)  # fmt: skip
    return paths
