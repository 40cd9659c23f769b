"""The device's measured peak: TFLOP/s of single 3x3 convolutions and of one large matmul, bf16 and fp32.

Model FLOP utilisation (MFU) in the other benchmarks divides achieved model TFLOP/s by the
bf16 peak this measures, not by a datasheet number: on a CPU the reachable rate depends on
the vector units (AVX-512 BF16 or AMX), the core count and the clock, which vary by VM; on a
GPU it depends on the part, its clocks and power limit, and the libraries' kernels. The MFU
denominator is the higher of the two measured bf16 rates (the best 3x3 convolution in
channels-last, and the matmul), `PeakTflops.best`.

What: forward passes of one `nn.Conv2d` (3x3, padding 1, no bias) at the channel widths and
sides Table 3's networks use, batch 8, under `torch.no_grad()`; 2 untimed samples, then the
median of `--repeats` timed samples per shape. FLOPs = 2 x B x H x W x C_in x C_out x 9. The
conv peak is the best shape's rate. Both memory layouts (NCHW and channels-last) and both
dtypes are measured, so the table also shows what bf16 and channels-last can buy at best.
Then one square matmul, N x N @ N x N (FLOPs = 2 N^3), timed the same way, bf16 and fp32.

With `--device cuda` the tensors and the convolution live on the GPU, the clock is read
with the GPU synchronised at both ends of each sample (bench/device.py), and each sample is
20 back-to-back passes, so the launch latency of one small kernel does not count as the
kernel's time; N is 8192 there. Backend switches are torch's defaults (so fp32 convolutions
may run in TF32 under cuDNN's default `allow_tf32`; fp32 matmuls do not) unless
`--cudnn-benchmark` is given; the header prints them. On the CPU N is 512: this script's
CPU builds run bf16 matmuls far slower than bf16 convolutions (on the 2-core Zen 3 VM
without AVX-512 BF16 a 2048 bf16 matmul took about a minute), so a larger N costs minutes
and the convolution sets the peak there anyway.

    python bench/conv_peak.py
    python bench/conv_peak.py --device cuda --cudnn-benchmark --json /tmp/conv_peak.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from device import (
    add_device_arguments,
    backend_flags,
    describe,
    device_record,
    format_flags,
    require_device,
    set_cudnn_benchmark,
    synchronize,
)

SCRIPT = "bench/conv_peak.py"
#: (C_in, C_out, side) of 3x3 convolutions in the 128-1024 px networks of Table 3.
SHAPES: tuple[tuple[int, int, int], ...] = ((128, 128, 64), (128, 256, 64), (256, 256, 32), (512, 512, 16),
                                            (512, 512, 8))
BATCH = 8
WARMUP_SAMPLES = 2
#: Passes per timed sample: on a GPU one pass of the small shapes is tens of microseconds,
#: the order of a launch plus a synchronisation, so a sample runs several back to back.
PASSES_PER_SAMPLE = {"cpu": 1, "cuda": 20}
#: Side N of the square matmul (see the module docstring for the CPU's small N).
MATMUL_SIDE = {"cpu": 512, "cuda": 8192}


@dataclass(frozen=True)
class PeakTflops:
    """The measured bf16 peaks of one device; `best` is the denominator of MFU."""

    conv_bf16: float
    matmul_bf16: float
    matmul_side: int

    @property
    def best(self) -> float:
        return max(self.conv_bf16, self.matmul_bf16)

    def describe(self) -> str:
        return (f"measured bf16 peak {self.best:.3f} TFLOP/s (3x3 conv {self.conv_bf16:.3f}, "
                f"matmul {self.matmul_side}^2 {self.matmul_bf16:.3f}; bench/conv_peak.py)")


def median_tflops(run: Callable[[], object], flops: float, device: torch.device, repeats: int) -> float:
    """Median TFLOP/s of `run` (one pass of `flops`) over `repeats` timed samples, after the
    untimed warm-up samples (cuDNN's algorithm choice, oneDNN's kernels, the allocator)."""
    passes = PASSES_PER_SAMPLE[device.type]
    times = []
    with torch.no_grad():
        for i in range(WARMUP_SAMPLES + repeats):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(passes):
                run()
            synchronize(device)
            if i >= WARMUP_SAMPLES:
                times.append((time.perf_counter() - start) / passes)
    return flops / statistics.median(times) / 1e12


def conv_tflops(c_in: int, c_out: int, side: int, dtype: torch.dtype, channels_last: bool, repeats: int,
                device: torch.device) -> float:
    """Median TFLOP/s of one 3x3 convolution's forward pass on `device`."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(BATCH, c_in, side, side, dtype=dtype, device=device).contiguous(memory_format=fmt)
    return median_tflops(lambda: conv(x), 2 * BATCH * side * side * c_in * c_out * 9, device, repeats)


