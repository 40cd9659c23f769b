"""Images/s of the evaluation's three costs: generating samples, FID Inception features, MS-SSIM.

What is measured, each on one batch per round, in one process (one rank's work):

* ``generate``: :func:`introvae_dist.inference.generated_batches` with the preset's generator
  (Table 3 at ``--resolution-px``, latent 256, BatchNorm in eval mode, fp32 as the commands
  load it): per-image seeded latents, the forward pass, rounding to 8 bits; what ``sample`` and
  ``evaluate`` do per image;
* ``inception``: the FID Inception-v3 (:mod:`introvae_dist.metrics.inception`) on 8-bit
  images of that side, resized to 299 inside, pool3 features; what FID costs per generated
  and per real image. Its weights are the standard file's with ``--inception PATH``, else
  random (the time is the same: same network, same shapes; the output says which);
* ``ms_ssim``: PGGAN's MS-SSIM (:mod:`introvae_dist.metrics.ms_ssim`) on pairs at 128 px;
  reported per pair.

Variants alternate in rounds after a warm-up round, as in the other benchmarks; medians over
rounds in which every variant had at least ``--min-cpu-share`` of the cores (process CPU time /
(wall time x threads)). The protocol line below the table is arithmetic on the medians, not a
measurement: the paper's 50,000 samples through generator and Inception, 30,000 real images
(CelebA-HQ) through Inception, 10,000 MS-SSIM pairs.

    python bench/eval_throughput.py
    python bench/eval_throughput.py --resolution-px 256 --batch 8 --rounds 3 --inception pt_inception.pth
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from step_throughput import cpu_model  # noqa: E402  (bench/, the script's own folder)

from introvae_dist.images import to_uint8
from introvae_dist.inference import generated_batches
from introvae_dist.metrics.inception import FIDInceptionV3, load_fid_inception
from introvae_dist.metrics.ms_ssim import ms_ssim
from introvae_dist.models import Generator, table3_widths

LATENT_DIM = 256
MS_SSIM_PX = 128
#: The paper's protocol (Table 2), for the derived line.
PROTOCOL_SAMPLES, PROTOCOL_REAL, PROTOCOL_PAIRS = 50_000, 30_000, 10_000


def variants(resolution_px: int, batch: int, inception: Path | None) -> tuple[dict[str, Callable[[], int]], str]:
    """name -> a callable that processes one batch and returns how many items it did."""
    torch.manual_seed(0)
    generator = Generator(resolution_px, LATENT_DIM, table3_widths(resolution_px), "batch", False).eval()
    if inception is not None:
        network, network_id = load_fid_inception(inception)
        weights = f"weights {inception} ({network_id})"
    else:
        network = FIDInceptionV3().eval().requires_grad_(False)
        weights = "random weights (no --inception file; the same network and time per image)"
    counter = iter(range(10**12))
    images = to_uint8(torch.rand(batch, 3, resolution_px, resolution_px, generator=torch.Generator().manual_seed(1)))
    pair_side = min(MS_SSIM_PX, resolution_px)
    pairs = to_uint8(torch.rand(batch, 3, pair_side, pair_side, generator=torch.Generator().manual_seed(2)))

    def generate() -> int:
        start = next(counter) * batch  # new images every round, as a long evaluation draws them
        return sum(int(to_uint8(x).shape[0]) for _, x in generated_batches(generator, start, start + batch, 0, batch, "cpu"))

    @torch.no_grad()
    def inception_features() -> int:
        return int(network(images.float() / 255.0).shape[0])

    def pair_ms_ssim() -> int:
        return int(ms_ssim(pairs[0::2], pairs[1::2]).numel())

    return {"generate": generate, "inception": inception_features, "ms_ssim": pair_ms_ssim}, weights


def timed(work: Callable[[], int]) -> tuple[float, int, float]:
    """(wall seconds, items, share of the cores this process got meanwhile)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    items = work()
    wall = time.perf_counter() - start
    return wall, items, (time.process_time() - cpu_start) / (wall * torch.get_num_threads())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution-px", type=int, default=128, help="generator side; Table 3 widths (default 128)")
    parser.add_argument("--batch", type=int, default=16, help="images per batch, even (default 16)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--inception", type=Path, help="the FID Inception weights file (default: random weights)")
    parser.add_argument("--min-cpu-share", type=float, default=0.9,
                        help="leave out rounds where a variant had less of the cores (0 keeps all)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.batch % 2 or args.rounds < 1 or args.threads < 1:
        parser.error("expected an even --batch >= 2, --rounds >= 1, --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python", "bench/eval_throughput.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    work, weights = variants(args.resolution_px, args.batch, args.inception)
    load_at_start = os.getloadavg()[0]
    print(f"# {command}")
    print(f"# {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"1-min load average at start {load_at_start:.2f}")
    print(f"# generator: Table 3 at {args.resolution_px} px, latent {LATENT_DIM}, fp32, batch {args.batch}; "
          f"Inception: {weights}; MS-SSIM: {args.batch // 2} pairs at {min(MS_SSIM_PX, args.resolution_px)} px")
    times: dict[str, list[tuple[float, int, float]]] = {name: [] for name in work}
    for round_index in range(args.rounds + 1):
        label = "warm-up" if round_index == 0 else f"round {round_index}"
        for name, fn in work.items():
            wall, items, share = timed(fn)
            print(f"  {label:>8} {name:>9}: {wall:7.3f} s for {items} ({items / wall:8.2f}/s), cpu share {share:4.2f}",
                  flush=True)
            if round_index:
                times[name].append((wall, items, share))
    clean = [i for i in range(args.rounds) if all(t[i][2] >= args.min_cpu_share for t in times.values())]
    if clean:
        print(f"# medians over {len(clean)} of {args.rounds} rounds (left out: rounds where a variant had "
              f"< {args.min_cpu_share:.2f} of the cores)")
    else:
        clean = list(range(args.rounds))
        print(f"# WARNING: every round had a variant with < {args.min_cpu_share:.2f} of the cores; another process "
              f"was running, so the medians below are the machine's load as much as the work's")
    rates = {name: statistics.median(t[i][1] / t[i][0] for i in clean) for name, t in times.items()}
    shares = {name: statistics.median(t[i][2] for i in clean) for name, t in times.items()}
    print(f"{'variant':<10} {'per second':>11} {'unit':>6} {'cpu share':>9}")
    for name in work:
        print(f"{name:<10} {rates[name]:>11.2f} {'pairs' if name == 'ms_ssim' else 'images':>6} {shares[name]:>9.2f}")
    protocol_s = ((PROTOCOL_SAMPLES / rates["generate"]) + (PROTOCOL_SAMPLES + PROTOCOL_REAL) / rates["inception"]
                  + PROTOCOL_PAIRS / rates["ms_ssim"])
    print(f"# derived: the paper's protocol ({PROTOCOL_SAMPLES:,} samples, {PROTOCOL_REAL:,} real images, "
          f"{PROTOCOL_PAIRS:,} pairs) would take {protocol_s / 3600:.1f} h in one such process "
          f"(real statistics are cached after the first run)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": command, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average_at_start": load_at_start, "inception": weights,
            "resolution_px": args.resolution_px, "batch": args.batch, "rounds_used": clean,
            "per_second": rates, "cpu_share": shares,
            "rounds": {name: [{"wall_s": w, "items": n, "cpu_share": s} for w, n, s in t] for name, t in times.items()},
            "derived_protocol_hours": protocol_s / 3600,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
