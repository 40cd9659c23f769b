"""The machine's measured convolution peak: TFLOP/s of single 3x3 convolutions, bf16 and fp32.

Model FLOP utilisation (MFU) in the other benchmarks divides achieved model TFLOP/s by the
bf16 figure this measures, not by a datasheet number: on a CPU the reachable rate depends on
the vector units (AVX-512 BF16 or AMX), the core count and the clock, which vary by VM.

What: forward passes of one `nn.Conv2d` (3x3, padding 1, no bias) at the channel widths and
sides Table 3's networks use, batch 8, under `torch.no_grad()`; 2 untimed passes, then the
median of `--repeats` timed passes per shape. FLOPs = 2 x B x H x W x C_in x C_out x 9. The
peak is the best shape's rate. Both memory layouts (NCHW and channels-last) and both dtypes
are measured, so the table also shows what bf16 and channels-last can buy at best.

    python bench/conv_peak.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

#: (C_in, C_out, side) of 3x3 convolutions in the 128-1024 px networks of Table 3.
SHAPES: tuple[tuple[int, int, int], ...] = ((128, 128, 64), (128, 256, 64), (256, 256, 32), (512, 512, 16),
                                            (512, 512, 8))
BATCH = 8


def conv_tflops(c_in: int, c_out: int, side: int, dtype: torch.dtype, channels_last: bool, repeats: int) -> float:
    """Median TFLOP/s of one 3x3 convolution's forward pass."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).to(dtype=dtype, memory_format=fmt)
    x = torch.randn(BATCH, c_in, side, side, dtype=dtype).contiguous(memory_format=fmt)
    times = []
    with torch.no_grad():
        for i in range(2 + repeats):
            start = time.perf_counter()
            conv(x)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return 2 * BATCH * side * side * c_in * c_out * 9 / statistics.median(times) / 1e12


def peak_tflops(dtype: torch.dtype = torch.bfloat16, repeats: int = 5) -> float:
    """The best rate over SHAPES in channels-last: the denominator of MFU."""
    return max(conv_tflops(*shape, dtype, True, repeats) for shape in SHAPES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# python bench/conv_peak.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
          f"# torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, 3x3 conv forward")
    print("| C_in -> C_out @ side | bf16 channels-last | bf16 NCHW | fp32 channels-last | fp32 NCHW |")
    print("|---|---|---|---|---|")
    best: dict[str, float] = {}
    for shape in SHAPES:
        row = []
        for dtype in (torch.bfloat16, torch.float32):
            for channels_last in (True, False):
                rate = conv_tflops(*shape, dtype, channels_last, args.repeats)
                key = f"{str(dtype).removeprefix('torch.')} {'channels-last' if channels_last else 'NCHW'}"
                best[key] = max(best.get(key, 0.0), rate)
                row.append(f"{rate:.3f}")
        print(f"| {shape[0]} -> {shape[1]} @ {shape[2]} | " + " | ".join(row) + " |")
    print("| **best** | " + " | ".join(f"**{v:.3f}**" for v in best.values()) + " |")
    print(f"bf16 / fp32 peak (channels-last): {best['bfloat16 channels-last'] / best['float32 channels-last']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