def matmul_tflops(side: int, dtype: torch.dtype, repeats: int, device: torch.device) -> float:
    """Median TFLOP/s of one `side` x `side` @ `side` x `side` matmul on `device`."""
    a = torch.randn(side, side, dtype=dtype, device=device)
    b = torch.randn(side, side, dtype=dtype, device=device)
    return median_tflops(lambda: a @ b, 2 * side**3, device, repeats)


def peak_tflops(device: torch.device, repeats: int = 5, matmul_side: int | None = None) -> PeakTflops:
    """The device's bf16 peaks: the best of SHAPES in channels-last and the matmul; the
    higher of the two (`.best`) is the denominator of MFU."""
    side = MATMUL_SIDE[device.type] if matmul_side is None else matmul_side
    conv = max(conv_tflops(*shape, torch.bfloat16, True, repeats, device) for shape in SHAPES)
    return PeakTflops(conv, matmul_tflops(side, torch.bfloat16, repeats, device), side)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per shape (median)")
    parser.add_argument("--matmul-side", type=int, help="N of the N x N matmul (default: 512 on cpu, 8192 on cuda)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or (args.matmul_side is not None and args.matmul_side < 1):
        parser.error("expected --repeats >= 1, --threads >= 1, --matmul-side >= 1")
    device = require_device(args.device, SCRIPT)
    set_cudnn_benchmark(args.cudnn_benchmark)
    torch.set_num_threads(args.threads)
    matmul_side = MATMUL_SIDE[device.type] if args.matmul_side is None else args.matmul_side
    command = f"python {SCRIPT} {' '.join(sys.argv[1:] if argv is None else argv)}"
    flags = backend_flags()
    print(f"# {command}\n"
          f"# {describe(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads\n"
          f"# batch {BATCH}, 3x3 conv forward; {PASSES_PER_SAMPLE[device.type]} pass(es) per sample, "
          f"median of {args.repeats}; {format_flags(flags)}", flush=True)
    print("| C_in -> C_out @ side | bf16 channels-last | bf16 NCHW | fp32 channels-last | fp32 NCHW |")
    print("|---|---|---|---|---|")
    best: dict[str, float] = {}
    conv_rows = []
    for shape in SHAPES:
        row: dict[str, float] = {}
        for dtype in (torch.bfloat16, torch.float32):
            for channels_last in (True, False):
                key = f"{str(dtype).removeprefix('torch.')} {'channels-last' if channels_last else 'NCHW'}"
                row[key] = conv_tflops(*shape, dtype, channels_last, args.repeats, device)
                best[key] = max(best.get(key, 0.0), row[key])
        conv_rows.append({"c_in": shape[0], "c_out": shape[1], "side_px": shape[2], "tflops": row})
        print(f"| {shape[0]} -> {shape[1]} @ {shape[2]} | " + " | ".join(f"{r:.3f}" for r in row.values()) + " |",
              flush=True)
    print("| **best** | " + " | ".join(f"**{v:.3f}**" for v in best.values()) + " |")
    print(f"bf16 / fp32 peak (channels-last): {best['bfloat16 channels-last'] / best['float32 channels-last']:.2f}x")
    matmul = {str(dtype).removeprefix("torch."): matmul_tflops(matmul_side, dtype, args.repeats, device)
              for dtype in (torch.bfloat16, torch.float32)}
    print(f"matmul {matmul_side} x {matmul_side} @ {matmul_side} x {matmul_side}: "
          + ", ".join(f"{name} {rate:.3f} TFLOP/s" for name, rate in matmul.items()))
    peak = PeakTflops(best["bfloat16 channels-last"], matmul["bfloat16"], matmul_side)
    print(f"MFU denominator (higher of the bf16 conv and matmul peaks): {peak.best:.3f} TFLOP/s")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": command, "device": device_record(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "backend_flags": flags, "batch": BATCH, "repeats": args.repeats,
            "passes_per_sample": PASSES_PER_SAMPLE[device.type], "conv": conv_rows, "conv_best_tflops": best,
            "matmul": {"side": matmul_side, "tflops": matmul},
            "peak": {**asdict(peak), "best": peak.best},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
