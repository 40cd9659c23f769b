"""Images/s per loader worker: our shard stream against the authors' one-file-per-image loading.

What is measured, on the same 1024x1024 JPEGs (CelebA-HQ's size), at 256 and 1024 px training
resolution, each in one process on one thread (one loader worker's work):

* ``authors``: the authors' approach: one file per image in a folder; per image
  ``Image.open(path).convert("RGB")`` (a full-size decode), a centre crop, a bicubic resize
  to the training size, conversion to a float tensor; a ``DataLoader`` (no workers) stacks
  batches.
* ``shards``: this package's training stream (``data.loader.TrainStream``, epoch mode, one
  stream, no worker processes) over WebDataset shards holding the same JPEG bytes: sequential
  tar reads, a shuffle buffer, JPEG draft decoding at reduced size when the training size is
  smaller (1024 -> 256 decodes at 1/4 scale), crop, resize, random flip, batch. Training
  converts the uint8 batch to float on the GPU; here the conversion runs on the CPU and is
  timed, so both variants deliver the same float32 batches.

A third variant, ``shards_stored_256``, reads the same images re-encoded at 256 px (q95), as
``introvae-dist shards ... --resize-px 256`` writes LSUN Bedroom; it is timed at 256 px only
and gives the decode rate docs/SCALING.md uses for LSUN.

Both read through the page cache (the files were just written), so this compares CPU work per
image, which is what bounds a loader worker; docs/SCALING.md turns it into cores per node.
Variants run in alternating rounds so machine noise falls on both alike; the median over
rounds is reported with the ratio shards / authors.

The JPEGs are synthetic but photo-like in cost: a smooth rendered scene upscaled to 1024 px
plus sensor-like noise, saved at quality 95, so file size and entropy-decoding work are of the
order of a real CelebA-HQ JPEG (the mean file size is printed; compare with your data).

    python bench/loader_throughput.py
    python bench/loader_throughput.py --images 128 --rounds 5 --json /tmp/loader.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from introvae_dist.data.decode import to_unit_float
from introvae_dist.data.loader import build_train_stream
from introvae_dist.data.shard_set import resolve_shard_set
from introvae_dist.data.shard_writer import write_shards
from introvae_dist.data.synthetic import render_image

SOURCE_PX = 1024
BATCH = 8


def photo_like_jpeg(index: int, rng: np.random.Generator) -> bytes:
    """A 1024 px JPEG (q95) of a rendered scene plus Gaussian noise (sigma 4 of 255)."""
    scene = np.asarray(render_image(index, 256).resize((SOURCE_PX, SOURCE_PX), Image.BICUBIC), dtype=np.float32)
    noisy = np.clip(scene + rng.normal(0.0, 4.0, scene.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_inputs(root: Path, num_images: int) -> tuple[Path, Path, Path, float, float]:
    """The same JPEG bytes as one file per image and as shards, and 256 px re-encodes as shards.

    Returns (folder, shards, shards_256, mean bytes at 1024, mean bytes at 256).
    """
    rng = np.random.default_rng(0)
    folder, shards, shards_256 = root / "files", root / "shards", root / "shards_256"
    folder.mkdir()
    samples, samples_256 = [], []
    for i in range(num_images):
        data = photo_like_jpeg(i, rng)
        (folder / f"{i:05d}.jpg").write_bytes(data)
        samples.append((f"{i:08d}", data, "jpg"))
        small = io.BytesIO()
        Image.open(io.BytesIO(data)).resize((256, 256), Image.BICUBIC).save(small, format="JPEG", quality=95)
        samples_256.append((f"{i:08d}", small.getvalue(), "jpg"))
    # 4 shards: a realistic multi-shard stream, each far larger than the shuffle buffer.
    write_shards(samples, shards, "bench", samples_per_shard=max(1, num_images // 4))
    write_shards(samples_256, shards_256, "bench256", samples_per_shard=max(1, num_images // 4))
    return (folder, shards, shards_256, float(np.mean([len(d) for _, d, _ in samples])),
            float(np.mean([len(d) for _, d, _ in samples_256])))


class AuthorsImageFolder(torch.utils.data.Dataset):
    """The authors' loading: open each file, decode full size, crop, bicubic resize, to tensor."""

    def __init__(self, folder: Path, resolution_px: int) -> None:
        self.paths = sorted(folder.glob("*.jpg"))
        self.resolution_px = resolution_px

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = Image.open(self.paths[index]).convert("RGB")
        width_px, height_px = image.size
        side_px = min(width_px, height_px)
        left_px, top_px = (width_px - side_px) // 2, (height_px - side_px) // 2
        image = image.crop((left_px, top_px, left_px + side_px, top_px + side_px))
        image = image.resize((self.resolution_px, self.resolution_px), Image.BICUBIC)
        # torchvision's ToTensor without torchvision: HWC uint8 -> CHW float in [0, 1].
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def time_authors(folder: Path, resolution_px: int, num_images: int) -> float:
    loader = torch.utils.data.DataLoader(AuthorsImageFolder(folder, resolution_px), batch_size=BATCH,
                                         shuffle=True, num_workers=0, drop_last=True)
    start = time.perf_counter()
    seen = sum(batch.shape[0] for batch in loader)
    assert seen == num_images - num_images % BATCH
    return seen / (time.perf_counter() - start)


