"""Worker for tests/test_distributed.py, started by the real deepspeed launcher (2 ranks, gloo).

For ZeRO 1, 2 and 3 in fp32, runs one `train_step` over two DeepSpeed engines with each rank
holding half of a global batch, and compares the gathered gradients of the encoder step and
of the generator step with a plain single-process PyTorch Algorithm 1 on the whole batch.
GroupNorm is used because its output does not depend on how the batch is split over ranks.
Rank 0 writes the comparison as JSON to the path given as the last argument.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from introvae_dist import engine  # noqa: E402
from introvae_dist.algorithm import StepNoise, train_step  # noqa: E402
from introvae_dist.config import EngineConfig  # noqa: E402
from introvae_dist.distributed import world_from_env  # noqa: E402
from introvae_dist.losses import LossWeights  # noqa: E402
from introvae_dist.models import Encoder, Generator  # noqa: E402

RES_PX, LATENT, WIDTHS, BATCH_GLOBAL = 16, 8, (8, 16), 4
W = LossWeights(alpha=0.25, beta=0.5, margin=12.0)
LR, BETAS = 2e-4, (0.9, 0.999)


def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Written out again (not imported) so the reference does not share the code under test."""
    return -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)


def reference(enc: torch.nn.Module, gen: torch.nn.Module, x: torch.Tensor, noise: StepNoise
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Algorithm 1 in plain PyTorch on the whole batch: gradients of the E and G steps."""
    e_params, g_params = list(enc.parameters()), list(gen.parameters())
    mu, logvar = enc(x)
    z = mu + (0.5 * logvar).exp() * noise.eps
    x_r = gen(z)
    x_p = gen(noise.z_prior).detach()
    l_ae = 0.5 * (x_r - x).pow(2).flatten(1).sum(1)
    hinge = F.relu(W.margin - kl(*enc(x_r.detach()))) + F.relu(W.margin - kl(*enc(x_p)))
    loss_e = (kl(mu, logvar) + W.alpha * hinge + W.beta * l_ae).mean()
    grads_e = torch.autograd.grad(loss_e, e_params)
    optimizer = torch.optim.Adam(e_params, lr=LR, betas=BETAS)
    for p, g in zip(e_params, grads_e):
        p.grad = g.clone()
    optimizer.step()
    x_r, x_p = gen(z.detach()), gen(noise.z_prior)
    l_ae = 0.5 * (x_r - x).pow(2).flatten(1).sum(1)
    loss_g = (W.alpha * (kl(*enc(x_r)) + kl(*enc(x_p))) + W.beta * l_ae).mean()
    grads_g = torch.autograd.grad(loss_g, g_params)
    return list(grads_e), list(grads_g)


def max_rel_err(got: list[torch.Tensor | None], want: list[torch.Tensor]) -> float:
    worst = 0.0
    for g, w in zip(got, want):
        if g is None:
            return float("inf")
        worst = max(worst, float((g.float() - w).abs().max() / (w.abs().max() + 1e-12)))
    return worst


def holds_gradient(module: torch.nn.Module) -> bool:
    """True if any parameter of the frozen `module` received a gradient in this phase.

    Autograd writes a parameter's gradient into `p.grad` before ZeRO reduces and moves it, so
    a frozen network that took part in the backward would show here. (Gathering the frozen
    engine's ZeRO partitions is not possible: DeepSpeed has none pending outside its own
    backward-to-step window.) A leak into the other engine's buffers would also show in that
    engine's next gradient, which is compared with the reference.
    """
    return any(p.requires_grad or (p.grad is not None and bool(p.grad.abs().sum() > 0)) for p in module.parameters())


def main() -> None:
    out_path = Path(sys.argv[-1])  # the deepspeed launcher puts --local_rank=N first
    world = world_from_env()
    engine.init_distributed()
    per_rank = BATCH_GLOBAL // world.world_size
    gen_rng = torch.Generator().manual_seed(123)
    x = torch.rand(BATCH_GLOBAL, 3, RES_PX, RES_PX, generator=gen_rng)
    noise = StepNoise.sample(BATCH_GLOBAL, LATENT, gen_rng, torch.device("cpu"))
    rows = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    local_noise = StepNoise(eps=noise.eps[rows], z_prior=noise.z_prior[rows])
    report: dict[str, dict[str, object]] = {}
    for stage in (1, 2, 3):
        torch.manual_seed(7)
        enc = Encoder(RES_PX, LATENT, WIDTHS, norm="group", checkpointing=True)
        gen = Generator(RES_PX, LATENT, WIDTHS, norm="group", checkpointing=True)
        ref_grads_e, ref_grads_g = reference(copy.deepcopy(enc), copy.deepcopy(gen), x, noise)
        cfg = EngineConfig(zero_stage=stage, precision="fp32", lr=LR, betas=list(BETAS))
        e = engine.build_engine(enc, cfg, per_rank, world.world_size)
        g = engine.build_engine(gen, cfg, per_rank, world.world_size)
        seen: dict[str, object] = {}

        def on_gradients(phase: str) -> None:
            updated, frozen = (e, g) if phase == "encoder" else (g, e)
            seen[f"{phase}_grads"] = [engine.full_grad(p) for p in updated.module.parameters()]
            seen[f"{phase}_other_holds_grad"] = holds_gradient(frozen.module)

        train_step(e, g, x[rows], local_noise, W, on_gradients=on_gradients)
        report[f"zero{stage}"] = {
            "encoder_rel_err": max_rel_err(seen["encoder_grads"], ref_grads_e),  # type: ignore[arg-type]
            "generator_rel_err": max_rel_err(seen["generator_grads"], ref_grads_g),  # type: ignore[arg-type]
            "generator_holds_grad_in_encoder_phase": seen["encoder_other_holds_grad"],
            "encoder_holds_grad_in_generator_phase": seen["generator_other_holds_grad"],
        }
        torch.distributed.barrier()
    if world.is_main:
        out_path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
