"""Worker for tests/test_ema.py, started by the real deepspeed launcher (2 ranks).

For ZeRO 1, 2 and 3, in fp32 and bf16, builds both engines as the trainer does, runs three
steps of `algorithm.train_step` with a `TrainingEMA` updated after each, and beside it a
reference EMA computed the plain way: from the whole weights (the fp32 masters gathered from
every partition, rounded to the engine's dtype), in fp32, with the same beta.
Rank 0 saves, to the path given last: per case, the EMA's `state_dict()` (whole weights,
reassembled from the partitions), the reference, the EMA after a `state_dict` ->
`reset_to_live` -> `load_state_dict` round trip, and the EMA generator's output on a fixed z
next to the output of a generator loaded with the reference weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from introvae_dist import engine
from introvae_dist.algorithm import StepNoise, train_step
from introvae_dist.config import EmaConfig, EngineConfig, ModelConfig
from introvae_dist.distributed import world_from_env
from introvae_dist.ema import TrainingEMA, ema_beta
from introvae_dist.losses import LossWeights
from introvae_dist.models import build_networks, param_dtype
from worker_exit import leave

MODEL = ModelConfig(resolution_px=16, latent_dim=8, widths=[8, 16], norm="group")
BATCH_GLOBAL, STEPS = 4, 3
WEIGHTS = LossWeights(alpha=0.25, beta=0.5, margin=12.0)
#: A half-life of a few batches without ramp-up: every step moves the average visibly.
EMA = EmaConfig(half_life_images=10.0, rampup=0.0)


def whole_weights(e: object) -> dict[str, torch.Tensor]:
    """The weights the forward uses, whole, as fp32: the optimiser's fp32 masters gathered from
    every partition (engine.full_fp32_params), rounded to the module's dtype as DeepSpeed
    rounds them into the module after each step (a no-op in fp32)."""
    dtype = param_dtype(e.module)  # type: ignore[attr-defined]
    return {k: v.to(dtype).float() for k, v in engine.full_fp32_params(e).items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    world = world_from_env()
    device = engine.init_distributed()
    per_rank = BATCH_GLOBAL // world.world_size
    rows = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    rng = torch.Generator().manual_seed(123)
    inputs = [(torch.rand(BATCH_GLOBAL, 3, 16, 16, generator=rng), StepNoise.sample(BATCH_GLOBAL, 8, rng, torch.device("cpu")))
              for _ in range(STEPS)]
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    report: dict[str, object] = {}
    for precision in ("fp32", "bf16"):
        for stage in (1, 2, 3):
            torch.manual_seed(7)
            enc, gen = build_networks(MODEL)
            cfg = EngineConfig(zero_stage=stage, precision=precision)
            e = engine.build_engine(enc, cfg, per_rank, world.world_size)
            g = engine.build_engine(gen, cfg, per_rank, world.world_size)
            engines = {"encoder": e, "generator": g}
            ema = TrainingEMA(EMA, BATCH_GLOBAL, engines)
            reference = {name: whole_weights(x) for name, x in engines.items()}
            images = 0
            for x, noise in inputs:
                local = StepNoise(eps=noise.eps[rows].to(device), z_prior=noise.z_prior[rows].to(device))
                train_step(e, g, x[rows].to(device), local, WEIGHTS, adopt=engine.adopt_outputs)  # type: ignore[arg-type]
                ema.update(images)
                beta = ema_beta(BATCH_GLOBAL, images, EMA.half_life_images, EMA.rampup)
                for name, x_engine in engines.items():
                    live = whole_weights(x_engine)
                    for k in reference[name]:
                        reference[name][k].lerp_(live[k], 1.0 - beta)
                images += BATCH_GLOBAL
            state = ema.state_dict()
            ema.reset_to_live()
            ema.load_state_dict(state)
            reloaded = ema.state_dict()
            nets = ema.networks(MODEL, device)
            plain = build_networks(MODEL)[1]
            plain.load_state_dict({**reference["generator"], **{k: b for k, b in g.module.named_buffers()}})
            with torch.no_grad():
                out_ema, out_ref = nets["generator"](z.to(device)).cpu(), plain.eval()(z).cpu()
            report[f"{precision}_zero{stage}"] = {"state": state, "reference": reference, "reloaded": reloaded,
                                                  "out_ema": out_ema, "out_ref": out_ref}
            print(f"rank {world.rank}: {precision} zero{stage} done", flush=True)
    if world.is_main:
        torch.save(report, args.out)
    leave()


if __name__ == "__main__":
    main()
