"""Worker for tests/test_soft_distributed.py, started by the real deepspeed launcher (2 ranks, gloo).

For ZeRO 1, 2 and 3 in fp32, builds the two engines the trainer builds (`engine.build_engine`)
from one seed and runs `soft_algorithm.soft_train_step` for 3 full steps, each rank on its half
of a global batch. It counts, in step 1, which network's weight gradients each phase computed
(a hook on every parameter, as tests/workers/grad_check.py), and gathers both networks' whole
fp32 weights (the optimiser's master copy) after step 1 and step 3. Rank 0 saves the initial
weights, every step's inputs and noise, the counts and the weights to the path given last, so
that the test runs the authors' step on exactly the same numbers.

GroupNorm, because its output does not depend on how the batch is split over ranks. The
engines run on the rank's device (`engine.init_distributed`: cuda:LOCAL_RANK over NCCL on a GPU
machine, tests/test_cuda.py at one rank; the CPU over gloo), with cuDNN's TF32 off as in
tests/workers/step_check.py, so that both sides compute fp32 convolutions in fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from introvae_dist import engine
from introvae_dist.algorithm import StepNoise
from introvae_dist.config import EngineConfig
from introvae_dist.distributed import world_from_env
from introvae_dist.models import Encoder, Generator
from introvae_dist.soft_algorithm import REENCODINGS, soft_train_step
from introvae_dist.soft_losses import SoftWeights
from grad_check import GradientCalls  # noqa: E402  (beside this script: the per-network hook counts)
from worker_exit import leave  # noqa: E402

RES_PX, LATENT, WIDTHS, BATCH_GLOBAL, STEPS = 16, 8, (8, 16), 4, 3
#: As tests/test_soft_introvae.py: gamma_r large enough to move the weights measurably.
WEIGHTS = SoftWeights(beta_rec=1.0, beta_kl=1.0, beta_neg=256.0, gamma_r=0.5)
#: Adam's eps 1e-6, not 1e-8: a gradient element of a few 1e-8 (measured: 3.4e-8 in E's last
#: conv) sits where Adam's first step lr g / (|g| + eps) is steepest, and the 1e-9 by which
#: two ranks' mean rounds differently from the whole batch's moved that weight by 1.2e-6. At
#: 1e-6 the same rounding moves weights by < 1e-7, and the test can keep a tolerance of lr / 200.
LR, BETAS, EPS = 2e-4, (0.9, 0.999), 1e-6
ZERO_STAGES = (1, 2, 3)
INIT_SEED, DATA_SEED = 7, 123


def networks() -> tuple[Encoder, Generator]:
    torch.manual_seed(INIT_SEED)
    return (Encoder(RES_PX, LATENT, WIDTHS, norm="group", checkpointing=True),
            Generator(RES_PX, LATENT, WIDTHS, norm="group", checkpointing=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    world = world_from_env()
    device = engine.init_distributed()
    torch.backends.cudnn.allow_tf32 = False  # see the module docstring; no effect on the CPU
    per_rank = BATCH_GLOBAL // world.world_size
    rows = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    rng = torch.Generator().manual_seed(DATA_SEED)
    inputs = [(torch.rand(BATCH_GLOBAL, 3, RES_PX, RES_PX, generator=rng),
               StepNoise.sample(BATCH_GLOBAL, LATENT, rng, torch.device("cpu"), reencodings=REENCODINGS))
              for _ in range(STEPS)]
    enc0, gen0 = networks()
    report: dict[str, object] = {
        "world_size": world.world_size, "device": str(device), "steps": STEPS, "lr": LR, "betas": BETAS, "eps": EPS,
        "fused_adam": EngineConfig.fused_adam, "weights": dataclasses.asdict(WEIGHTS),
        "init": {"encoder": enc0.state_dict(), "generator": gen0.state_dict()},
        "inputs": [(x, n.eps, n.z_prior, n.eps_reencoded) for x, n in inputs], "cases": {},
    }
    for stage in ZERO_STAGES:
        cfg = EngineConfig(zero_stage=stage, precision="fp32", lr=LR, betas=list(BETAS), adam_eps=EPS)
        enc, gen = networks()
        e = engine.build_engine(enc, cfg, per_rank, world.world_size)
        g = engine.build_engine(gen, cfg, per_rank, world.world_size)
        calls = GradientCalls(encoder=e.module, generator=g.module)
        counts: dict[str, dict[str, int]] = {}
        after: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        for step, (x, noise) in enumerate(inputs, start=1):
            hook = (lambda phase: counts.__setitem__(phase, dict(calls.calls))) if step == 1 else None
            soft_train_step(e, g, x[rows].to(device), noise.rows(rows).to(device), WEIGHTS, on_gradients=hook,  # type: ignore[arg-type]
                            adopt=engine.adopt_outputs)
            if step in (1, STEPS):
                after[step] = {"encoder": engine.full_fp32_params(e), "generator": engine.full_fp32_params(g)}
        report["cases"][f"zero{stage}"] = {  # type: ignore[index]
            "weights": after, "counts": counts,
            "params": {"encoder": len(list(e.module.parameters())), "generator": len(list(g.module.parameters()))}}
        print(f"rank {world.rank}: zero{stage} done", flush=True)  # where a rank got to, if a later one dies
    if world.is_main:
        torch.save(report, args.out)
    leave()


if __name__ == "__main__":
    main()
