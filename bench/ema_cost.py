"""What the weights' moving average (ema.*, introvae_dist.ema) costs per training step, against
the step itself, on the 128 preset's networks through real DeepSpeed engines (issue 16, item 1:
target under 2% of the step).

    python bench/ema_cost.py
    python bench/ema_cost.py --resolution-px 128 --batch 8 --zero-stage 3 --steps 5
    python bench/ema_cost.py --device cuda --batch 64

One process, a world of one, the precision `auto` picks on this device. After warm-up, rounds
alternate the two calls: one `train_step` (Algorithm 1, both optimiser steps) and one
`TrainingEMA.update` of both networks (what the trainer adds per step). The medians and their
ratio are reported; under ZeRO-3 the update runs on this rank's partition, as in training.
"""

from __future__ import annotations

import argparse
import statistics

from device import add_device_arguments, describe, require_device, timed
from step_throughput import LATENT_DIM, Setup, build_variant, step_inputs, train_step_call

from introvae_dist.config import EmaConfig
from introvae_dist.ema import TrainingEMA
from introvae_dist.precision import bf16_support, choose, fp16_support


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution-px", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="images per step (default: the paper's 8)")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=2)
    add_device_arguments(parser, convolutions=False)
    args = parser.parse_args()
    device = require_device(args.device, "bench/ema_cost.py")

    from introvae_dist import engine

    engine.init_distributed()
    precision = choose("auto", bf16_support(device), fp16_support(device)).chosen
    setup = Setup(args.resolution_px, args.batch, args.zero_stage, checkpointing=True)
    enc, gen = build_variant(setup, precision, fused_adam=True)  # type: ignore[arg-type]
    x, noise = step_inputs(args.resolution_px, args.batch, seed=1, latent_dim=LATENT_DIM, device=enc.device)
    ema = TrainingEMA(EmaConfig(), args.batch, {"encoder": enc, "generator": gen})
    calls = {"train_step": train_step_call((enc, gen), x, noise), "ema.update": lambda: ema.update(10**6)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(args.warmup_steps + args.steps):
        for name, call in calls.items():
            wall_s, _ = timed(call, enc.device)
            if round_index >= args.warmup_steps:
                times[name].append(wall_s)
    params = sum(getattr(p, "ds_numel", p.numel()) for e in (enc, gen) for p in e.module.parameters())  # whole, under ZeRO-3 too
    step_s, ema_s = (statistics.median(times[name]) for name in calls)
    print(f"# {describe(enc.device)}; {args.resolution_px} px, batch {args.batch}, ZeRO {args.zero_stage}, "
          f"{precision}, {params / 1e6:.1f} M weights averaged, {args.steps} rounds")
    print(f"train_step median {step_s * 1e3:.1f} ms; ema.update median {ema_s * 1e3:.2f} ms; "
          f"ema / step = {ema_s / step_s:.2%}")
    engine.shutdown_distributed()


if __name__ == "__main__":
    main()
