"""Does torch.compile speed up the networks? Eager against compiled, side by side, bf16.

What: one forward and backward of E on an image batch and of G on a latent batch (the 128
preset's networks: Table 3 at 128 px, latent 256, BatchNorm, no checkpointing), bf16 weights,
channels-last activations, batch 8, as plain modules (no DeepSpeed, no optimiser): the part of
a training step that `torch.compile` (inductor, CPU C++ backend) could fuse, since convolutions
stay in oneDNN either way and the rest (BatchNorm, LeakyReLU, residual adds, pooling,
upsampling) is elementwise work. The first compiled call's time, compilation included, is
printed separately. Rounds alternate eager and compiled after a warm-up (`step_throughput.run_rounds`);
medians over the rounds in which both had the cores (`--min-cpu-share`).

With `--profile`, instead: torch.profiler over one eager forward and backward, and the share of
the CPU time spent in convolution kernels (forward and backward) against everything else,
which is what bounds any fusion from compiling.

    python bench/compile_modules.py
    python bench/compile_modules.py --profile
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

from step_throughput import (
    median_wall_s,
    rounds_for_medians,
    run_rounds,
    seeded_networks,
    step_inputs,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="profile eager instead of comparing")
    parser.add_argument("--min-cpu-share", type=float, default=0.9,
                        help="leave out rounds where a variant had less of the cores")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    x, noise = step_inputs(128, 8, 1)
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    z = noise.z_prior.to(torch.bfloat16)

    def networks(compiled: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
        enc, gen = seeded_networks(128, checkpointing=False)
        enc, gen = enc.to(torch.bfloat16), gen.to(torch.bfloat16)
        gen.activation_memory_format = torch.channels_last
        return (torch.compile(enc), torch.compile(gen)) if compiled else (enc, gen)

    def fwd_bwd(enc: torch.nn.Module, gen: torch.nn.Module) -> None:
        mu, logvar = enc(x)
        (mu.float().sum() + logvar.float().sum()).backward()
        gen(z).float().square().mean().backward()

    if args.profile:
        return profile(fwd_bwd, networks(False), sys.argv[1:] if argv is None else argv)
    variants = {"eager": networks(False), "compiled": networks(True)}
    start = time.perf_counter()
    fwd_bwd(*variants["compiled"])
    print(f"# python bench/compile_modules.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
          f"# torch {torch.__version__}, {torch.get_num_threads()} threads; first compiled call (compiling): "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    calls = {name: (lambda nets=nets: fwd_bwd(*nets)) for name, nets in variants.items()}
    times = run_rounds(calls, warmup_steps=1, steps=args.rounds)
    rounds, note = rounds_for_medians(times, args.min_cpu_share)
    print(note)
    medians = median_wall_s(times, rounds)
    print("| variant | s per E+G forward and backward | vs eager |")
    print("|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median:.3f} | {medians['eager'] / median:.2f}x |")
    return 0


def profile(fwd_bwd: Callable[[torch.nn.Module, torch.nn.Module], None],
            nets: tuple[torch.nn.Module, torch.nn.Module], argv: list[str]) -> int:
    """Share of one eager forward and backward's CPU time in convolution kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fwd_bwd(*nets)  # warm-up: oneDNN picks its kernels
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fwd_bwd(*nets)
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    conv = sum(us for key, us in self_us.items() if "convolution" in key)
    print(f"# python bench/compile_modules.py {' '.join(argv)}\n# torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; one eager E+G forward and backward, bf16, channels-last, batch 8")
    print(f"convolution kernels (forward and backward): {conv / total:.0%} of {total / 1e6:.2f} s CPU time; "
          f"everything else {1 - conv / total:.0%}")
    for key, us in sorted(self_us.items(), key=lambda kv: -kv[1])[:6]:
        print(f"  {key:<40} {us / total:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
