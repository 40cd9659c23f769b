"""The streaming training loader: WebDataset tar shards -> endless batches of (B, 3, R, R).

The pipeline is an explicit list of stages (see :func:`train_pipeline_stages`), in the style
of open_clip's ``data.py``, so the multi-node loader can insert or swap stages:

1. ``ResampledShards``: pick shards at random, with replacement, forever.
2. ``tarfile_to_samples``: read the tar members into samples ``{"__key__", "png", ...}``.
3. shuffle: a buffer of raw (still encoded) samples, cheaper to hold than decoded images.
4. decode: first image entry -> centre crop -> resize -> optional flip -> float32 CHW.
5. ``batched``: stack into a float32 tensor (B, 3, R, R), dropping partial batches.

Why resampling instead of splitting shards across ranks and workers: every (rank, worker)
draws shards independently, so no rank can run out of data first, any shard count works with
any world size (WebDataset's default node splitter raises when WORLD_SIZE > 1, and splitting
fewer shards than ranks x workers leaves some with nothing), and the stream never ends, which
is what a step-counted training loop wants.

Determinism: every random choice is seeded from ``(seed, rank, worker)`` (plus the iteration
count of that worker's copy of the pipeline), never from the pid, the clock or the
RANK/WORLD_SIZE environment variables. Two loaders built with the same arguments yield the
same batches; ranks differ. The stream also depends on ``num_workers``, because the
DataLoader interleaves the workers' batches.
"""

from __future__ import annotations

import glob
import io
import os
import random
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image

from introvae_dist.data.shard_writer import MANIFEST_NAME, read_manifest

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# Prefixes that name remote or piped shards: they cannot be checked for existence here.
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
# A stream in which this many samples in a row fail to decode is broken, not just noisy:
# raise instead of spinning forever over resampled bad shards.
MAX_CONSECUTIVE_DECODE_FAILURES = 100

# Distinct tags so the shard sampler, the shuffle buffer and the augmentation RNG of one
# (seed, rank, worker) never share a random stream.
_STREAM_SHARDS, _STREAM_SHUFFLE, _STREAM_AUGMENT = 0, 1, 2


class DataError(ValueError):
    """Bad data input: a shard spec that matches nothing, a missing or empty shard, a broken stream."""


def resolve_shards(spec: str) -> list[str]:
    """Turn a shard spec into the list of shard paths or URLs to read.

    ``spec`` may be:

    * a directory: the shards listed by its ``manifest.json`` if it has one (each must
      exist), else every ``*.tar`` inside, sorted;
    * a brace pattern, e.g. ``shards/x-{000000..000007}.tar``;
    * a glob, e.g. ``shards/*.tar``;
    * a single file;
    * a ``pipe:`` or ``http(s)://`` (or ``s3://``, ``gs://``) URL, returned unchecked (brace
      patterns in it are expanded, as WebDataset itself does);
    * several of these joined by ``::``, WebDataset's separator.

    Raises:
        DataError: naming the spec, when it matches nothing, a directory holds no tars, or a
            local shard is missing or 0 bytes.
    """
    if "::" in spec:
        return [url for part in spec.split("::") if part for url in resolve_shards(part)]
    if spec.startswith(REMOTE_PREFIXES):
        return list(braceexpand.braceexpand(spec))

    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return _shards_in_directory(path)
    if "{" in spec:
        paths = [os.path.expanduser(p) for p in braceexpand.braceexpand(spec)]
        for shard in paths:
            _check_local_shard(shard, f"brace pattern {spec!r}")
        return paths
    if glob.has_magic(spec):
        paths = sorted(glob.glob(os.path.expanduser(spec)))
        if not paths:
            raise DataError(f"shard glob {spec!r} matches no files")
        for shard in paths:
            _check_local_shard(shard, f"glob {spec!r}")
        return paths
    if not path.exists():
        raise DataError(f"shard path {spec!r} does not exist (expected a directory, a .tar "
                        "file, a brace pattern like x-{000000..000007}.tar or a glob)")
    _check_local_shard(str(path), f"shard path {spec!r}")
    return [str(path)]


