"""Tokens per second of private (DP-SGD through Opacus) against plain local training of a causal
LM, on the instruction-tuning spec's model, data and batch.

    .venv/bin/python scripts/bench_instruct.py [--spec simulations/instruct.toml] [--repeats 3] [--out FILE]

One AdaptedModel (the spec's), the largest client's data, the strategy's trainable set, the spec's
local steps and batch. Each repetition trains the client once without DP and once with DP-SGD at
the spec's calibrated sigma, from the same start and seed (so on the same Poisson batches), in an
order that alternates, one thread, timed in CPU seconds. Prints the tokens (and answer tokens) per
CPU second of each and the ratio private / plain, median and range; writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "simulations" / "instruct.toml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "instruct-cpu.json"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from fedpeft.build import build_parts, client_budget
    from fedpeft.causal import IGNORE
    from fedpeft.client import DPSGD, poisson_batches, train_client
    from fedpeft.privacy.accounting import sample_rate
    from fedpeft.spec_io import load_spec

    spec = load_spec(args.spec)
    tic = time.process_time()
    parts = build_parts(spec)
    build_s = time.process_time() - tic
    cid, data = max(enumerate(parts.data.clients), key=lambda c: len(c[1]))
    start, _ = parts.strategy.init(parts.model.state(), spec.federation.seed)
    sigma = client_budget(spec, cid, len(data)).sigma
    plan, seed = parts.plan, 3
    batches = poisson_batches(len(data), sample_rate(plan.batch_size, len(data)), plan.steps,
                              torch.Generator().manual_seed(seed))  # fmt: skip  # what train_client draws
    tokens = sum(int(data.attention_mask[b].sum()) for b in batches)
    answer = sum(int((data.labels[b] != IGNORE).sum()) for b in batches)
    seconds: dict[str, list[float]] = {"plain": [], "dp": []}
    for rep in range(args.repeats):
        for kind in ("plain", "dp") if rep % 2 == 0 else ("dp", "plain"):
            dp = DPSGD(sigma, spec.privacy.clip) if kind == "dp" else None
            tic = time.process_time()
            train_client(parts.model, start, data, plan, client_id=cid, seed=seed, dp=dp)
            seconds[kind].append(time.process_time() - tic)
            print(f"repeat {rep + 1}/{args.repeats} {kind:>5}: {seconds[kind][-1]:.1f} CPU s", flush=True)
    ratios = [p / d for p, d in zip(seconds["plain"], seconds["dp"], strict=True)]
    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
        "spec": args.spec, "model": spec.model.name, "layers": spec.model.layers or "all", "client": cid,
        "client_examples": len(data), "steps": plan.steps, "batch_size": plan.batch_size, "sigma": sigma,
        "clip": spec.privacy.clip, "trains": sorted(plan.trains), "tokens": tokens, "answer_tokens": answer,
        "build_cpu_s": build_s, "cpu_s": seconds,
        "tokens_per_cpu_s": {k: tokens / statistics.median(v) for k, v in seconds.items()},
        "answer_tokens_per_cpu_s": {k: answer / statistics.median(v) for k, v in seconds.items()},
        "private_vs_plain_median": statistics.median(ratios), "private_vs_plain_range": [min(ratios), max(ratios)],
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    t = result["tokens_per_cpu_s"]
    print(f"{tokens} tokens ({answer} answer tokens) in {plan.steps} steps of batch {plan.batch_size}: plain "
          f"{t['plain']:.1f} tokens / CPU s, DP-SGD {t['dp']:.1f}; private / plain speed "
          f"{result['private_vs_plain_median']:.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}); wrote {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
