"""Data-side requirements per node for LSUN Bedroom 256 and CelebA-HQ 1024 at 8, 64, 512 GPUs.

Arithmetic, not a measurement: it combines
* the model FLOPs per image of one training step (bench/step_throughput.py's count, on the
  meta device),
* a per-GPU step rate: ``--gpu-img-per-s`` if you measured one (bench/step_throughput.py on
  the GPU), else FLOPs / (``--mfu`` x ``--peak-tflops``), labelled as an estimate,
* the loader's measured decode rate per core and bytes per image, from the JSON of
  ``python bench/loader_throughput.py --json FILE``,
into shard counts, read bandwidth and decode cores per node. docs/SCALING.md shows its output.

    python bench/loader_throughput.py --json /tmp/loader.json
    python bench/scaling_table.py --loader-json /tmp/loader.json
    python bench/scaling_table.py --loader-json /tmp/loader.json --gpu-img-per-s 256=900 1024=150
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# One FLOP count for all benchmarks (bench/ is on sys.path when this runs as a script).
from step_throughput import count_step_flops_per_image

GPUS_PER_NODE = 8
GPU_COUNTS = (8, 64, 512)


@dataclass(frozen=True)
class Dataset:
    name: str
    num_images: int
    resolution_px: int
    latent_dim: int
    batch_per_gpu: int  # Table 1 of the paper
    #: key of the loader bench's figures that matches how these shards are stored and read
    decode_key: tuple[str, str]
    bytes_key: str


DATASETS = (
    Dataset("LSUN Bedroom, 256 px (shards re-encoded at 256)", 3_033_042, 256, 512, 32,
            ("256", "shards_stored_256"), "mean_jpeg_bytes_256"),
    Dataset("CelebA-HQ, 1024 px (original 1024 px JPEGs)", 30_000, 1024, 512, 8,
            ("1024", "shards"), "mean_jpeg_bytes"),
)


def epoch_usage(ds: Dataset, streams: int) -> float:
    """Share of the images an epoch-mode epoch uses with this many streams and equal shards."""
    per_stream = ds.num_images // streams
    return streams * (per_stream - per_stream % ds.batch_per_gpu) / ds.num_images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loader-json", type=Path, required=True, help="output of bench/loader_throughput.py --json")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak per GPU (H100/H200 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.35, help="model FLOP utilisation assumed for the estimate")
    parser.add_argument("--gpu-img-per-s", nargs="*", default=[], metavar="RES=IMG_PER_S",
                        help="measured training images/s per GPU, e.g. 256=900 1024=150 (replaces the estimate)")
    parser.add_argument("--workers-per-gpu", type=int, default=4, help="loader workers per rank")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loader = json.loads(args.loader_json.read_text())
    measured = {int(k): float(v) for k, v in (item.split("=") for item in args.gpu_img_per_s)}
    print(f"# loader figures: {loader['command']}")
    for ds in DATASETS:
        flops = count_step_flops_per_image(ds.resolution_px, checkpointing=False, latent_dim=ds.latent_dim)
        if ds.resolution_px in measured:
            gpu_rate, rate_note = measured[ds.resolution_px], "measured"
        else:
            gpu_rate = args.mfu * args.peak_tflops * 1e12 / flops
            rate_note = f"estimate: {args.mfu:.0%} of {args.peak_tflops:.0f} TFLOP/s"
        decode_rate = loader["results"][ds.decode_key[0]][ds.decode_key[1]]
        image_bytes = loader[ds.bytes_key]
        print(f"\n### {ds.name}\n")
        print(f"{ds.num_images:,} images; {flops / 1e9:.1f} GFLOP per image per step; "
              f"{gpu_rate:.0f} img/s per GPU ({rate_note}); loader {decode_rate:.0f} img/s per core; "
              f"{image_bytes / 1024:.1f} KiB per stored image\n")
        print("| GPUs | nodes | workers per GPU | shards at least | images per shard at most | "
              f"epoch-mode steps per epoch (batch {ds.batch_per_gpu}/GPU) | images used per epoch | "
              "read MB/s per node | decode cores per node |")
        print("|---|---|---|---|---|---|---|---|---|")
        for gpus in GPU_COUNTS:
            nodes = max(1, gpus // GPUS_PER_NODE)
            # Epoch mode drops each stream's remainder below a batch: use fewer workers (streams)
            # until at least 95% of the images are used per epoch, or say it cannot be done.
            workers = args.workers_per_gpu
            while workers > 1 and epoch_usage(ds, gpus * workers) < 0.95:
                workers -= 1
            streams = gpus * workers
            usage = epoch_usage(ds, streams)
            steps = (ds.num_images // streams // ds.batch_per_gpu) * workers
            per_node_img_s = gpu_rate * min(gpus, GPUS_PER_NODE)
            print(f"| {gpus} | {nodes} | {workers} | {streams} | {ds.num_images // streams:,} | {steps:,} | "
                  f"{usage:.0%}{'' if usage >= 0.95 else ' (use data.mode=resampled)'} | "
                  f"{per_node_img_s * image_bytes / 1e6:.0f} | {math.ceil(per_node_img_s / decode_rate)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
