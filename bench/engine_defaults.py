"""The training step with our DeepSpeed config against DeepSpeed's defaults (issue 13).

`engine.deepspeed_config` now sets every key that changes a step's arithmetic (docs/DEEPSPEED.md):
no gradient clipping (DeepSpeed's default clips to norm 1), bf16 gradients reduced in fp32, no
bf16 overflow skip. This times one full `train_step` (both phases, both optimiser steps) on
the preset's networks with two pairs of engines built from the same seed: "ours" with today's
config, and "defaults" with those keys removed, as every run was configured before issue 13.
Rounds alternate the two (`step_throughput.run_rounds`); medians over the rounds in which both
had the cores. A world of one, so the reduction dtype moves no bytes between ranks.

    python bench/engine_defaults.py
    python bench/engine_defaults.py --precision bf16 --resolution-px 32
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

import torch

from step_throughput import (
    Setup,
    cpu_model,
    median_wall_s,
    rounds_for_medians,
    run_rounds,
    seeded_networks,
    step_inputs,
    train_step_call,
)

from introvae_dist.config import EngineConfig
from introvae_dist.distributed import world_from_env

#: What issue 13 added to each engine's config; "defaults" leaves these to DeepSpeed.
ADDED_KEYS = ("gradient_clipping", "prescale_gradients", "gradient_predivide_factor", "communication_data_type")


def build_pair(setup: Setup, cfg: EngineConfig, deepspeed_defaults: bool) -> tuple[Any, Any]:
    from introvae_dist import engine  # imports DeepSpeed

    pair = []
    for net in seeded_networks(setup.resolution_px, setup.checkpointing):
        ds_config = engine.deepspeed_config(cfg, setup.batch_per_rank, 1)
        if deepspeed_defaults:
            for key in ADDED_KEYS:
                ds_config.pop(key)
            ds_config["bf16"].pop("check_grad_overflow")
        pair.append(engine.build_engine(net, cfg, setup.batch_per_rank, 1, ds_config=ds_config))
    return pair[0], pair[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution-px", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-cpu-share", type=float, default=0.9)
    args = parser.parse_args(argv)
    command = " ".join(["python", "bench/engine_defaults.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    from introvae_dist import engine

    world_from_env()
    engine.init_distributed()
    torch.set_num_threads(os.cpu_count() or 1)
    setup = Setup(args.resolution_px, args.batch, args.zero_stage, checkpointing=True)
    cfg = EngineConfig(zero_stage=args.zero_stage, precision=args.precision)
    x, noise = step_inputs(setup.resolution_px, setup.batch_per_rank, seed=1)
    calls = {name: train_step_call(build_pair(setup, cfg, defaults), x, noise)
             for name, defaults in (("ours", False), ("defaults", True))}
    times = run_rounds(calls, warmup_steps=1, steps=args.rounds)
    rounds, note = rounds_for_medians(times, args.min_cpu_share)
    medians = median_wall_s(times, rounds)
    print(f"# {command}\n# {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; {setup}")
    print(note)
    print("| engine config | median s/step | vs defaults |")
    print("|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median:.3f} | {medians['defaults'] / median:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