def stored_image_size_px(urls: list[str]) -> int | None:
    """Side of the square centre crop of the first stored image, for a startup check.

    Reads only the first readable image's header in the first shard, so it assumes the
    shards hold images of one size (true of the synthetic set and of CelebA-HQ/LSUN exports).
    Returns None for remote shards (``pipe:``/``http``), which cannot be peeked cheaply.

    Raises:
        DataError: the first shard is not a readable tar or holds no decodable image.
    """
    if not urls or urls[0].startswith(REMOTE_PREFIXES):
        return None
    shard = urls[0]
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                extension = member.name.rsplit(".", 1)[-1].lower()
                if not member.isfile() or extension not in IMAGE_EXTENSIONS:
                    continue
                stream = tar.extractfile(member)
                try:
                    # Image.open reads the header only; the pixels stay undecoded.
                    with Image.open(io.BytesIO(stream.read())) as image:
                        return min(image.size)
                except (OSError, Image.DecompressionBombError):
                    continue  # a corrupt first sample is skipped here as in the stream
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"shard {shard!r} is not a readable tar file: {exc}") from exc
    raise DataError(f"shard {shard!r} holds no decodable image (expected one of {IMAGE_EXTENSIONS})")


def decode_and_resize(image_bytes: bytes, resolution_px: int, hflip: bool, rng: random.Random) -> np.ndarray:
    """Decode an encoded image into a float32 (3, R, R) array in [0, 1].

    Centre-crops to a square, resizes (bicubic) to ``resolution_px`` if needed and, if
    ``hflip``, mirrors left-right with probability 1/2 drawn from ``rng``.
    Large JPEGs are decoded directly at 1/2, 1/4 or 1/8 size (``Image.draft``), never below
    ``resolution_px``, which saves most of the decode time for e.g. 1024px CelebA-HQ at 128px.

    Raises:
        PIL.UnidentifiedImageError / OSError: the bytes are not a decodable image.
    """
    with Image.open(io.BytesIO(image_bytes)) as image:
        if image.format == "JPEG" and min(image.size) > resolution_px:
            # draft keeps both sides >= the request, so the square crop still covers R x R.
            image.draft("RGB", (resolution_px, resolution_px))
        image = image.convert("RGB")  # forces the full (possibly reduced) decode
    width_px, height_px = image.size
    side_px = min(width_px, height_px)
    left_px, top_px = (width_px - side_px) // 2, (height_px - side_px) // 2
    image = image.crop((left_px, top_px, left_px + side_px, top_px + side_px))
    if side_px != resolution_px:
        image = image.resize((resolution_px, resolution_px), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (R, R, 3)
    if hflip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    # Pillow clamps bicubic overshoot when it rounds back to uint8, so this stays in [0, 1].
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, R, R)


def build_train_stream(
    urls: list[str],
    resolution_px: int,
    batch_per_rank: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    shuffle_buffer: int = 256,
    hflip: bool = True,
) -> torch.utils.data.DataLoader:
    """An endless, deterministic DataLoader of float32 image batches (B, 3, R, R) in [0, 1].

    Args:
        urls: shard paths or URLs, e.g. from :func:`resolve_shards`.
        resolution_px: side R of the square training images.
        batch_per_rank: images per batch on this rank.
        rank, world_size: this process's place in the data-parallel world; ``rank`` seeds
            the stream so ranks see different data. Taken as arguments, not read from the
            environment, so the caller's notion of rank is the one used. ``world_size`` is
            only checked: with resampling nothing is split between ranks.
        num_workers: DataLoader worker processes (0 decodes in the calling process).
        seed: run seed; the same seed (and rank, num_workers) gives the same stream.
        shuffle_buffer: samples held in the shuffle buffer of each worker.
        hflip: random horizontal flips.

    Corrupt samples are skipped with a warning; a stream in which every sample fails raises
    :class:`DataError` after ``MAX_CONSECUTIVE_DECODE_FAILURES`` attempts instead of hanging.
    """
    if not urls:
        raise DataError("build_train_stream got an empty shard list")
    for name, value in (("resolution_px", resolution_px), ("batch_per_rank", batch_per_rank),
                        ("world_size", world_size), ("shuffle_buffer", shuffle_buffer)):
        if value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_workers < 0 or seed < 0:
        raise ValueError(f"num_workers and seed must be non-negative, got {num_workers} and {seed}")

    pipeline = wds.DataPipeline(
        train_pipeline_stages(urls, resolution_px, batch_per_rank, rank, seed, shuffle_buffer, hflip)
    )
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,  # the pipeline batches itself
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def train_pipeline_stages(
    urls: list[str],
    resolution_px: int,
    batch_per_rank: int,
    rank: int,
    seed: int,
    shuffle_buffer: int,
    hflip: bool,
) -> list[Any]:
    """The stages of the training pipeline, in order, for ``wds.DataPipeline``."""
    return [
        # worker_seed=_worker_index: the default mixes in RANK from the environment, which
        # may disagree with the explicit rank; our rank is already in `seed=`.
        wds.ResampledShards(
            list(urls),
            seed=derive_seed(seed, rank, _STREAM_SHARDS),
            worker_seed=_worker_index,
            deterministic=True,
        ),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        WorkerSeededShuffle(shuffle_buffer, seed=seed, rank=rank),
        DecodeImages(resolution_px, hflip=hflip, seed=seed, rank=rank),
        wds.batched(batch_per_rank, partial=False, collation_fn=collate_images),
    ]


