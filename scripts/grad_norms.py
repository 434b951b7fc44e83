"""Per-example gradient norms at the start of training, per arm: what DP-SGD's clipping bound C is
compared with. A C far above them leaves every example unclipped and the noise (sigma C per step)
far above the signal; a C near their median is the usual choice.

    .venv/bin/python scripts/grad_norms.py SPEC.toml ARM [ARM ...] [--seed 99] [--examples 64] [--at RUN_DIR]

An ARM is a strategy, or strategy+family (fedavg+core). Each example's gradient is computed alone
(a batch of one) on the tensors the arm trains, from the spec's untrained start, on client 0's data;
the table gives the number of trained values, the norms' 10th, 50th and 90th percentiles, and their
coherence ||mean g_i|| / mean ||g_i|| (1: every example pulls the same way; ~1/sqrt(n): no common
direction). Once every example is clipped, DP-SGD's signal-to-noise per step is about
coherence x batch / (sigma x sqrt(trained values)), whatever C is.
With --at RUN_DIR (one arm), the norms are taken at that run's last checkpointed global adapter
instead: at the start of a LoRA arm B = 0, so A gets no gradient and the norms are those of B alone;
once B has moved they are larger, and a C set at the start's median clips far more.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch


def arm_norms(
    spec_path: str, arm: str, seed: int, examples: int, at: str | None = None
) -> tuple[int, list[float], float]:
    from fedpeft.adapters import logits_of
    from fedpeft.build import build_parts
    from fedpeft.client import example_loss
    from fedpeft.spec_io import load_spec

    strategy, _, family = arm.partition("+")
    flat = {"strategy.name": strategy, "federation.seed": seed} | ({"model.adapter": family} if family else {})
    parts = build_parts(load_spec(spec_path).with_flat(flat))
    model = parts.model
    if at is None:
        model.load(model.state())
    else:
        from pathlib import Path

        from fedpeft.runfiles import load_checkpoint

        model.load(load_checkpoint(Path(at))["progress"]["state"])
    model.set_trainable(set(parts.plan.trains))
    params = list(model.trainable_named().values())
    data = parts.data.clients[0]
    model.module.train()
    norms, total = [], [torch.zeros_like(p) for p in params]
    for i in range(min(examples, len(data))):
        input_ids, mask, labels = data.batch(torch.tensor([i]))
        for p in params:
            p.grad = None
        example_loss(logits_of(model.module(input_ids=input_ids, attention_mask=mask)), labels).backward()
        norms.append(float(torch.sqrt(sum((p.grad**2).sum() for p in params if p.grad is not None))))
        for t, p in zip(total, params, strict=True):
            if p.grad is not None:
                t += p.grad
    mean_norm = float(torch.sqrt(sum((t**2).sum() for t in total))) / len(norms)
    return sum(p.numel() for p in params), sorted(norms), mean_norm / (sum(norms) / len(norms))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("arms", nargs="+")
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--at", metavar="RUN_DIR", help="norms at this run's last global adapter (one arm)")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error("--examples must be >= 1")
    torch.set_num_threads(1)
    print("| arm | trained values | p10 | median | p90 | coherence |\n|---|---:|---:|---:|---:|---:|")
    for arm in args.arms:
        try:
            count, norms, coherence = arm_norms(args.spec, arm, args.seed, args.examples, args.at)
        except (ValueError, OSError) as exc:  # a missing spec, an unknown strategy or family, an impossible pair
            print(f"grad_norms: {arm}: {exc}", file=sys.stderr)
            return 2
        p10, p90 = norms[len(norms) // 10], norms[(9 * len(norms)) // 10]
        median = statistics.median(norms)
        print(f"| {arm} | {count:,} | {p10:.4f} | {median:.4f} | {p90:.4f} | {coherence:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
