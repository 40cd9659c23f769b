"""How fast the demo's networks learn to reconstruct: a plain autoencoder on the synthetic images.

Used to size the embedded demo (configs/cpu_synthetic.yaml, docs/BENCHMARKS.md "The demo"):
a 5-minute demo has a few hundred steps, so what limits its reconstructions is how much the
networks learn per step and how many steps a second they run. This trains E and G of
introvae_dist.models as a deterministic autoencoder (z = mu, loss = Eq. 10's L_AE, one Adam),
no KL and no adversarial phase, in one process, and prints the reconstruction PSNR of the first
256 training images (eval-mode BatchNorm) every 100 steps with the wall time so far.

    python bench/demo_ae_trials.py --widths 32 64 128 --steps 400
    python bench/demo_ae_trials.py --widths 16 32 64 --steps 1000 --lr 1e-3
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

from introvae_dist.config import ModelConfig
from introvae_dist.data.synthetic import render_image
from introvae_dist.models import build_networks

NUM_IMAGES = 2048        # the demo's shard set (python -m introvae_dist.data.synthetic)
STORED_PX = 64           # its stored size, resized to the demo's 32 px as the loader does
EVAL_IMAGES = 256
LOG_EVERY_STEPS = 100


def images(resolution_px: int) -> torch.Tensor:
    """The demo's synthetic images (seed 0) at `resolution_px`, (N, 3, R, R) in [0, 1]."""
    rendered = [np.asarray(render_image(i, STORED_PX).resize((resolution_px, resolution_px)))
                for i in range(NUM_IMAGES)]
    return torch.tensor(np.stack(rendered)).permute(0, 3, 1, 2).float() / 255


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--resolution-px", type=int, default=32)
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.lr <= 0:
        parser.error("expected --batch >= 2 (BatchNorm), --steps >= 1, --lr > 0")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x_all = images(args.resolution_px)
    model = ModelConfig(resolution_px=args.resolution_px, latent_dim=args.latent_dim, widths=args.widths, norm="batch",
                        checkpoint_blocks=False)
    enc, gen = build_networks(model)
    opt = torch.optim.Adam([*enc.parameters(), *gen.parameters()], lr=args.lr)
    print(f"# python bench/demo_ae_trials.py {' '.join(sys.argv[1:] if argv is None else argv)}", flush=True)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = x_all[torch.randint(0, NUM_IMAGES, (args.batch,))]
        mu, _ = enc(x)
        l_ae = 0.5 * (gen(mu) - x).pow(2).flatten(1).sum(1).mean()  # Eq. 10 per image, averaged
        opt.zero_grad()
        l_ae.backward()
        opt.step()
        if step % LOG_EVERY_STEPS == 0 or step == args.steps:
            enc.eval(), gen.eval()
            with torch.no_grad():
                held = x_all[:EVAL_IMAGES]
                mse = (gen(enc(held)[0]) - held).pow(2).mean().item()
            enc.train(), gen.train()
            print(f"step {step} L_AE {l_ae.item():.1f} PSNR {10 * math.log10(1 / mse):.1f} dB "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