def derive_seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from integers (a plain sum would make (1, 0) == (0, 1))."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0]) & 0x7FFFFFFF


class WorkerSeededShuffle(wds.PipelineStage):
    """``wds.shuffle`` seeded from (seed, rank, worker, iteration) when the stream starts.

    ``wds.shuffle(seed=...)`` fixes its seed when the pipeline is built, in the main process,
    before the DataLoader forks its workers: every worker would shuffle identically. This stage
    reads the worker index inside the worker instead.
    """

    def __init__(self, buffer_size: int, seed: int, rank: int) -> None:
        self.buffer_size = buffer_size
        self.seed = seed
        self.rank = rank
        self.iteration = -1

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.iteration += 1
        stream_seed = derive_seed(self.seed, self.rank, _worker_index(), self.iteration, _STREAM_SHUFFLE)
        return wds.shuffle(self.buffer_size, seed=stream_seed)(src)


class DecodeImages(wds.PipelineStage):
    """Decode the first image entry of each sample with :func:`decode_and_resize`.

    Failures are skipped with a warning (without ``wds.warn_and_continue``'s 0.5 s sleep,
    which with resampling would be paid again every time a bad sample comes round).
    """

    def __init__(self, resolution_px: int, hflip: bool, seed: int, rank: int) -> None:
        self.resolution_px = resolution_px
        self.hflip = hflip
        self.seed = seed
        self.rank = rank
        self.iteration = -1

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[np.ndarray]:
        self.iteration += 1
        stream_seed = derive_seed(self.seed, self.rank, _worker_index(), self.iteration, _STREAM_AUGMENT)
        rng = random.Random(stream_seed)
        return self._decode(src, rng)

    def _decode(self, src: Iterable[dict[str, Any]], rng: random.Random) -> Iterator[np.ndarray]:
        consecutive_failures = 0
        for sample in src:
            try:
                image_bytes = _first_image_entry(sample)
                pixels = decode_and_resize(image_bytes, self.resolution_px, self.hflip, rng)
            except Exception as exc:  # any bad sample is skipped, whatever the decoder raised
                consecutive_failures += 1
                where = f"{sample.get('__url__', '?')} key {sample.get('__key__', '?')}"
                if consecutive_failures >= MAX_CONSECUTIVE_DECODE_FAILURES:
                    raise DataError(
                        f"{consecutive_failures} samples in a row failed to decode; last: {where}: {exc!r}"
                    ) from exc
                warnings.warn(f"skipping undecodable sample {where}: {exc!r}", stacklevel=2)
                continue
            consecutive_failures = 0
            yield pixels  # (3, R, R)


def collate_images(images: list[np.ndarray]) -> torch.Tensor:
    """Stack (3, R, R) arrays into one float32 tensor (B, 3, R, R)."""
    return torch.from_numpy(np.stack(images))


def _first_image_entry(sample: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    entries = sorted(k for k in sample if not k.startswith("__"))
    raise DataError(f"sample has no image entry (expected one of {IMAGE_EXTENSIONS}, found {entries})")


def _worker_index() -> int:
    """This DataLoader worker's index, 0 in the main process (module-level so it pickles)."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def _shards_in_directory(directory: Path) -> list[str]:
    manifest_path = directory / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            manifest = read_manifest(manifest_path)
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        shards = [str(directory / entry["file"]) for entry in manifest["shards"]]
        if not shards:
            raise DataError(f"shard manifest {manifest_path} lists no shards")
        for shard in shards:
            _check_local_shard(shard, f"manifest {manifest_path}")
        return shards
    shards = sorted(str(p) for p in directory.glob("*.tar"))
    if not shards:
        raise DataError(f"shard directory {str(directory)!r} holds no *.tar files and no {MANIFEST_NAME}")
    for shard in shards:
        _check_local_shard(shard, f"directory {str(directory)!r}")
    return shards


def _check_local_shard(path: str, source: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"shard {path!r} from {source} does not exist")
    if os.path.getsize(path) == 0:
        raise DataError(f"shard {path!r} from {source} is empty (0 bytes)")
