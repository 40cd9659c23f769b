"""Adam's step on the fp32 master weights: torch's default kernel against the fused one.

Under bf16 and ZeRO, DeepSpeed keeps each engine's fp32 master weights as one flat partition
per rank and calls the client optimiser (`engine.build_engine`'s torch Adam) on it once per
step. This times exactly that call, on one flat fp32 tensor per network of the 128 preset's
parameter count (E and G of Table 3 at 128 px, latent 256) with a gradient attached, for
`foreach` (torch's default on CPU tensors) and `fused` (`encoder/generator.fused_adam`).
Rounds alternate the variants after a warm-up step each (`step_throughput.run_rounds`); medians
over the rounds in which both had the cores (`--min-cpu-share`).

    python bench/optimizer_step.py
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from step_throughput import (
    median_wall_s,
    rounds_for_medians,
    run_rounds,
    seeded_networks,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-cpu-share", type=float, default=0.9,
                        help="leave out rounds where a variant had less of the cores")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    sizes = [sum(p.numel() for p in net.parameters()) for net in seeded_networks(128, checkpointing=False)]
    variants = {}
    for name, kwargs in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        flats = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
        for flat in flats:
            flat.grad = torch.randn_like(flat)
        optimizer = torch.optim.Adam(flats, lr=2e-4, **kwargs)
        optimizer.step()  # warm-up: creates the moments
        variants[name] = optimizer
    times = run_rounds({name: opt.step for name, opt in variants.items()}, warmup_steps=0, steps=args.rounds)
    rounds, note = rounds_for_medians(times, args.min_cpu_share)
    print(f"# python bench/optimizer_step.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
          f"# torch {torch.__version__}, {torch.get_num_threads()} threads; flat fp32 partitions of "
          f"{sizes[0] / 1e6:.1f} M (E) and {sizes[1] / 1e6:.1f} M (G) parameters, {args.rounds} rounds")
    print(note)
    medians = median_wall_s(times, rounds)
    print("| Adam kernel | ms per step (E + G) | vs foreach |")
    print("|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {1000 * median:.1f} | {medians['foreach'] / median:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
