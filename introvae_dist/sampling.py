"""``introvae-dist sample``: seeded samples as PNG files, one grid, or WebDataset shards, with
every rank of a launcher drawing a contiguous share (:mod:`introvae_dist.rank_work`).

Image ``i`` is the same whichever rank draws it (:func:`introvae_dist.inference.generated_batches`).
Shards are cut at fixed image indices (shard k holds images ``[kS, (k+1)S)``), each written by
one rank with the shard writer's own pieces (:class:`~introvae_dist.data.shard_writer.ShardInProgress`,
:func:`~introvae_dist.data.shard_writer.build_manifest`), and rank 0 writes the one
``manifest.json`` from every rank's entries, so training and ``evaluate --real`` read them as
any other shard set.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from introvae_dist import collectives
from introvae_dist.data.shard_writer import MANIFEST_NAME, SHARD_PATTERN, ShardInProgress, build_manifest
from introvae_dist.files import write_json_atomic
from introvae_dist.images import save_grid, to_uint8
from introvae_dist.inference import ModelSource, generated_batches
from introvae_dist.models import Generator
from introvae_dist.rank_work import Workers, rank_batches


@dataclass(frozen=True)
class SampleJob:
    """Images ``[0, num_images)`` of ``seed``, decoded in batches of ``batch`` on ``workers``."""

    generator: Generator
    num_images: int
    seed: int
    batch: int
    workers: Workers
    #: z_p ~ N(0, temperature^2 I) (inference.generated_batches).
    temperature: float = 1.0

    def batches(self, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Images ``[start, stop)`` as (index of the first, uint8 (n, 3, R, R)) per batch."""
        for first, images in generated_batches(self.generator, start, stop, self.seed, self.batch, self.workers.device,
                                              self.temperature):
            yield first, to_uint8(images)

    def own_batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        """This rank's share of the images."""
        share = self.workers.share(self.num_images, self.batch)
        return self.batches(share.start, share.stop)


def png_bytes(pixels: torch.Tensor) -> bytes:
    """One uint8 (3, R, R) image as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pngs(job: SampleJob, out: Path) -> None:
    """``out/sample_NNNNNNNN.png`` for every image, each rank writing its own."""
    out.mkdir(parents=True, exist_ok=True)
    for first, pixels in job.own_batches():
        for j, image in enumerate(pixels):
            (out / f"sample_{first + j:08d}.png").write_bytes(png_bytes(image))
    collectives.barrier()


def write_grid(job: SampleJob, path: Path, columns: int) -> None:
    """One PNG of all images, ``columns`` per row, assembled by rank 0."""
    own = torch.cat([pixels for _, pixels in job.own_batches()] or [torch.zeros(0, dtype=torch.uint8)])
    parts = collectives.gather_object(own)
    if job.workers.is_main:
        images = torch.cat([p for p in parts if p.numel()]).float() / 255.0
        save_grid([images[i:i + columns] for i in range(0, images.shape[0], columns)], path)
    collectives.barrier()


def write_shards(job: SampleJob, out: Path, name: str, samples_per_shard: int, source: ModelSource) -> int:
    """Shards ``out/NAME-%06d.tar`` of PNGs keyed by image index, and ``manifest.json``;
    returns the number of shards."""
    out.mkdir(parents=True, exist_ok=True)
    num_shards = -(-job.num_images // samples_per_shard)
    mine = rank_batches(num_shards, 1, job.workers.world.rank, job.workers.world.world_size)
    entries = []
    for index in mine:
        start, stop = index * samples_per_shard, min((index + 1) * samples_per_shard, job.num_images)
        writer = ShardInProgress(out / SHARD_PATTERN.format(name=name, index=index))
        try:
            for first, pixels in job.batches(start, stop):
                for j, image in enumerate(pixels):
                    writer.write(f"{first + j:08d}", png_bytes(image), "png")
            entries.append(writer.finish())
        except BaseException:
            writer.abort()
            raise
    every = sorted((entry for part in collectives.gather_object(entries) for entry in part), key=lambda e: e["file"])
    if job.workers.is_main:
        origin = {"kind": "introvae-dist sample", "path": str(source.path), "step": source.step}
        params = {"seed": job.seed, "num_images": job.num_images, "batch": job.batch,
                  "samples_per_shard": samples_per_shard}
        manifest = build_manifest(name, origin, source.model.resolution_px, params, every, skipped=[])
        write_json_atomic(out / MANIFEST_NAME, manifest)
    collectives.barrier()
    return num_shards
