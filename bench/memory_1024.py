"""Activation memory per image at 1024x1024, with and without checkpointing, and its step time.

What: one full training step (`algorithm.train_step`, Algorithm 1) of the 1024 preset's
networks (Table 3, latent 512, BatchNorm, bf16, channels-last, fused Adam) through the two
DeepSpeed engines, in three checkpointing variants:

* `none`: no recomputation (`model.checkpoint_blocks=false`);
* `all`: every residual block recomputed (`model.checkpoint_blocks=true`);
* `side>=N`: only blocks whose input is at least N px on a side (`model.checkpoint_min_side_px=N`).

How: each (variant, batch) runs in a fresh process, so one variant's freed memory cannot hide
another's peak. glibc is told to map every allocation above 64 KiB on its own
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and the resident set
follows the live tensors. After an untimed warm-up step (which also creates Adam's state), each
timed step resets the kernel's peak counter (/proc/self/clear_refs, 5), reads the resident set
before the step, and the peak after it: the step's peak working memory on top of weights,
gradients and optimiser state. Activation memory per image is the slope between two batch
sizes, (peak(B2) - peak(B1)) / (B2 - B1), which cancels everything that does not grow with the
batch. Processes run in the order none, all, side>=N for each batch, one after another.

The largest batch for a GPU is extrapolated, not measured: (capacity - fixed) / per-image,
with fixed = 20 bytes per parameter (ZeRO on one GPU with bf16: bf16 weights and gradients,
fp32 master weights, fp32 gradient partition, Adam's two fp32 moments) plus the per-step
intercept measured here, plus 3 GiB kept back for the CUDA context, cuDNN workspaces and
fragmentation. The per-image figure is the CPU's: the same tensors are saved for backward on a
GPU, but cuDNN's workspaces are not in it.

    python bench/memory_1024.py
    python bench/memory_1024.py --batches 2 4 --min-side-px 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESOLUTION_PX, LATENT_DIM = 1024, 512
GIB = 2**30
#: Bytes per parameter on one GPU under ZeRO with bf16 (see the module docstring).
BYTES_PER_PARAM = 20
CUDA_RESERVE_BYTES = 3 * GIB
GPU_CAPACITIES_GB = (80, 141)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(variant: str, min_side_px: int, batch: int, steps: int) -> dict[str, object]:
    """One process: build the engines, warm up, then time `steps` steps and their peak memory."""
    from step_throughput import SEED, Setup, build_variant  # bench/ helpers

    from introvae_dist import engine
    from introvae_dist.algorithm import StepNoise, train_step
    from introvae_dist.distributed import world_from_env
    from introvae_dist.losses import LossWeights

    world_from_env()
    engine.init_distributed()
    torch.set_num_threads(os.cpu_count() or 1)
    e, g = build_variant(Setup(RESOLUTION_PX, batch, 1, variant != "none"), "bf16", channels_last=True,
                         fused_adam=True, latent_dim=LATENT_DIM, min_side_px=min_side_px if variant == "side" else 0)
    params = sum(p.numel() for net in (e.module, g.module) for p in net.parameters())
    rng = torch.Generator().manual_seed(SEED + 1)
    x = torch.rand(batch, 3, RESOLUTION_PX, RESOLUTION_PX, generator=rng).contiguous(memory_format=torch.channels_last)
    noise = StepNoise.sample(batch, LATENT_DIM, rng, torch.device("cpu"))
    weights = LossWeights(alpha=0.25, beta=0.0025, margin=90.0)  # Sec. 4.1 at 1024
    train_step(e, g, x, noise, weights)  # warm-up: Adam's state, oneDNN's kernels
    peaks, times = [], []
    for _ in range(steps):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = _status_bytes("VmRSS")
        start = time.perf_counter()
        train_step(e, g, x, noise, weights)["loss_g"].item()
        times.append(time.perf_counter() - start)
        peaks.append(_status_bytes("VmHWM") - before)
    return {"variant": variant, "batch": batch, "params": params, "step_peak_bytes": statistics.median(peaks),
            "step_s": statistics.median(times)}


def run_child(variant: str, min_side_px: int, batch: int, steps: int) -> dict[str, object]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MASTER_PORT=str(29500 + batch))
    cmd = [sys.executable, __file__, "--child", variant, "--min-side-px", str(min_side_px), "--batches", str(batch),
           "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4], help="two batch sizes for the slope")
    parser.add_argument("--min-side-px", type=int, default=256, help="the side>=N variant's threshold")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process")
    parser.add_argument("--child", choices=("none", "all", "side"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.min_side_px, args.batches[0], args.steps)), flush=True)
        return 0
    if len(args.batches) != 2 or not 1 <= args.batches[0] < args.batches[1]:
        parser.error("--batches: expected two increasing batch sizes, e.g. 2 4")
    b1, b2 = args.batches
    print(f"# python bench/memory_1024.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
          f"# {RESOLUTION_PX} px, latent {LATENT_DIM}, bf16, channels-last, ZeRO 1, {os.cpu_count()} threads, "
          f"batches {b1} and {b2}, {args.steps} timed steps per process", flush=True)
    names = {"none": "none", "all": "all", "side": f"side>={args.min_side_px}"}
    results: dict[str, dict[int, dict[str, object]]] = {v: {} for v in names}
    for batch in (b1, b2):
        for variant in names:
            r = run_child(variant, args.min_side_px, batch, args.steps)
            results[variant][batch] = r
            print(f"  {names[variant]:>10} batch {batch}: step peak {r['step_peak_bytes'] / GIB:6.2f} GiB, "
                  f"{r['step_s']:6.2f} s/step", flush=True)
    params = int(results["none"][b1]["params"])  # type: ignore[arg-type]
    print(f"# parameters (E + G): {params / 1e6:.1f} M; fixed per GPU: {BYTES_PER_PARAM} B/param = "
          f"{params * BYTES_PER_PARAM / GIB:.2f} GiB + {CUDA_RESERVE_BYTES / GIB:.0f} GiB reserve")
    per_image = {v: (float(r[b2]["step_peak_bytes"]) - float(r[b1]["step_peak_bytes"])) / (b2 - b1)  # type: ignore[arg-type]
                 for v, r in results.items()}
    header = "| checkpointing | activation GiB/image | vs none | s/step at batch {b} | vs none | " \
             "largest batch 80 GB | largest batch 141 GB |"
    print(header.format(b=b2))
    print("|---|---|---|---|---|---|---|")
    for v, r in results.items():
        intercept = float(r[b1]["step_peak_bytes"]) - per_image[v] * b1  # type: ignore[arg-type]
        fixed = params * BYTES_PER_PARAM + CUDA_RESERVE_BYTES + max(intercept, 0.0)
        fits = [int((cap * 1e9 - fixed) // per_image[v]) for cap in GPU_CAPACITIES_GB]
        step_s, step_none = float(r[b2]["step_s"]), float(results["none"][b2]["step_s"])  # type: ignore[arg-type]
        print(f"| {names[v]} | {per_image[v] / GIB:.3f} | {per_image[v] / per_image['none']:.0%} | {step_s:.2f} | "
              f"{step_s / step_none - 1:+.0%} | {fits[0]} | {fits[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
