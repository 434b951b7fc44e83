"""What a private federation costs beyond its training: a whole `fedpeft simulate` run against a
plain centralised PEFT LoRA loop over the same examples, batch size and number of steps.

    .venv/bin/python scripts/bench_overhead.py [--full] [--repeats 3] [--cache cold|warm] [--set KEY=VALUE] [--out FILE]

Default spec: the quickstart cut to 4 rounds (`--full`: the quickstart itself). The plain loop: one
AdaptedModel, the strategy's trainable set, the spec's optimizer (torch's own, no DP) at its
learning rate, rounds x clients_per_round x local_steps steps of batch_size examples drawn from the
union of the clients' data, then one evaluation on the same test split. Both run in this process, one thread,
interleaved (the order alternates), timed in CPU seconds; `--cache cold` gives every federation a
fresh accounting cache (its first run on a machine), `warm` keeps it. Prints the ratio plain /
federation (1.0: the federation costs only its training) with its median and range, and the
federation's time by phase: build, calibration, training (and, within it, wrapping each client's
model and optimizer for DP-SGD and unwrapping it), evaluation, checkpoint, export, plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(phases: dict, name: str, fn):  # noqa: ANN001, ANN202
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        tic = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] += time.process_time() - tic

    return wrapper


def federation_run(spec, out: Path) -> tuple[float, dict[str, float]]:  # noqa: ANN001
    """CPU seconds of a whole run (what `fedpeft simulate` does after parsing), and its phases."""
    import opacus
    import opacus.optimizers

    import fedpeft.build as build
    import fedpeft.federation as federation
    import fedpeft.privacy.accounting as accounting
    import fedpeft.runfiles as runfiles
    from fedpeft.adapters import AdaptedModel
    from fedpeft.plots import plot_run

    phases: dict[str, float] = defaultdict(float)
    originals = (build.client_budget, runfiles.save_checkpoint, runfiles.write_rounds, AdaptedModel.export)
    build.client_budget = _timed(phases, "calibration", build.client_budget)
    runfiles.save_checkpoint = _timed(phases, "checkpoint", runfiles.save_checkpoint)
    runfiles.write_rounds = _timed(phases, "checkpoint", runfiles.write_rounds)
    AdaptedModel.export = _timed(phases, "export", AdaptedModel.export)
    accounting.epsilon.cache_clear()
    accounting.calibrate_sigma.cache_clear()
    # inside training: wrapping each client's model and optimizer for DP-SGD and unwrapping it
    wrap: dict[str, float] = defaultdict(float)
    module, optimizer, unwrap = (
        opacus.GradSampleModule,
        opacus.optimizers.DPOptimizer,
        opacus.GradSampleModule.to_standard_module,
    )
    opacus.GradSampleModule = _timed(wrap, "wrap", module)
    opacus.optimizers.DPOptimizer = _timed(wrap, "wrap", optimizer)
    module.to_standard_module = _timed(wrap, "wrap", unwrap)
    try:
        tic = time.process_time()
        fed = federation.Federation.build(spec)
        phases["build"] = time.process_time() - tic - phases["calibration"]
        fed.executor.run_round = _timed(phases, "training", fed.executor.run_round)
        fed._evaluate = _timed(phases, "evaluation", fed._evaluate)
        result = fed.run(out)
        _timed(phases, "plot", plot_run)(
            result.history, out / "accuracy.png", spec.name, result.summary["majority_rate"]
        )
        total = time.process_time() - tic
    finally:
        build.client_budget, runfiles.save_checkpoint, runfiles.write_rounds, AdaptedModel.export = originals
        opacus.GradSampleModule, opacus.optimizers.DPOptimizer, module.to_standard_module = module, optimizer, unwrap
    phases["other"] = total - sum(phases.values())
    phases["  of training: Opacus wrap+unwrap"] = wrap["wrap"]  # already in training, not in the sum
    return total, dict(phases)


def plain_loop(spec) -> float:  # noqa: ANN001
    """CPU seconds of the centralised PEFT loop with the federation's examples, batch and steps."""
    import torch
    import torch.nn.functional as F

    from fedpeft.build import build_parts
    from fedpeft.client import evaluate
    from fedpeft.optim import LocalOptimizer

    tic = time.process_time()
    parts = build_parts(spec)
    model, data, plan = parts.model, parts.data, parts.plan
    pool = torch.cat([torch.arange(len(c)) + sum(len(x) for x in data.clients[:i]) for i, c in enumerate(data.clients)])
    ids = torch.cat([c.input_ids for c in data.clients])
    mask = torch.cat([c.attention_mask for c in data.clients])
    labels = torch.cat([c.labels for c in data.clients])
    model.set_trainable(set(plan.trains))
    optimizer = LocalOptimizer.from_spec(spec.train, spec.federation.rounds).build(model.trainable_parameters())
    g = torch.Generator().manual_seed(spec.federation.seed)
    fed = spec.federation
    model.module.train()
    for _ in range(fed.rounds * fed.clients_per_round * plan.steps):
        index = pool[torch.randint(len(pool), (plan.batch_size,), generator=g)]
        width = int(mask[index].sum(1).max())
        optimizer.zero_grad(set_to_none=True)
        logits = model.forward(ids[index, :width], mask[index, :width])
        F.cross_entropy(logits, labels[index]).backward()
        optimizer.step()
    evaluate(model, model.state(), data.test, spec.train.eval_batch_size)
    return time.process_time() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the quickstart itself (24 rounds)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", choices=("cold", "warm"), default="cold")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a spec override, e.g. "
                        "federation.eval_every=5 (both sides run the overridden spec)")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from fedpeft.spec_io import default_spec, parse_overrides

    spec = default_spec()
    if not args.full:
        spec = spec.with_flat({"federation.rounds": 4})
    spec = spec.with_flat(parse_overrides(args.set))
    ratios, feds, plains, phases = [], [], [], defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="fedpeft-bench-") as tmp:
        for rep in range(args.repeats):
            if args.cache == "cold":
                os.environ["FEDPEFT_CACHE_DIR"] = str(Path(tmp) / f"cache-{rep}")
            order = ("fed", "plain") if rep % 2 == 0 else ("plain", "fed")
            times = {}
            for which in order:
                if which == "fed":
                    times["fed"], ph = federation_run(spec, Path(tmp) / f"run-{rep}")
                    for k, v in ph.items():
                        phases[k].append(v)
                else:
                    times["plain"] = plain_loop(spec)
            feds.append(times["fed"])
            plains.append(times["plain"])
            ratios.append(times["plain"] / times["fed"])
            print(f"repeat {rep}: federation {times['fed']:.1f} s, plain loop {times['plain']:.1f} s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)  # fmt: skip
    total = statistics.median(feds)
    breakdown = {k: statistics.median(v) for k, v in phases.items()}
    print(f"\nplain / federation: median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}), "
          f"{args.repeats} repeats, cache {args.cache}")  # fmt: skip
    print(f"{'phase':34s} {'CPU s':>8s} {'share':>7s}")
    for k, v in sorted(breakdown.items(), key=lambda kv: (kv[0].startswith(" "), -kv[1])):
        print(f"{k:34s} {v:8.2f} {100 * v / total:6.1f}%")
    name = ("overhead-quickstart" if args.full else "overhead-quickstart-4round") + "".join(
        "-" + item.replace("federation.", "").replace("=", "").replace("_", "-") for item in args.set
    )
    out = Path(args.out) if args.out else ROOT / "docs" / "benchmarks" / f"{name}-{args.cache}-cpu.json"
    out.write_text(json.dumps({
        "machine": platform.platform(), "threads": 1, "spec": spec.to_dict(), "cache": args.cache, "set": args.set,
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "federation_cpu_s": feds, "plain_cpu_s": plains, "phases_median_cpu_s": breakdown,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
