"""Real images a user points at (``reconstruct``, ``interpolate``): files, folders or shards.

Each input is one of

* an image file (png, jpg, jpeg, webp);
* a folder of images, read recursively in sorted order (as ``introvae-dist shards folder``);
* shards: a ``.tar`` file, a folder holding ``manifest.json`` or ``*.tar``, a ``manifest.json``,
  a brace pattern or glob (anything :func:`~introvae_dist.data.shard_set.resolve_shard_set`
  reads), in shard order.

Images are centre-cropped and resized to the model's side exactly as training decodes them
(:func:`~introvae_dist.data.decode.decode_and_resize`, no flip). Images smaller than that side
are refused rather than upsampled, as the trainer refuses such shards. A file that cannot be
read is an error naming it; an undecodable sample inside shards is skipped, as in training.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from introvae_dist.data.decode import decode_and_resize, to_unit_float
from introvae_dist.data.loader import read_image_range
from introvae_dist.data.shard_set import (
    DataError, ShardSet, resolve_shard_set, stored_image_size_px, with_sample_counts,
)
from introvae_dist.data.shard_writer import MANIFEST_NAME, ShardInputError
from introvae_dist.data.sources import FolderSource
from introvae_dist.data.tar_reader import ReadStats


class ImageInputError(ValueError):
    """An input image, folder or shard set cannot be used; the message names it."""


def read_image_inputs(inputs: list[str], resolution_px: int, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """The first ``limit`` images (all when None) of the inputs in order, as float32
    (N, 3, R, R) in [0, 1], with a label per image (file path, or shard URL and index).

    Raises:
        ImageInputError: a missing input, an unreadable or too small image file, an empty
            folder, unusable shards, or no image at all.
    """
    images: list[np.ndarray] = []
    labels: list[str] = []
    for text in inputs:
        wanted = None if limit is None else limit - len(images)
        if wanted == 0:
            break
        if _is_shard_spec(text):
            batch, names = _read_shards(text, resolution_px, wanted)
        else:
            batch, names = _read_files(_image_files(Path(text)), resolution_px, wanted)
        images += batch
        labels += names
    if not images:
        raise ImageInputError(f"no images in {', '.join(inputs)}")
    return to_unit_float(torch.from_numpy(np.stack(images))), labels


def _is_shard_spec(text: str) -> bool:
    path = Path(text)
    if path.is_dir():
        return (path / MANIFEST_NAME).is_file() or any(path.glob("*.tar"))
    return path.suffix in (".tar", ".json") or any(c in text for c in "{*?[") or "::" in text


def _image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.exists():
        raise ImageInputError(f"{path}: no such image file or folder")
    try:
        source = FolderSource(path)
    except ShardInputError as e:
        raise ImageInputError(str(e)) from None
    return [source.root / name for name in source.names]


def _read_files(paths: list[Path], resolution_px: int, wanted: int | None) -> tuple[list[np.ndarray], list[str]]:
    images, labels = [], []
    for path in paths[:wanted]:
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                size = image.size
            pixels = decode_and_resize(data, resolution_px, False, random.Random(0))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as e:
            raise ImageInputError(f"{path}: cannot read the image ({e})") from None
        if min(size) < resolution_px:
            raise ImageInputError(f"{path}: {size[0]}x{size[1]} px, smaller than the model's {resolution_px} px "
                                  f"(images are not upsampled)")
        images.append(pixels)
        labels.append(str(path))
    return images, labels


def _read_shards(spec: str, resolution_px: int, wanted: int | None) -> tuple[list[np.ndarray], list[str]]:
    try:
        shard_set = with_sample_counts(resolve_shard_set(spec))
        check_stored_size(shard_set, resolution_px)
    except DataError as e:
        raise ImageInputError(str(e)) from None
    total = shard_set.num_samples or 0
    stop = total if wanted is None else min(total, wanted)
    stats = ReadStats()
    images = [image.numpy() for batch in read_image_range(shard_set.shards, 0, stop, resolution_px, 64, stats)
              for image in batch]
    return images, [f"{spec}#{i}" for i in range(len(images))]


def check_stored_size(shard_set: ShardSet, resolution_px: int) -> None:
    """Raise DataError when the shards store images smaller than the model's side (a
    checkpoint of another resolution than the shards); larger ones are resized down, as in
    training."""
    stored = stored_image_size_px(shard_set)
    if stored is not None and stored < resolution_px:
        where = shard_set.manifest_path or shard_set.spec
        raise DataError(f"{where}: images are stored at {stored} px, but the model generates {resolution_px} px; "
                        f"use shards written at >= {resolution_px} px (introvae-dist shards ... --resize-px "
                        f"{resolution_px}) or a checkpoint of that resolution")
