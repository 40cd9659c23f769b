"""Worker for tests/test_step_equivalence.py, started by the real deepspeed launcher (1 or 2 ranks).

For every ZeRO stage (0-3) and both step orders, builds the two engines the trainer builds
(`engine.build_engine`, fp32) from one seed and runs `algorithm.train_step` for a few full
steps (both optimiser steps each), each rank on its share of a global batch. After step 1 and
after the last step it gathers both networks' whole fp32 weights (the optimiser's master copy,
from every ZeRO partition). Rank 0 saves, to the path given as the last argument: the initial
weights, the inputs and noise of every step, and the gathered weights, so that the test can
run its plain-PyTorch Algorithm 1 on exactly the same numbers.

GroupNorm, because its output does not depend on how the batch is split over ranks.
``--grad-clip-norm X`` sets `grad_clip_norm` of both engines (the test's control case).

The engines run where DeepSpeed's accelerator puts them: the rank's device that
`engine.init_distributed` returns (cuda:LOCAL_RANK on a GPU machine, over NCCL; the CPU over
gloo). The inputs are drawn on the CPU, so every device gets the same numbers, and each step's
share is moved to that device. cuDNN's TF32 for fp32 convolutions (on by default in torch) is
turned off: the reference of tests/test_cuda.py turns it off too, so both compute fp32
convolutions in fp32 and the comparison sees rounding, not TF32's 10-bit mantissa.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from introvae_dist import engine
from introvae_dist.algorithm import STEP_ORDERS, StepNoise, train_step
from introvae_dist.config import EngineConfig
from introvae_dist.distributed import world_from_env
from introvae_dist.losses import LossWeights
from introvae_dist.models import Encoder, Generator
from worker_exit import leave  # noqa: E402  (beside this script)

RES_PX, LATENT, WIDTHS, BATCH_GLOBAL, STEPS = 16, 8, (8, 16), 4, 3
#: A margin between the KLs of x_r and x_p seen in these steps, so both sides of the hinge occur.
WEIGHTS = LossWeights(alpha=0.25, beta=0.5, margin=12.0)
LR, BETAS, EPS = 2e-4, (0.9, 0.999), 1e-8
ZERO_STAGES = (0, 1, 2, 3)
INIT_SEED, DATA_SEED = 7, 123


def step_inputs() -> list[tuple[torch.Tensor, StepNoise]]:
    """A different batch and noise for every step, the same on every rank."""
    rng = torch.Generator().manual_seed(DATA_SEED)
    inputs = []
    for _ in range(STEPS):
        x = torch.rand(BATCH_GLOBAL, 3, RES_PX, RES_PX, generator=rng)
        inputs.append((x, StepNoise.sample(BATCH_GLOBAL, LATENT, rng, torch.device("cpu"))))
    return inputs


def networks(norm: str, channels_last: bool) -> tuple[Encoder, Generator]:
    torch.manual_seed(INIT_SEED)
    enc = Encoder(RES_PX, LATENT, WIDTHS, norm=norm, checkpointing=True)  # type: ignore[arg-type]
    gen = Generator(RES_PX, LATENT, WIDTHS, norm=norm, checkpointing=True)  # type: ignore[arg-type]
    if channels_last:  # as the trainer does: G's activations, and E follows its input
        gen.activation_memory_format = torch.channels_last
    return enc, gen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    parser.add_argument("--grad-clip-norm", type=float, default=0.0)
    parser.add_argument("--norm", choices=("group", "batch"), default="group")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    world = world_from_env()
    device = engine.init_distributed()
    torch.backends.cudnn.allow_tf32 = False  # see the module docstring; no effect on the CPU
    per_rank = BATCH_GLOBAL // world.world_size
    rows = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    inputs = step_inputs()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    enc0, gen0 = networks(args.norm, args.channels_last)
    report: dict[str, object] = {
        "world_size": world.world_size, "device": str(device), "steps": STEPS, "lr": LR, "betas": BETAS, "eps": EPS,
        "weights": dataclasses.asdict(WEIGHTS),
        "grad_clip_norm": args.grad_clip_norm, "norm": args.norm, "fused_adam": EngineConfig.fused_adam,
        "init": {"encoder": enc0.state_dict(), "generator": gen0.state_dict()},
        "inputs": [(x, n.eps, n.z_prior) for x, n in inputs], "cases": {},
    }
    cfg = EngineConfig(zero_stage=0, precision="fp32", lr=LR, betas=list(BETAS), adam_eps=EPS,
                       grad_clip_norm=args.grad_clip_norm)
    for stage in ZERO_STAGES:
        cfg.zero_stage = stage
        for order in STEP_ORDERS:
            enc, gen = networks(args.norm, args.channels_last)
            e = engine.build_engine(enc, cfg, per_rank, world.world_size)
            g = engine.build_engine(gen, cfg, per_rank, world.world_size)
            after: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
            for step, (x, noise) in enumerate(inputs, start=1):
                local = StepNoise(eps=noise.eps[rows].to(device), z_prior=noise.z_prior[rows].to(device))
                x_local = x[rows].to(device).contiguous(memory_format=memory_format)
                train_step(e, g, x_local, local, WEIGHTS, order=order, adopt=engine.adopt_outputs)  # type: ignore[arg-type]
                if step in (1, STEPS):
                    after[step] = {"encoder": engine.full_fp32_params(e), "generator": engine.full_fp32_params(g)}
            report["cases"][f"zero{stage}_{order}"] = after  # type: ignore[index]
            # Where a rank got to, in the test's failure output if a later one dies.
            print(f"rank {world.rank}: zero{stage} {order} done", flush=True)
    if world.is_main:
        torch.save(report, args.out)
    leave()


if __name__ == "__main__":
    main()