def time_shards(shards: Path, resolution_px: int, num_images: int) -> float:
    shard_set = resolve_shard_set(str(shards))
    stream = build_train_stream(shard_set.shards, resolution_px, BATCH, rank=0, world_size=1, num_workers=0,
                                seed=0, mode="epoch", shuffle_buffer=64, hflip=True)
    num_batches = num_images // BATCH
    start = time.perf_counter()
    seen = sum(to_unit_float(next(stream)).shape[0] for _ in range(num_batches))
    return seen / (time.perf_counter() - start)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96, help="1024 px JPEGs to write and read per pass")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per (variant, resolution)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 1024], help="training sizes in px")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if args.images < 4 * BATCH or args.rounds < 1 or any(r < 4 or r > SOURCE_PX for r in args.resolutions):
        parser.error(f"expected --images >= {4 * BATCH}, --rounds >= 1, 4 <= resolutions <= {SOURCE_PX}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one loader worker's share: a single core
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/loader_throughput.py", *sys.argv[1:]])
    print(f"# {command}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"Pillow {Image.__version__}, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        folder, shards, shards_256, mean_bytes, mean_bytes_256 = write_inputs(Path(tmp), args.images)
        print(f"# {args.images} JPEGs of {SOURCE_PX}x{SOURCE_PX}, mean {mean_bytes / 1024:.0f} KiB "
              f"(re-encoded at 256 px: {mean_bytes_256 / 1024:.1f} KiB), batch {BATCH}, {args.rounds} rounds")
        for resolution_px in args.resolutions:
            variants: dict[str, Callable[[int], float]] = {
                "authors": lambda r: time_authors(folder, r, args.images),
                "shards": lambda r: time_shards(shards, r, args.images),
            }
            if resolution_px == 256:
                variants["shards_stored_256"] = lambda r: time_shards(shards_256, r, args.images)
            for variant in variants.values():  # warm-up: page cache, imports, first-call costs
                variant(resolution_px)
            rates: dict[str, list[float]] = {name: [] for name in variants}
            for round_index in range(args.rounds):
                for name, variant in variants.items():
                    rates[name].append(variant(resolution_px))
                    print(f"  {resolution_px} px round {round_index}: {name} {rates[name][-1]:.1f} img/s", flush=True)
            medians = {name: statistics.median(values) for name, values in rates.items()}
            results[str(resolution_px)] = {**medians, "ratio": medians["shards"] / medians["authors"]}
    print("\n| training px | authors img/s/worker | shards img/s/worker | shards / authors | shards stored at 256 img/s/worker |")
    print("|---|---|---|---|---|")
    for resolution_px, figures in results.items():
        stored_256 = f"{figures['shards_stored_256']:.1f}" if "shards_stored_256" in figures else "-"
        print(f"| {resolution_px} | {figures['authors']:.1f} | {figures['shards']:.1f} | {figures['ratio']:.2f}x | {stored_256} |")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "mean_jpeg_bytes": mean_bytes,
                                         "mean_jpeg_bytes_256": mean_bytes_256, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
