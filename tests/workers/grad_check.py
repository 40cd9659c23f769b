"""Worker for tests/test_distributed.py, started by the real deepspeed launcher (2 ranks, gloo).

For ZeRO 1, 2 and 3 in fp32, and for both step orders (Algorithm 1 and the shared-encoder
fast path), runs one `train_step` over two DeepSpeed engines with each rank holding half of a
global batch, and compares the gathered gradients of the encoder step and of the generator
step with a plain single-process PyTorch version of the same order on the whole batch. It
also counts which network's weight gradients each phase computed.
GroupNorm is used because its output does not depend on how the batch is split over ranks.
Rank 0 writes the comparison as JSON to the path given as the last argument.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from introvae_dist import engine
from introvae_dist.algorithm import StepNoise, train_step
from introvae_dist.config import EngineConfig
from introvae_dist.distributed import world_from_env
from introvae_dist.losses import LossWeights
from introvae_dist.models import Encoder, Generator
from worker_exit import leave  # noqa: E402  (beside this script)

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


class GradientCalls:
    """Counts, per network, how often autograd computed a gradient for one of its weights.

    A tensor hook on every parameter fires whenever a backward computes that parameter's
    gradient, before ZeRO's own hooks reduce and move it, so a network that took part in the
    other network's backward shows here, whatever the ZeRO stage. (`torch.autograd.grad` on a
    data input computes no weight gradient and fires none.)
    """

    def __init__(self, **modules: torch.nn.Module) -> None:
        self.calls = {name: 0 for name in modules}
        for name, module in modules.items():
            for param in module.parameters():
                param.register_hook(self._counter(name))

    def _counter(self, name: str):  # type: ignore[no-untyped-def]
        def hook(grad: torch.Tensor) -> None:
            self.calls[name] += 1
        return hook


def reference_shared_encoder(enc: torch.nn.Module, gen: torch.nn.Module, x: torch.Tensor, noise: StepNoise
                             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The fast path in plain PyTorch: L_E's gradient for E and L_G's for G, both with E as it is
    before its step (one encoder pass over x_r and x_p)."""
    e_params, g_params = list(enc.parameters()), list(gen.parameters())
    mu, logvar = enc(x)
    z = mu + (0.5 * logvar).exp() * noise.eps
    x_r, x_p = gen(z), gen(noise.z_prior)
    l_ae = 0.5 * (x_r - x).pow(2).flatten(1).sum(1)
    hinge = F.relu(W.margin - kl(*enc(x_r.detach()))) + F.relu(W.margin - kl(*enc(x_p.detach())))
    loss_e = (kl(mu, logvar) + W.alpha * hinge + W.beta * l_ae).mean()
    grads_e = torch.autograd.grad(loss_e, e_params, retain_graph=True)
    loss_g = (W.alpha * (kl(*enc(x_r)) + kl(*enc(x_p))) + W.beta * l_ae).mean()
    grads_g = torch.autograd.grad(loss_g, g_params)
    return list(grads_e), list(grads_g)


REFERENCES = {"algorithm1": reference, "shared_encoder": reference_shared_encoder}


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
        for order, reference_step in REFERENCES.items():
            torch.manual_seed(7)
            enc = Encoder(RES_PX, LATENT, WIDTHS, norm="group", checkpointing=True)
            gen = Generator(RES_PX, LATENT, WIDTHS, norm="group", checkpointing=True)
            ref_grads_e, ref_grads_g = reference_step(copy.deepcopy(enc), copy.deepcopy(gen), x, noise)
            cfg = EngineConfig(zero_stage=stage, precision="fp32", lr=LR, betas=list(BETAS))
            e = engine.build_engine(enc, cfg, per_rank, world.world_size)
            g = engine.build_engine(gen, cfg, per_rank, world.world_size)
            calls = GradientCalls(encoder=e.module, generator=g.module)
            seen: dict[str, object] = {}

            def on_gradients(phase: str) -> None:
                updated = e if phase == "encoder" else g
                seen[f"{phase}_grads"] = [engine.full_grad(p) for p in updated.module.parameters()]
                seen[f"calls_after_{phase}"] = dict(calls.calls)

            train_step(e, g, x[rows], local_noise, W, on_gradients=on_gradients, order=order,  # type: ignore[arg-type]
                       adopt=engine.adopt_outputs)
            after_e, after_g = seen["calls_after_encoder"], seen["calls_after_generator"]
            report[f"zero{stage}_{order}"] = {
                "encoder_rel_err": max_rel_err(seen["encoder_grads"], ref_grads_e),  # type: ignore[arg-type]
                "generator_rel_err": max_rel_err(seen["generator_grads"], ref_grads_g),  # type: ignore[arg-type]
                "generator_grads_computed_in_encoder_phase": after_e["generator"],  # type: ignore[index]
                "encoder_grads_computed_in_generator_phase": after_g["encoder"] - after_e["encoder"],  # type: ignore[index]
                "encoder_grads_computed_in_encoder_phase": after_e["encoder"],  # type: ignore[index]
            }
            torch.distributed.barrier()
            # Where a rank got to, in the test's failure output if a later one dies.
            print(f"rank {world.rank}: zero{stage} {order} compared", flush=True)
    if world.is_main:
        out_path.write_text(json.dumps(report, indent=1))
    leave()


if __name__ == "__main__":
    main()
