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
batch; with more than two `--batches` it is the least-squares slope over all of them (on a GPU
this shows whether the peak grows linearly up to large batches, cuDNN's workspaces included).
Processes run in the order none, all, side>=N for each batch, one after another.

With `--device cuda` (passed on to every child) the engines are on the GPU (DeepSpeed's
accelerator, the rank's device from `engine.init_distributed`), the batch and the noise are
made there, and the host's memory is not read: each timed step starts with
`torch.cuda.reset_peak_memory_stats()` and the step's peak is `torch.cuda.max_memory_allocated()`
after it minus `torch.cuda.memory_allocated()` before it (the caching allocator's live tensors,
cuDNN's workspaces included); the total peak (max_memory_allocated itself) and
`torch.cuda.max_memory_reserved()` (what the allocator held from the driver, fragmentation
included) are printed per batch beside it. Step times are taken with the GPU synchronised at
both ends (bench/device.py). The CUDA context itself is outside all three figures.

The largest batch for a GPU in the table is extrapolated, not measured: (capacity - fixed) /
per-image, plus 3 GiB kept back for the CUDA context, cuDNN workspaces and fragmentation. On
the CPU fixed = 20 bytes per parameter (ZeRO on one GPU with bf16: bf16 weights and gradients,
fp32 master weights, fp32 gradient partition, Adam's two fp32 moments) plus the per-step
intercept measured here, and the per-image figure is the CPU's: the same tensors are saved for
backward on a GPU, but cuDNN's workspaces are not in it. On a GPU fixed is measured: the total
peak at the smaller batch less its activations (per-image x batch). On a GPU the largest batch
is better measured than extrapolated: run `--batches` near the extrapolated figure and read
the measured peaks per batch.

    python bench/memory_1024.py
    python bench/memory_1024.py --batches 2 4 --min-side-px 256
    python bench/memory_1024.py --device cuda --batches 8 16 --json /tmp/memory_1024_gpu.json
    python bench/memory_1024.py --device cuda --batches 8 16 32 --min-side-px 512 --steps 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from device import add_device_arguments, require_device

SCRIPT = "bench/memory_1024.py"
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


def gib(size_bytes: object) -> float:
    """A byte count of a child's JSON record in GiB."""
    return float(size_bytes) / GIB  # type: ignore[arg-type]


def child(variant: str, min_side_px: int, batch: int, steps: int, device_name: str) -> dict[str, object]:
    """One process: build the engines, warm up, then time `steps` steps and their peak memory
    (the host's resident set on the CPU, the caching allocator's peaks on CUDA)."""
    from device import describe, device_record, require_rank_device, synchronize, timed
    from step_throughput import SEED, Setup, build_variant, engines_device, step_inputs  # bench/ helpers

    from introvae_dist import engine
    from introvae_dist.algorithm import train_step
    from introvae_dist.distributed import world_from_env
    from introvae_dist.losses import LossWeights

    device = require_device(device_name, SCRIPT)
    world_from_env()
    rank_device = require_rank_device(device, engine.init_distributed(), SCRIPT)
    torch.set_num_threads(os.cpu_count() or 1)
    e, g = build_variant(Setup(RESOLUTION_PX, batch, 1, variant != "none"), "bf16", channels_last=True,
                         fused_adam=True, latent_dim=LATENT_DIM, min_side_px=min_side_px if variant == "side" else 0)
    params = sum(p.numel() for net in (e.module, g.module) for p in net.parameters())
    # The inputs follow the engines (DeepSpeed's accelerator).
    x, noise = step_inputs(RESOLUTION_PX, batch, SEED + 1, LATENT_DIM, engines_device({variant: (e, g)}))
    x = x.contiguous(memory_format=torch.channels_last)
    weights = LossWeights(alpha=0.25, beta=0.0025, margin=90.0)  # Sec. 4.1 at 1024
    train_step(e, g, x, noise, weights, adopt=engine.adopt_outputs)  # warm-up: Adam's state, oneDNN's / cuDNN's kernels
    synchronize(rank_device)
    on_gpu = rank_device.type == "cuda"
    peaks, totals, reserved, times = [], [], [], []
    for _ in range(steps):
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(rank_device)  # the peaks from here on: this step's
            before = torch.cuda.memory_allocated(rank_device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
            before = _status_bytes("VmRSS")
        wall_s, _ = timed(lambda: train_step(e, g, x, noise, weights, adopt=engine.adopt_outputs)["loss_g"].item(),
                          rank_device)
        times.append(wall_s)
        if on_gpu:
            totals.append(torch.cuda.max_memory_allocated(rank_device))
            reserved.append(torch.cuda.max_memory_reserved(rank_device))
            peaks.append(totals[-1] - before)
        else:
            peaks.append(_status_bytes("VmHWM") - before)
    result: dict[str, object] = {"variant": variant, "batch": batch, "params": params,
                                 "step_peak_bytes": statistics.median(peaks), "step_s": statistics.median(times),
                                 "device": device_record(rank_device), "device_description": describe(rank_device)}
    if on_gpu:
        result |= {"total_peak_bytes": statistics.median(totals), "reserved_peak_bytes": statistics.median(reserved)}
    return result


def slope(xs: list[int], ys: list[float]) -> float:
    """The least-squares slope of ys over xs; with two points, (y2 - y1) / (x2 - x1)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
            / sum((x - mean_x) ** 2 for x in xs))


def run_child(variant: str, min_side_px: int, batch: int, steps: int, device: torch.device) -> dict[str, object]:
    env = dict(os.environ, MASTER_PORT=str(29500 + batch))
    if device.type == "cpu":  # freed tensors leave the resident set at once (see the module docstring)
        env |= {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, __file__, "--child", variant, "--min-side-px", str(min_side_px), "--batches", str(batch),
           "--steps", str(steps), "--device", device.type]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4],
                        help="two or more increasing batch sizes for the slope (least squares over all)")
    parser.add_argument("--min-side-px", type=int, default=256, help="the side>=N variant's threshold")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process")
    parser.add_argument("--json", type=Path, help="also write the children's results and the table here as JSON")
    parser.add_argument("--child", choices=("none", "all", "side"), help=argparse.SUPPRESS)
    add_device_arguments(parser, convolutions=False)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.min_side_px, args.batches[0], args.steps, args.device)), flush=True)
        return 0
    batches: list[int] = args.batches
    if len(batches) < 2 or batches[0] < 1 or any(a >= b for a, b in zip(batches, batches[1:])):
        parser.error("--batches: expected two or more increasing batch sizes, e.g. 2 4")
    # Before any child starts. The parent never touches the GPU beyond this check (no CUDA
    # context of its own on the device the children measure); the children report its name.
    device = require_device(args.device, SCRIPT)
    on_gpu = device.type == "cuda"
    b1, b2 = batches[0], batches[-1]  # the smallest (fixed memory) and the largest (step time)
    command = f"python {SCRIPT} {' '.join(sys.argv[1:] if argv is None else argv)}"
    print(f"# {command}\n"
          f"# {RESOLUTION_PX} px, latent {LATENT_DIM}, bf16, channels-last, ZeRO 1, {os.cpu_count()} threads, "
          f"batches {', '.join(map(str, batches))}, {args.steps} timed steps per process, device {device.type}; step peak = "
          + ("max_memory_allocated - memory_allocated before the step" if on_gpu else "VmHWM - VmRSS before the step"),
          flush=True)
    names = {"none": "none", "all": "all", "side": f"side>={args.min_side_px}"}
    results: dict[str, dict[int, dict[str, object]]] = {v: {} for v in names}
    for batch in batches:
        for variant in names:
            r = run_child(variant, args.min_side_px, batch, args.steps, device)
            results[variant][batch] = r
            if on_gpu and batch == b1 and variant == "none":
                print(f"# device: {r['device_description']}", flush=True)
            gpu = (f", total peak {gib(r['total_peak_bytes']):6.2f} GiB, "
                   f"reserved peak {gib(r['reserved_peak_bytes']):6.2f} GiB" if on_gpu else "")
            print(f"  {names[variant]:>10} batch {batch}: step peak {gib(r['step_peak_bytes']):6.2f} GiB{gpu}, "
                  f"{r['step_s']:6.2f} s/step (measured)", flush=True)
    params = int(results["none"][b1]["params"])  # type: ignore[arg-type]
    if on_gpu:
        print(f"# parameters (E + G): {params / 1e6:.1f} M; fixed per GPU: measured, total peak at batch {b1} "
              f"less per-image x {b1}, + {CUDA_RESERVE_BYTES / GIB:.0f} GiB reserve")
    else:
        print(f"# parameters (E + G): {params / 1e6:.1f} M; fixed per GPU: {BYTES_PER_PARAM} B/param = "
              f"{params * BYTES_PER_PARAM / GIB:.2f} GiB + {CUDA_RESERVE_BYTES / GIB:.0f} GiB reserve")
    per_image = {v: slope(batches, [float(r[b]["step_peak_bytes"]) for b in batches])  # type: ignore[arg-type]
                 for v, r in results.items()}
    header = "| checkpointing | activation GiB/image | vs none | s/step at batch {b} | vs none | " \
             "largest batch 80 GB (extrapolated) | largest batch 141 GB (extrapolated) |"
    print(header.format(b=b2))
    print("|---|---|---|---|---|---|---|")
    table = []
    for v, r in results.items():
        if on_gpu:  # weights, gradients, master weights, Adam's moments and the step's intercept, as measured
            fixed = float(r[b1]["total_peak_bytes"]) - per_image[v] * b1 + CUDA_RESERVE_BYTES  # type: ignore[arg-type]
        else:
            intercept = float(r[b1]["step_peak_bytes"]) - per_image[v] * b1  # type: ignore[arg-type]
            fixed = params * BYTES_PER_PARAM + CUDA_RESERVE_BYTES + max(intercept, 0.0)
        fits = [int((cap * 1e9 - fixed) // per_image[v]) for cap in GPU_CAPACITIES_GB]
        step_s, step_none = float(r[b2]["step_s"]), float(results["none"][b2]["step_s"])  # type: ignore[arg-type]
        table.append({"variant": names[v], "activation_bytes_per_image": per_image[v], "fixed_bytes": fixed,
                      "largest_batch_extrapolated": dict(zip(map(str, GPU_CAPACITIES_GB), fits))})
        print(f"| {names[v]} | {per_image[v] / GIB:.3f} | {per_image[v] / per_image['none']:.0%} | {step_s:.2f} | "
              f"{step_s / step_none - 1:+.0%} | {fits[0]} | {fits[1]} |")
    print("# largest batch: extrapolated from the measured batches, not measured; on a GPU measure it "
          "with --batches near that figure")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": command, "device": results["none"][b1]["device"], "torch": torch.__version__,
            "batches": batches, "steps": args.steps, "min_side_px": args.min_side_px,
            "measured": {names[v]: [r[b] for b in batches] for v, r in results.items()}, "table": table,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
