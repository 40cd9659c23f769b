"""Encoded image bytes -> one float32 training image: centre crop, resize, flip.

The only place that decodes pixels for training, so the loader, the sample grids and the
loader benchmark all see exactly the same images.
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def decode_and_resize(image_bytes: bytes, resolution_px: int, hflip: bool, rng: random.Random) -> np.ndarray:
    """Decode an encoded image into a uint8 (3, R, R) array.

    uint8, not float: a quarter of the bytes through the DataLoader's shared memory and the
    host-to-GPU copy (a 1024 px image is 3 MiB instead of 12 MiB); :func:`to_unit_float`
    converts on the device.

    Centre-crops to a square, resizes (bicubic) to ``resolution_px`` if needed and, if
    ``hflip``, mirrors left-right with probability 1/2 drawn from ``rng``.
    Large JPEGs are decoded directly at 1/2, 1/4 or 1/8 size (``Image.draft``), never below
    ``resolution_px``: a 1024 px CelebA-HQ JPEG trained at 256 px is decoded at 256 px, which
    skips most of the inverse DCT work instead of decoding full size and shrinking.

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
    if side_px != resolution_px:
        # crop + resize in one call: Pillow resamples only the box, no intermediate copy.
        image = image.resize((resolution_px, resolution_px), Image.BICUBIC,
                             box=(left_px, top_px, left_px + side_px, top_px + side_px))
    elif width_px != height_px:
        image = image.crop((left_px, top_px, left_px + side_px, top_px + side_px))
    pixels = np.asarray(image)  # (R, R, 3) uint8
    if hflip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, R, R)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, R, R) -> float32 in [0, 1], the networks' input range."""
    return images.float().div_(255.0)


def first_image_entry(sample: dict[str, Any]) -> bytes:
    """The encoded bytes of a WebDataset sample's image entry (png, jpg, jpeg or webp).

    Raises:
        ValueError: the sample holds no image entry.
    """
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    entries = sorted(k for k in sample if not k.startswith("__"))
    raise ValueError(f"sample has no image entry (expected one of {IMAGE_EXTENSIONS}, found {entries})")
