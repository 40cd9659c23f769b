"""Our training step against the authors' algorithm as published, side by side in one run.

The baseline is the step of the authors' main.py (hhb072/IntroVAE, `train()`), in plain
PyTorch fp32 eager on the same networks and batch, with the one change it needs to run on
modern PyTorch: G's backward is restricted to G's parameters (`backward(inputs=...)`), so it no
longer walks into E's graph of x, whose weights E's optimiser step has changed in place (the
"modified by an inplace operation" error of PyTorch >= 1.5, ../shared/paper/NOTES.md). Its work
per step: G(z_p), E(x), G(z), E(x_r), E(x_p) and one backward; E's step; E(x_r), E(x_p) again
and G's backward through the retained graph; no activation checkpointing, as in their code.

Ours is `algorithm.train_step` through the two DeepSpeed engines (ZeRO 1) as training builds
them, in one or more variants, each a `+`-joined list of switches:

* `bf16` | `fp32`: DeepSpeed's bf16 mode (bf16 weights and activations, fp32 master weights in
  the optimiser) or fp32 throughout;
* `ckpt`: activation checkpointing in the residual blocks (`model.checkpoint_blocks`);
* `cl`: channels-last weights and inputs (`train.channels_last`);
* `fused`: torch's fused Adam kernel (`encoder/generator.fused_adam`);
* `shared`: the shared-encoder fast path instead of Algorithm 1 (`train.step_order`).

Data loading is left out of all: one fixed batch. Rounds run every variant once, in order, so
a slow phase of the machine falls on all of them; each figure is the median over rounds in
which every variant had at least `--min-cpu-share` of the cores (as in step_throughput.py).

Model FLOPs are counted per variant on the meta device without recomputation (useful work:
Algorithm 1 and the fast path do different amounts); TFLOP/s = model FLOPs / median step time,
and MFU divides that by the device's bf16 peak measured at the start of the same run
(bench/conv_peak.py's `peak_tflops`: the higher of the best 3x3 convolution in channels-last
and a large matmul; both are printed).

With `--device cuda` the authors' networks and optimisers are moved to the GPU, our engines
are there already (DeepSpeed's accelerator, the rank's device from `engine.init_distributed`),
the batch and the noise are made there, each timed step is synchronised at both ends
(bench/device.py), the peak is the GPU's, and the core-share filter is off (all rounds are
used: process CPU time says nothing about GPU work). cuDNN's autotuner is off unless
`--cudnn-benchmark`; the header records the device and the backend switches.

    python bench/vs_authors.py
    python bench/vs_authors.py --variants bf16+cl+fused bf16+fused bf16+cl bf16+cl+fused+ckpt
    python bench/vs_authors.py --device cuda --batch 64 --json /tmp/vs_authors_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from conv_peak import peak_tflops
from device import (
    add_device_arguments,
    backend_flags,
    cpu_share_filters,
    describe,
    device_record,
    format_flags,
    module_device,
    require_device,
    require_rank_device,
    set_cudnn_benchmark,
)
from step_throughput import (
    FLOP_COUNT_BATCH,
    LATENT_DIM,
    SEED,
    WEIGHTS,
    FlopCounter,
    Setup,
    build_variant,
    count_step_flops_per_image,
    cpu_model,
    engines_device,
    median_wall_s,
    rounds_for_medians,
    run_rounds,
    seeded_networks,
    step_inputs,
    train_step_call,
)

from introvae_dist.algorithm import StepNoise, StepOrder
from introvae_dist.distributed import world_from_env
from introvae_dist.losses import kl_per_image

SCRIPT = "bench/vs_authors.py"
SWITCHES = ("bf16", "fp32", "ckpt", "cl", "fused", "shared")
#: The 128 preset's defaults after issue 7, and the fast path on top of them.
DEFAULT_VARIANTS = ("bf16+cl+fused", "bf16+cl+fused+shared")


@dataclass(frozen=True)
class Variant:
    """One configuration of our step, parsed from its `+`-joined name."""

    name: str
    precision: str
    checkpointing: bool
    channels_last: bool
    fused_adam: bool
    order: StepOrder

    @staticmethod
    def parse(name: str) -> Variant:
        parts = name.split("+")
        unknown = [p for p in parts if p not in SWITCHES]
        if unknown or ("bf16" in parts) == ("fp32" in parts):
            raise ValueError(f"variant {name!r}: expected bf16 or fp32 and any of ckpt, cl, fused, shared "
                             f"joined by '+' (unknown: {unknown})")
        return Variant(name, "bf16" if "bf16" in parts else "fp32", "ckpt" in parts, "cl" in parts,
                       "fused" in parts, "shared_encoder" if "shared" in parts else "algorithm1")


class AuthorsStep:
    """One step of the authors' `train()`: their losses (batch means, no 0.5 in L_AE, hinge on
    the batch-mean KL), their order, their graph reuse."""

    def __init__(self, resolution_px: int, device: torch.device | None = None) -> None:
        """Networks on `device` (None: where they were made, e.g. the meta device of a FLOP count);
        the optimisers after the move, so their state is made there too."""
        self.enc, self.gen = seeded_networks(resolution_px, checkpointing=False)
        if device is not None:
            self.enc.to(device)
            self.gen.to(device)
        self.opt_e = torch.optim.Adam(self.enc.parameters(), lr=2e-4)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=2e-4)

    def __call__(self, x: torch.Tensor, noise: StepNoise, count_only: bool = False) -> float:
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
        return 0.0 if count_only else float(loss_g)


def count_authors_flops_per_image(resolution_px: int, batch: int = FLOP_COUNT_BATCH) -> float:
    """FLOPs per image of one AuthorsStep (forward + backward), counted on the meta device."""
    with torch.device("meta"):
        step = AuthorsStep(resolution_px)
        x = torch.rand(batch, 3, resolution_px, resolution_px)
        noise = StepNoise(torch.randn(batch, LATENT_DIM), torch.randn(batch, LATENT_DIM))
    with FlopCounter() as counter:
        step(x, noise, count_only=True)
    return counter.total / batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution-px", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed rounds")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help="ours, each a '+'-joined list of: " + ", ".join(SWITCHES))
    parser.add_argument("--min-cpu-share", type=float, default=0.9,
                        help="leave out rounds where a variant had less of the cores (not applied with --device cuda)")
    parser.add_argument("--peak-repeats", type=int, default=5,
                        help="timed samples per shape of the bf16 peak (bench/conv_peak.py)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    try:
        variants = [Variant.parse(v) for v in args.variants]
    except ValueError as e:
        parser.error(str(e))
    if args.batch < 2 or args.steps < 1 or args.peak_repeats < 1:
        parser.error("expected --batch >= 2 (BatchNorm), --steps >= 1, --peak-repeats >= 1")
    device = require_device(args.device, SCRIPT)  # before any work: a wrong machine costs nothing
    set_cudnn_benchmark(args.cudnn_benchmark)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)

    from introvae_dist import engine  # imports DeepSpeed

    world_from_env()
    rank_device = require_rank_device(device, engine.init_distributed(), SCRIPT)
    torch.set_num_threads(threads)
    peak = peak_tflops(rank_device, args.peak_repeats)
    flops = {"authors": count_authors_flops_per_image(args.resolution_px)}
    x, noise = step_inputs(args.resolution_px, args.batch, SEED + 1, device=rank_device)
    authors = AuthorsStep(args.resolution_px, rank_device)
    calls: dict[str, Callable[[], object]] = {"authors": lambda: authors(x, noise)}
    for v in variants:
        flops[v.name] = count_step_flops_per_image(args.resolution_px, checkpointing=False, order=v.order)
        setup = Setup(args.resolution_px, args.batch, 1, v.checkpointing)
        engines = build_variant(setup, v.precision, v.channels_last, v.fused_adam)  # type: ignore[arg-type]
        # Both steps see the same inputs on the same device: DeepSpeed put the engines on its
        # accelerator, which must be where the authors' networks and the batch are.
        if engines_device({v.name: engines}) != module_device(authors.enc):
            raise RuntimeError(f"variant {v.name}: engines on {engines_device({v.name: engines})}, "
                               f"the authors' step on {module_device(authors.enc)}")
        x_v = x.contiguous(memory_format=torch.channels_last if v.channels_last else torch.contiguous_format)
        calls[v.name] = train_step_call(engines, x_v, noise, v.order)
    command = "python bench/vs_authors.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    machine = describe(rank_device) if rank_device.type == "cuda" else f"{cpu_model()}, {os.cpu_count()} cores"
    load = os.getloadavg()[0]
    print(f"# {command.strip()}\n"
          f"# {machine}, {torch.get_num_threads()} threads; torch {torch.__version__}; load {load:.2f}\n"
          f"# device {rank_device}; {format_flags(backend_flags())}\n"
          f"# {args.resolution_px} px, latent {LATENT_DIM}, batch {args.batch}, ZeRO 1; {peak.describe()}\n"
          f"# model GFLOP per image per step: " + ", ".join(f"{k} {f / 1e9:.1f}" for k, f in flops.items()),
          flush=True)
    times = run_rounds(calls, warmup_steps=1, steps=args.steps, device=rank_device)
    clean, note = rounds_for_medians(times, args.min_cpu_share, rank_device)
    print(note)
    medians = median_wall_s(times, clean)
    print("| variant | s/step | images/s | vs authors | model TFLOP/s | MFU (bf16 peak) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, median in medians.items():
        tflops = flops[name] * args.batch / median / 1e12
        rows.append({"variant": name, "median_step_s": median, "images_per_s": args.batch / median,
                     "vs_authors": medians["authors"] / median, "model_tflop_per_s": tflops,
                     "mfu": tflops / peak.best, "step_s": times[name].wall_s, "cpu_share": times[name].cpu_share})
        print(f"| {name} | {median:.2f} | {args.batch / median:.3f} | {medians['authors'] / median:.2f}x | "
              f"{tflops:.3f} | {100 * tflops / peak.best:.0f}% |")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": command.strip(), "device": device_record(rank_device), "backend_flags": backend_flags(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average_at_start": load,
            "resolution_px": args.resolution_px, "batch": args.batch, "steps": args.steps,
            "min_cpu_share": args.min_cpu_share if cpu_share_filters(rank_device) else None, "rounds_used": clean,
            "peak_tflops": {**asdict(peak), "best": peak.best}, "model_flops_per_image": flops, "results": rows,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
