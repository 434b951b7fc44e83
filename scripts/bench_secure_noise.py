"""The cost of secret noise: one client's DP-SGD round with seeded noise, with the earlier secret noise
(a torch generator seeded from the OS + Opacus secure_mode) and with today's (a 256-bit key, ChaCha20
keystream, Box-Muller, secure_mode's sum of four: what a Flower node uses), in one process,
interleaved, CPU seconds (time.process_time, one thread).

    .venv/bin/python scripts/bench_secure_noise.py [--out docs/benchmarks/secure-noise-cpu.json] [--repeats 7]

Models: MiniLM cut to 2 layers and all 6 layers (LoRA r=8 on query/value, trained head, FedSVD's
trainable set: B and head), rotten-tomatoes, batch 32, 10 local steps. Reports the median and
range of the per-repeat ratios keyed / seeded and keyed / the earlier secret noise, and seconds per step.
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


def noise_draws(repeats: int) -> dict:
    """The noise alone: one secure_mode draw of d numbers (d = 24,576, MiniLM 2 layers' rank-8 query and
    value factors; and 10x that), from a seeded torch generator and from a key's ChaCha20 stream."""
    import torch

    from fedpeft.privacy.randomness import SecretKey, TorchSource

    row: dict = {"model": "noise draw only"}
    for d in (24_576, 245_760):
        times: dict[str, list[float]] = {"torch-secure": [], "keyed": []}
        for _ in range(repeats):
            for arm, source in (("torch-secure", TorchSource(torch.Generator().manual_seed(0))),
                                ("keyed", SecretKey.draw().stream("noise"))):  # fmt: skip
                tic = time.process_time()
                for _ in range(20):
                    source.normal(1.0, (d,), True, "cpu")
                times[arm].append((time.process_time() - tic) / 20)
        for arm, ts in times.items():
            row[f"{arm}_ms_d{d}"] = statistics.median(ts) * 1e3
    print("noise draw only   " + "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "model"), flush=True)
    return row


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
    from fedpeft.privacy.randomness import SecretKey
    from fedpeft.spec_io import default_spec

    rows = [noise_draws(args.repeats)]
    for layers in (2, 6):
        spec = default_spec().with_flat(
            {
                "model.layers": layers,
                "data.max_examples": 3000,
                "data.test_size": 100,
                "train.local_steps": args.steps,
                "train.batch_size": 32,
            }
        )
        fed = Federation.build(spec)
        state, data = fed.model.state(), fed.data.clients[0]
        arms = ("seeded", "torch-secure", "keyed")
        times: dict[str, list[float]] = {a: [] for a in arms}
        for repeat in range(args.repeats + 1):  # the first round of arms warms up
            for arm in arms[repeat % 3 :] + arms[: repeat % 3]:  # rotate the order
                budget = client_budget(spec, 0, len(data))
                seed = SecretKey.draw() if arm == "keyed" else repeat
                tic = time.process_time()
                client_round(fed.model, state, data, fed.plan, client_id=0, seed=seed, budget=budget,
                             clip=spec.privacy.clip, secure=arm != "seeded")  # fmt: skip
                if repeat:
                    times[arm].append(time.process_time() - tic)
        row = {"model": f"minilm-{layers}-layers", "steps": args.steps}
        for arm in arms:
            row[f"{arm}_s_per_step"] = statistics.median(times[arm]) / args.steps
        for base in ("seeded", "torch-secure"):
            ratios = [k / b for k, b in zip(times["keyed"], times[base], strict=True)]
            row[f"keyed_over_{base}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        rows.append(row)
        print(
            f"{row['model']:18s} "
            + "  ".join(f"{a} {row[f'{a}_s_per_step'] * 1e3:6.1f} ms/step" for a in arms)
            + "  keyed/seeded {median:.3f} ({min:.3f}-{max:.3f})".format(**row["keyed_over_seeded"])
            + "  keyed/torch-secure {median:.3f} ({min:.3f}-{max:.3f})".format(**row["keyed_over_torch-secure"]),
            flush=True,
        )
    out = {"machine": platform.platform(), "cpus": 1, "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
