"""Our training step against the authors' algorithm as published, side by side in one run.

The baseline is the step of the authors' main.py (hhb072/IntroVAE, `train()`), in plain
PyTorch fp32 eager on the same networks and batch, with the one change it needs to run on
modern PyTorch: G's backward is restricted to G's parameters (`backward(inputs=...)`), so it no
longer walks into E's graph of x, whose weights E's optimiser step has changed in place (the
"modified by an inplace operation" error of PyTorch >= 1.5, ../shared/paper/NOTES.md). Its work
per step: G(z_p), E(x), G(z), E(x_r), E(x_p) and one backward; E's step; E(x_r), E(x_p) again
and G's backward through the retained graph; no activation checkpointing, as in their code.

Ours is `algorithm.train_step` through the two DeepSpeed engines as training builds them, with
the precision and checkpointing given on the command line (defaults: the 128 preset's bf16,
checkpointing on). Data loading is left out of both: one fixed batch.

Rounds alternate the variants so a slow phase of a shared machine falls on both; the ratio of
the median step times is the figure (issue 7, target 1: at least 4x).

    python bench/vs_authors.py
    python bench/vs_authors.py --no-checkpointing --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_throughput import LATENT_DIM, SEED, WEIGHTS, Setup, build_networks, build_variant, step_inputs  # noqa: E402

from introvae_dist.algorithm import StepNoise, train_step  # noqa: E402
from introvae_dist.distributed import world_from_env  # noqa: E402
from introvae_dist.losses import kl_per_image  # noqa: E402


class AuthorsStep:
    """One step of the authors' `train()`: their losses (batch means, no 0.5 in L_AE, hinge on
    the batch-mean KL), their order, their graph reuse."""

    def __init__(self, resolution_px: int) -> None:
        self.enc, self.gen = build_networks(resolution_px, checkpointing=False)
        self.opt_e = torch.optim.Adam(self.enc.parameters(), lr=2e-4)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=2e-4)

    def __call__(self, x: torch.Tensor, noise: StepNoise) -> float:
        w = WEIGHTS
        fake = self.gen(noise.z_prior)
        mu, logvar = self.enc(x)
        z = mu + (0.5 * logvar).exp() * noise.eps
        rec = self.gen(z)
        rec_mu, rec_logvar = self.enc(rec.detach())
        fake_mu, fake_logvar = self.enc(fake.detach())
        loss_rec = (rec - x).pow(2).flatten(1).sum(1).mean()
        kl_real = kl_per_image(mu, logvar).mean()
        kl_rec, kl_fake = kl_per_image(rec_mu, rec_logvar).mean(), kl_per_image(fake_mu, fake_logvar).mean()
        loss_e = loss_rec * w.beta + kl_real + (torch.relu(w.margin - kl_rec) + torch.relu(w.margin - kl_fake)) * 0.5 * w.alpha
        self.opt_g.zero_grad()
        self.opt_e.zero_grad()
        loss_e.backward(retain_graph=True)
        self.opt_e.step()
        rec_mu, rec_logvar = self.enc(rec)
        fake_mu, fake_logvar = self.enc(fake)
        loss_g = (kl_per_image(rec_mu, rec_logvar).mean() + kl_per_image(fake_mu, fake_logvar).mean()) * 0.5 * w.alpha
        loss_g.backward(inputs=list(self.gen.parameters()))  # the fix; G keeps beta * L_AE from above
        self.opt_g.step()
        return float(loss_g)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution-px", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed rounds")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="ours")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--no-checkpointing", action="store_true", help="ours without activation checkpointing")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    from introvae_dist import engine  # imports DeepSpeed

    world_from_env()
    engine.init_distributed()
    setup = Setup(args.resolution_px, args.batch, args.zero_stage, not args.no_checkpointing)
    ours = build_variant(setup, args.precision)
    authors = AuthorsStep(args.resolution_px)
    x, noise = step_inputs(args.resolution_px, args.batch, SEED + 1)
    print(f"# python bench/vs_authors.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
          f"# {args.resolution_px} px, latent {LATENT_DIM}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}; ours: {args.precision}, ZeRO {args.zero_stage}, "
          f"checkpointing {'on' if setup.checkpointing else 'off'}", flush=True)
    times: dict[str, list[float]] = {"authors": [], "ours": []}
    for round_index in range(1 + args.steps):  # the first round warms up
        for name in times:
            start = time.perf_counter()
            if name == "authors":
                authors(x, noise)
            else:
                train_step(ours[0], ours[1], x, noise, WEIGHTS)["loss_g"].item()
            wall = time.perf_counter() - start
            print(f"  {'warm-up' if round_index == 0 else f'round {round_index}':>8} {name:>7}: {wall:7.2f} s", flush=True)
            if round_index:
                times[name].append(wall)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"{name:>7}: median {median:.2f} s/step, {args.batch / median:.3f} images/s")
    print(f"ours / authors: {medians['authors'] / medians['ours']:.2f}x the authors' images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
