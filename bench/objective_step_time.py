"""Step time of Soft-IntroVAE against IntroVAE on the same DeepSpeed engines, interleaved in one process.

What is measured: the wall time of one full training step of each objective after its warm-up
(`algorithm.train_step`: Algorithm 1; `soft_algorithm.soft_train_step`: Soft-IntroVAE, whose
step runs G six times where Algorithm 1 runs it twice), each phase with its backward and its
optimiser step, on the networks of the preset at --resolution-px (Table 3 widths, BatchNorm,
blocks checkpointed as the presets do unless --no-checkpointing), both networks wrapped by
`engine.build_engine` as in training. One fixed random batch is reused: data loading is left out.

How: a world of one; each objective gets its own pair of engines from the same seed. After
the warm-up steps the objectives run in rounds (introvae, soft_introvae, introvae, ...), so a
slow phase of a noisy machine falls on both; rounds where either got less than
--min-cpu-share of the cores are left out (bench/step_throughput.py explains why), and the
median step time of each and the ratio to IntroVAE are reported. bench/objectives_side_by_side.py
reports the same ratio from whole training runs; this one is the figure to trust on a noisy
machine, since its two objectives share every round.

    python bench/objective_step_time.py --resolution-px 32 --batch 8 --widths 16 32 64 --latent-dim 64
    python bench/objective_step_time.py --resolution-px 128 --batch 8 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from device import CPU, cpu_model, timed
from step_throughput import Result, StepTimes, clean_rounds, summarise

from introvae_dist import models
from introvae_dist.algorithm import StepNoise, train_step
from introvae_dist.config import EngineConfig, ModelConfig
from introvae_dist.distributed import world_from_env
from introvae_dist.losses import LossWeights
from introvae_dist.models import param_dtype
from introvae_dist.soft_algorithm import REENCODINGS, soft_train_step
from introvae_dist.soft_losses import SoftWeights

SCRIPT = "bench/objective_step_time.py"
OBJECTIVES = ("introvae", "soft_introvae")
REFERENCE = "introvae"
#: The adversarial phase of each: Sec. 4.1's alpha, beta, m; the authors' CelebA-HQ betas.
INTROVAE = LossWeights(alpha=0.25, beta=0.5, margin=110.0)
SOFT = SoftWeights(beta_rec=0.5, beta_kl=1.0, beta_neg=1024.0, gamma_r=1e-8)
SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution-px", type=int, default=128)
    parser.add_argument("--widths", type=int, nargs="+", help="model.widths (default: Table 3's)")
    parser.add_argument("--latent-dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="images per step (>= 2 for BatchNorm)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--min-cpu-share", type=float, default=0.9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.warmup_steps < 0 or not 0 <= args.min_cpu_share <= 1:
        parser.error("expected --batch >= 2, --steps >= 1, --warmup-steps >= 0, 0 <= --min-cpu-share <= 1")
    return args


def step_calls(args: argparse.Namespace) -> tuple[dict[str, Callable[[], object]], str]:
    """One step of each objective on its own engines (same seed), and their parameter dtypes."""
    from introvae_dist import engine  # imports DeepSpeed

    world_from_env()
    engine.init_distributed()
    model = ModelConfig(resolution_px=args.resolution_px, latent_dim=args.latent_dim, widths=args.widths,
                        checkpoint_blocks=not args.no_checkpointing)
    cfg = EngineConfig(zero_stage=args.zero_stage, precision=args.precision)
    rng = torch.Generator().manual_seed(SEED + 1)
    x = torch.rand(args.batch, 3, args.resolution_px, args.resolution_px, generator=rng)
    noise = StepNoise.sample(args.batch, args.latent_dim, rng, CPU, reencodings=REENCODINGS)
    calls, dtypes = {}, []
    for objective in OBJECTIVES:
        torch.manual_seed(SEED)
        enc_net, gen_net = models.build_networks(model)
        enc, gen = engine.build_engine(enc_net, cfg, args.batch, 1), engine.build_engine(gen_net, cfg, args.batch, 1)
        dtypes.append(f"{objective} {param_dtype(enc.module)}/{param_dtype(gen.module)}")
        if objective == "introvae":
            calls[objective] = (lambda e=enc, g=gen: train_step(e, g, x, noise, INTROVAE,
                                                                adopt=engine.adopt_outputs)["loss_g"].item())
        else:
            calls[objective] = (lambda e=enc, g=gen: soft_train_step(e, g, x, noise, SOFT,
                                                                     adopt=engine.adopt_outputs)["loss_g"].item())
    return calls, ", ".join(dtypes)


def format_table(results: list[Result]) -> str:
    """Median step time, images/s, and the step time as a multiple of IntroVAE's."""
    reference = next(r.median_step_s for r in results if r.variant == REFERENCE)
    lines = [f"{'objective':<14} {'median s/step':>13} {'images/s':>9} {'time vs ' + REFERENCE:>16} {'cpu share':>9}"]
    lines += [f"{r.variant:<14} {r.median_step_s:>13.3f} {r.images_per_s:>9.2f} {r.median_step_s / reference:>15.2f}x "
              f"{r.median_cpu_share:>9.2f}" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python", SCRIPT, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    calls, dtypes = step_calls(args)
    times = {name: StepTimes([], []) for name in calls}
    for round_index in range(args.warmup_steps + args.steps):
        for name, call in calls.items():
            wall, share = timed(call)
            if round_index >= args.warmup_steps:
                times[name].wall_s.append(wall)
                times[name].cpu_share.append(share)
    rounds = clean_rounds(times, args.min_cpu_share) or list(range(args.steps))
    results: list[Result] = summarise(times, rounds, args.batch, model_flops_per_image=0.0,
                                      reference_variant=REFERENCE)
    print(f"# {command}\n# {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}; parameter dtypes (E/G): {dtypes}\n# medians over {len(rounds)} of {args.steps} "
          f"rounds (left out: a variant had < {args.min_cpu_share:.2f} of the cores)")
    print(format_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps({"command": command, "cpu": cpu_model(), "results": [asdict(r) for r in results]},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
