"""`fedpeft simulate | sweep | report | privacy | audit | predict | list`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from fedpeft.config import ConfigError, Spec
from fedpeft.plugins import load_plugins
from fedpeft.registry import UnknownNameError
from fedpeft.spec_io import load_spec, parse_overrides, resolve_spec


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """`--set KEY=VALUE [KEY=VALUE ...]` (repeatable): spec overrides, read by `resolve_spec`."""
    parser.add_argument(
        "--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help=f"override spec keys, e.g. {example}"
    )


def _prepare_out(out: str | None, spec: Spec, resume: bool) -> Path:
    from fedpeft.runfiles import CHECKPOINT, SUMMARY, has_checkpoint

    if out is None:
        if resume:
            raise ConfigError("--resume needs --out DIR: the directory of the run to continue")
        return Path("runs") / f"{spec.name}-{datetime.now():%Y%m%d-%H%M%S}"
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file, not a directory: choose another --out")
    if resume:
        if not has_checkpoint(path):
            raise ConfigError(f"nothing to resume: {path / CHECKPOINT} does not exist")
        return path
    if (path / SUMMARY).exists():
        raise ConfigError(f"{path} already holds a finished run; choose another --out")
    if has_checkpoint(path):
        raise ConfigError(f"{path} holds an unfinished run; add --resume to continue it, or choose another --out")
    return path


def cmd_simulate(args: argparse.Namespace) -> int:
    spec = resolve_spec(args.spec, args.set)  # before any torch import: a bad file or key answers at once
    from fedpeft.catalog import check_names

    check_names(spec)  # torch-free too: an unknown name or a combination that cannot run answers at once
    out = _prepare_out(args.out, spec, args.resume)
    from rich.markup import escape

    from fedpeft.federation import Federation
    from fedpeft.plots import write_run_plot
    from fedpeft.progress import ProgressDisplay, final_table, make_console
    from fedpeft.runfiles import RESULT_FILES, has_checkpoint

    console = make_console()
    fed, privacy = spec.federation, spec.privacy
    modes = (
        [f"DP-SGD epsilon={privacy.epsilon:g}, delta={privacy.delta:g}, C={privacy.clip:g}"] if privacy.enabled else []
    )
    if privacy.client_enabled:
        modes.append(
            f"client-level DP epsilon={privacy.client_epsilon:g}, delta={privacy.delta:g}, S={privacy.client_clip:g}"
        )
    mode = "; ".join(modes) or "privacy off"
    if modes and privacy.noise == "seeded":  # said on screen, not only in summary.json
        mode += " [yellow](seeded noise: reproducible; no protection against anyone holding the spec)[/]"
    scored = (  # why rounds between show "accuracy -"
        "" if fed.eval_every == 1
        else " (scored after the last)" if fed.eval_every >= fed.rounds
        else f" (scored every {fed.eval_every} and after the last)"
    )  # fmt: skip
    if fed.eval_subset and fed.eval_every < fed.rounds:
        scored += f" (rounds before the last scored on {fed.eval_subset} seeded test examples, the last on all)"
    console.print(
        f"[bold]fedpeft[/] {spec.name}: {spec.strategy.name} on {spec.model.name} / {spec.data.name}, "
        f"{fed.clients} clients ({fed.clients_per_round} per round), {fed.rounds} rounds{scored}, {mode}"
    )
    tic = time.perf_counter()
    with console.status("loading model and data, calibrating noise..."):
        federation = Federation.build(spec)
    sizes = [len(c) for c in federation.data.clients]
    line = f"built in {time.perf_counter() - tic:.1f}s: client sizes {min(sizes)}-{max(sizes)}, test {len(federation.data.test)}"
    if federation.sigmas:
        line += f", sigma {min(federation.sigmas):.3f}-{max(federation.sigmas):.3f}"
    console.print(line)
    try:
        with ProgressDisplay(console, fed.rounds * fed.clients_per_round) as progress:
            result = federation.run(out, resume=args.resume, callbacks=progress.callbacks(spec))
    except KeyboardInterrupt:
        if has_checkpoint(out):
            console.print(f"[yellow]interrupted[/]; continue with the same command plus --out {out} --resume")
        else:
            console.print("[yellow]interrupted[/] before the first round finished; nothing was saved")
        return 130
    write_run_plot(result, spec, out)
    console.print(final_table(result.summary, result.history))
    for row in result.summary.get("generations") or []:  # a causal LM: greedy answers, base and federated
        row = {k: escape(" ".join(v.split())[:200]) for k, v in row.items()}  # one line each; the file has all
        console.print(f"[bold]Q[/] {row['prompt']}\n  reference: {row['reference']}\n"
                      f"  base:      {row['base']}\n  federated: {row['federated']}", soft_wrap=True)  # fmt: skip
    exported = "PEFT adapter" if spec.model.adapter == "lora" else f"{spec.model.adapter} adapter"
    console.print(f"results in {out}/ ({', '.join(RESULT_FILES[:3])}, {exported})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    spec = resolve_spec(args.spec, args.set)
    from fedpeft.sweep import run_sweep

    out = Path(args.out) if args.out else Path("runs") / f"sweep-{spec.name}"
    try:
        run_sweep(spec, out)
    except KeyboardInterrupt:
        print(f"interrupted; finished runs are kept: start the same command again to continue ({out})", file=sys.stderr)
        return 130
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedpeft.report import write_report

    paths = write_report([Path(d) for d in args.dir], Path(args.out) if args.out else None, args.baseline or None)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    from fedpeft.privacy.accounting import calibrate_sigma, check_mechanism, epsilon

    check_mechanism(args.q, args.steps, args.delta, args.sigma)
    if args.sigma is not None:
        eps = epsilon(((args.sigma, args.q, args.steps),), args.delta, args.accountant)
        print(
            f"epsilon = {eps:.4f} at delta={args.delta:g} (sigma={args.sigma}, q={args.q}, steps={args.steps}, {args.accountant})"
        )
    else:
        if args.epsilon is None or not math.isfinite(args.epsilon):
            raise ConfigError("give --sigma to compute epsilon, or a finite --epsilon to calibrate sigma")
        sigma = calibrate_sigma(args.epsilon, args.delta, args.q, args.steps, args.accountant)
        print(
            f"sigma = {sigma:.4f} reaches epsilon <= {args.epsilon:g} at delta={args.delta:g} (q={args.q}, steps={args.steps}, {args.accountant})"
        )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import json

    from fedpeft.privacy.audit import AUDIT_SPEC, audit, format_table

    if args.trials < 2:
        raise ConfigError(f"--trials must be >= 2: half pick each test, half measure it (got {args.trials})")
    if args.size < 1 or args.pairs < 0:
        raise ConfigError(f"--size must be >= 1 and --pairs >= 0 (got {args.size}, {args.pairs})")
    bad = [e for e in args.epsilon if not (e > 0 and math.isfinite(e))]
    if bad:
        raise ConfigError(f"--epsilon takes finite claims > 0 (got {bad}); --no-noise runs the control")
    # a spec file, else the tiny audit spec; --set overrides either
    base = load_spec(args.spec) if args.spec else Spec().with_flat(AUDIT_SPEC)
    base = base.with_flat(parse_overrides(args.set)) if args.set else base
    runs = [(f"epsilon {e:g}", base.with_flat({"privacy.epsilon": e}), False) for e in args.epsilon]
    runs += [("control: no noise", base, True)] if args.no_noise else []
    results = []
    for label, spec, control in runs:
        tic = time.perf_counter()

        def progress(done: int, total: int, label: str = label, tic: float = tic) -> None:
            if done == total or done % max(1, total // 10) == 0:
                print(
                    f"  {label}: {done}/{total} trials, {time.perf_counter() - tic:.0f}s", file=sys.stderr, flush=True
                )

        fault = None if control else args.fault
        results.append(audit(spec, args.trials, control, args.size, progress, pairs=args.pairs, fault=fault))
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
        print(f"wrote {args.out}")
    failed = [f"{r.claim:g}: {'; '.join(r.failures)}" for r in results if r.failures]
    for line in failed:
        print(f"FAILED at claim {line}", file=sys.stderr)
    return 1 if failed else 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fedpeft.adapters import EXPORT_META

    run_dir = Path(args.run_dir)
    if not (run_dir / EXPORT_META).is_file():
        raise ConfigError(f"{run_dir} holds no exported model ({EXPORT_META}): give the directory of a finished run")
    texts = list(args.texts)
    if args.file and args.file != "-" and not Path(args.file).is_file():
        raise ConfigError(f"--file {args.file}: no such file")
    if args.file:
        lines = sys.stdin if args.file == "-" else Path(args.file).read_text().splitlines()
        texts += [line.rstrip("\n") for line in lines if line.strip()]
    if not texts:
        raise ConfigError("nothing to predict: give texts as arguments or --file FILE (one text per line, - for stdin)")
    if json.loads((run_dir / EXPORT_META).read_text()).get("task") == "causal-lm":  # prompts in, answers out
        from fedpeft.inference import generate

        for prompt, answer in zip(texts, generate(run_dir, texts), strict=True):
            print(f"{prompt}\t{answer}" if args.tsv else f"Q: {prompt}\nA: {answer}")
        return 0
    from fedpeft.inference import Predictor

    predictor = Predictor(run_dir)
    for p in predictor(texts):
        others = ", ".join(f"{name} {prob:.3f}" for name, prob in p.probabilities.items())
        print(f"{p.label}\t{p.probability:.3f}\t{p.text}" if args.tsv else f"{p.label} ({others}): {p.text}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    # from the catalog and the models' and datasets' registries alone: no torch import
    from fedpeft.catalog import FAMILY_INFO, STRATEGY_INFO
    from fedpeft.data import DATASETS, INSTRUCTION_DATASETS
    from fedpeft.models import MODELS

    causal = [n for n in MODELS.names() if MODELS.get(n).task == "causal-lm"]
    print("models:     " + ", ".join(n for n in MODELS.names() if n not in causal) + "  (classifiers)")
    print("            " + ", ".join(causal) + "  (causal LMs: instruction tuning)")
    print(
        "            or a local directory or Hugging Face id (transformers' Auto classes; README, Your model and data)"
    )
    print("datasets:   " + ", ".join(n for n in DATASETS.names() if n not in INSTRUCTION_DATASETS) + "  (classification)")  # fmt: skip
    print("            " + ", ".join(INSTRUCTION_DATASETS) + "  (instruction: prompt and answer, for causal LMs)")
    print(
        "            or a .csv, .json, .jsonl or .parquet file, a save_to_disk directory or a Hugging Face id ID:CONFIG"
    )
    strategies = sorted(STRATEGY_INFO)
    print("strategies: " + ", ".join(strategies))
    sums = ", ".join(n for n in strategies if STRATEGY_INFO[n].sum_only)
    print(f"            {sums}  (server step uses only the sum: secure aggregation, client-level DP)")
    linear = ", ".join(n for n in strategies if STRATEGY_INFO[n].any_family)
    print("adapters:   " + ", ".join(FAMILY_INFO) + f"  (model.adapter; {linear} runs every family, the rest LoRA)")
    for name, info in FAMILY_INFO.items():
        print(f"  {name:<6} {info.summary}")
    return 0


def cmd_node_ledger(args: argparse.Namespace) -> int:
    from fedpeft.flower.lifetime import ledger_command
    from fedpeft.flower.node import default_state_dir

    return ledger_command(Path(args.state_dir) if args.state_dir else default_state_dir(), args.reset, args.forget)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated, differentially private LoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a simulated federation (default: the quickstart spec)")
    sim.add_argument("spec", nargs="?", help="federation spec (TOML); default simulations/quickstart.toml")
    add_set_argument(sim, "federation.rounds=3 privacy.epsilon=inf")
    sim.add_argument("--out", help="output directory (default runs/NAME-TIMESTAMP)")
    sim.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    sim.set_defaults(func=cmd_simulate)

    swp = sub.add_parser("sweep", help="strategies x epsilons x seeds of a spec's [sweep] table, then the report")
    swp.add_argument("spec", help="federation spec (TOML) with a [sweep] table")
    add_set_argument(swp, "sweep.seeds=[0,1]")
    swp.add_argument("--out", help="output directory (default runs/sweep-NAME); a started sweep continues there")
    swp.set_defaults(func=cmd_sweep)

    rep = sub.add_parser("report", help="tables (CSV, Markdown) and plots of every finished run under DIR")
    rep.add_argument("dir", nargs="+", help="a sweep's (or any) directory of runs; several make one table")
    rep.add_argument("--out", help="where to write the report (default: the first DIR)")
    rep.add_argument("--baseline", action="append", metavar="STRATEGY", help="paired differences against it (repeatable; default fedavg)")  # fmt: skip
    rep.set_defaults(func=cmd_report)

    priv = sub.add_parser("privacy", help="calibrate sigma for a target epsilon, or compute epsilon")
    priv.add_argument("--q", type=float, required=True, help="sampling rate (batch / examples)")
    priv.add_argument("--steps", type=int, required=True, help="number of DP-SGD steps")
    priv.add_argument("--delta", type=float, default=1e-5)
    priv.add_argument("--epsilon", type=float, help="target epsilon (calibrates sigma)")
    priv.add_argument("--sigma", type=float, help="noise multiplier (computes epsilon)")
    priv.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    priv.set_defaults(func=cmd_privacy)

    from fedpeft.privacy.audit import FAULT_NAMES

    aud = sub.add_parser("audit", help="empirical privacy audit: D vs D + canary through a real node's training")
    aud.add_argument("spec", nargs="?", help="federation spec (TOML); default: a tiny one-client spec")
    add_set_argument(aud, "train.local_steps=20")
    aud.add_argument("--epsilon", type=float, nargs="+", default=[2.0], help="claimed epsilons to audit (default 2)")
    aud.add_argument("--trials", type=int, default=200, help="independent trainings per side (default 200)")
    aud.add_argument("--size", type=int, default=32, help="examples in D (default 32)")
    aud.add_argument("--no-noise", action="store_true", help="also run the control: privacy off, must show a leak")
    aud.add_argument("--pairs", type=int, default=10, help="pairs for the noise check and seed replay (default 10)")
    aud.add_argument("--fault", choices=FAULT_NAMES, help="audit a node broken on purpose (the audit's own power)")
    aud.add_argument("--out", help="write the results as JSON here")
    aud.set_defaults(func=cmd_audit)

    pre = sub.add_parser("predict", help="labels and probabilities for texts from a finished run's model (a causal LM: answers to prompts)")  # fmt: skip
    pre.add_argument("run_dir", help="a finished run's directory (it holds the exported adapter)")
    pre.add_argument("texts", nargs="*", help="texts to label")
    pre.add_argument("--file", help="also label each non-empty line of FILE (- for stdin)")
    pre.add_argument("--tsv", action="store_true", help="tab-separated: label, probability, text (or prompt, answer)")
    pre.set_defaults(func=cmd_predict)

    node = sub.add_parser("node", help="a Flower node's own records").add_subparsers(dest="what", required=True)
    led = node.add_parser("ledger", help="each data's lifetime epsilon on this node, and the runs that spent it")
    led.add_argument("--state-dir", help="the node's state-dir (default: $FEDPEFT_STATE_DIR or the per-user one)")
    how = led.add_mutually_exclusive_group()
    how.add_argument("--reset", metavar="DATA", help="restart DATA's per-run view; its history still composes")
    how.add_argument("--forget", metavar="DATA", help="drop DATA's history: only if its rows share none with the old")
    led.set_defaults(func=cmd_node_ledger)

    lst = sub.add_parser("list", help="list registered models, datasets, strategies and adapter families")
    lst.set_defaults(func=cmd_list)
    for command in (sim, swp, aud, pre, lst):  # user code that registers models, datasets, strategies
        command.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE", help="import it first: it registers models, datasets or strategies (fedpeft.plugins)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        load_plugins(getattr(args, "plugin", []))
        return args.func(args)
    except (ConfigError, UnknownNameError, ValueError) as exc:
        if os.environ.get("FEDPEFT_DEBUG"):
            raise
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a directory it may not write: what finished is kept (atomic writes)
        if os.environ.get("FEDPEFT_DEBUG"):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"fedpeft: error: {exc.strerror or exc}{where} (files written before it are intact)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
