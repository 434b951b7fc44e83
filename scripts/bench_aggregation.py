"""Server time per round of every strategy at real model shapes, and FedSVD's factored
re-factorisation against a full SVD of the d_out x d_in product, as a ratio in the same run.

    .venv/bin/python scripts/bench_aggregation.py [--out bench_aggregation.json] [--quick]

Shapes: RoBERTa-large (48 adapted 1024 x 1024 layers: query and value of 24 layers, r = 8) and a
LLaMA-7B-like 4096 x 4096 layer (r = 16; --large-layers of them, 8 by default: fedex and flora keep
dense base-weight changes, 64 MiB per layer). 3 clients per round. Each time is the best of
--repeats runs. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.strategies import STRATEGIES, make_strategy  # noqa: E402
from fedpeft.strategies.linalg import refactor  # noqa: E402

from fedpeft.state import AdapterState, ClientUpdate  # noqa: E402


def make_round(layers: int, d: int, r: int, clients: int, seed: int = 0) -> tuple[AdapterState, list[ClientUpdate]]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        tensors[f"l{i}.lora_A.weight"] = (torch.rand(r, d, generator=g) * 2 - 1) / d**0.5
        tensors[f"l{i}.lora_B.weight"] = torch.randn(d, r, generator=g) * 0.01
    state = AdapterState(tensors, rank=r, alpha=float(r), targets=("q", "v"))
    updates = [
        ClientUpdate(k, 100 + 10 * k, {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in tensors.items()})
        for k in range(clients)
    ]
    return state, updates


def best_of(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def bench_strategies(layers: int, d: int, r: int, clients: int, repeats: int) -> dict[str, float]:
    state, updates = make_round(layers, d, r, clients)
    out = {}
    for name in STRATEGIES.names():
        strategy = make_strategy(name)
        init, server_state = strategy.init(state, seed=0)
        uploads = set(strategy.uploads(init, train_head=False))
        ups = [
            ClientUpdate(u.client_id, u.num_examples, {n: t for n, t in u.tensors.items() if n in uploads})
            for u in updates
        ]
        out[name] = best_of(lambda s=strategy, i=init, u=ups, ss=server_state: s.aggregate(i, u, 1, ss), repeats)
        print(f"  {name:<10} {out[name] * 1e3:10.1f} ms", flush=True)
    return out


def bench_refactor(d: int, r: int, layers: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(d, r, generator=g), (torch.rand(r, d, generator=g) - 0.5) / d**0.5) for _ in range(layers)]
    factored = best_of(lambda: [refactor(b, a) for b, a in pairs], repeats) / layers
    full = (
        best_of(lambda: [torch.linalg.svd(b.double() @ a.double(), full_matrices=False) for b, a in pairs], 1) / layers
    )
    # accuracy: the factored product against the float64 dense product
    b, a = pairs[0]
    b_new, a_new = refactor(b, a)
    err = float((b_new.double() @ a_new.double() - b.double() @ a.double()).norm() / (b.double() @ a.double()).norm())
    return {
        "factored_s_per_layer": factored,
        "full_svd_s_per_layer": full,
        "speedup": full / factored,
        "rel_error": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_aggregation.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large-layers", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    args = parser.parse_args()
    torch.manual_seed(0)
    settings = [
        {"label": "roberta-large 48 x 1024^2, r=8", "layers": 48, "d": 1024, "r": 8, "svd_layers": 3},
        {
            "label": f"llama-7b-like {args.large_layers} x 4096^2, r=16",
            "layers": args.large_layers,
            "d": 4096,
            "r": 16,
            "svd_layers": 1,
        },
    ]
    if args.quick:
        settings = [{"label": "quick 8 x 256^2, r=8", "layers": 8, "d": 256, "r": 8, "svd_layers": 2}]
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
        "clients": 3,
        "settings": [],
    }
    for s in settings:
        print(f"{s['label']}, 3 clients:", flush=True)
        times = bench_strategies(s["layers"], s["d"], s["r"], 3, args.repeats)
        svd = bench_refactor(s["d"], s["r"], s["svd_layers"], args.repeats)
        print(
            f"  fedsvd re-factor per layer: factored {svd['factored_s_per_layer'] * 1e3:.2f} ms, full SVD {svd['full_svd_s_per_layer'] * 1e3:.0f} ms: {svd['speedup']:.0f}x, rel. error {svd['rel_error']:.1e}"
        )
        results["settings"].append({**s, "seconds_per_round": times, "refactor": svd})

    names = STRATEGIES.names()
    print("\n| strategy | " + " | ".join(s["label"] for s in results["settings"]) + " |")
    print("|---|" + "---:|" * len(results["settings"]))
    for name in names:
        print(
            f"| {name} | "
            + " | ".join(f"{s['seconds_per_round'][name] * 1e3:.1f} ms" for s in results["settings"])
            + " |"
        )
    print(
        "| fedsvd re-factor, factored vs full SVD (per layer) | "
        + " | ".join(
            f"{s['refactor']['factored_s_per_layer'] * 1e3:.2f} ms vs {s['refactor']['full_svd_s_per_layer'] * 1e3:.0f} ms ({s['refactor']['speedup']:.0f}x)"
            for s in results["settings"]
        )
        + " |"
    )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
