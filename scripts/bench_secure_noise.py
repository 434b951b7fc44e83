"""The cost of secret noise: one client's DP-SGD round with seeded noise against the same round with
secret noise (OS-seeded generator + Opacus secure_mode, what a Flower node uses), in one process,
interleaved, CPU seconds (time.process_time, one thread).

    .venv/bin/python scripts/bench_secure_noise.py [--out docs/benchmarks/secure-noise-cpu.json] [--repeats 7]

Models: MiniLM cut to 2 layers and all 6 layers (LoRA r=8 on query/value, trained head, FedSVD's
trainable set: B and head), rotten-tomatoes, batch 32, 10 local steps. Reports the median and
range of the per-repeat ratio secret / seeded, and seconds per step.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "secure-noise-cpu.json"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from fedpeft.build import client_budget
    from fedpeft.client import client_round
    from fedpeft.federation import Federation
    from fedpeft.spec_io import default_spec

    rows = []
    for layers in (2, 6):
        spec = default_spec().with_flat(
            {"model.layers": layers, "data.max_examples": 3000, "data.test_size": 100, "train.local_steps": args.steps}
        )
        fed = Federation.build(spec)
        state, data = fed.model.state(), fed.data.clients[0]
        times: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(args.repeats + 1):  # the first pair warms up
            for secure in (False, True) if repeat % 2 else (True, False):  # alternate the order
                budget = client_budget(spec, 0, len(data))
                tic = time.process_time()
                client_round(fed.model, state, data, fed.plan, client_id=0, seed=repeat, budget=budget,
                             clip=spec.privacy.clip, secure=secure)  # fmt: skip
                if repeat:
                    times[secure].append(time.process_time() - tic)
        ratios = [s / p for s, p in zip(times[True], times[False], strict=True)]
        row = {
            "model": f"minilm-{layers}-layers",
            "steps": args.steps,
            "seeded_s_per_step": statistics.median(times[False]) / args.steps,
            "secret_s_per_step": statistics.median(times[True]) / args.steps,
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        rows.append(row)
        print(
            f"{row['model']:18s} seeded {row['seeded_s_per_step'] * 1e3:7.1f} ms/step  secret {row['secret_s_per_step'] * 1e3:7.1f}"
            f" ms/step  ratio {row['ratio_median']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})",
            flush=True,
        )
    out = {"machine": platform.platform(), "cpus": 1, "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
