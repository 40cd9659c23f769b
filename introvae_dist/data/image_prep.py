"""Turn one source image's bytes into the bytes a shard stores: kept as is, or re-encoded.

Two modes, chosen by :class:`ImagePrep`:

* keep original: the source bytes are stored untouched under the extension of the format
  Pillow detects (``jpg``, ``png`` or ``webp``; a ``.jpg`` file that is really a PNG is stored
  as ``png``). Nothing is decoded, so this is fast; an image counts as *unreadable* (and is
  skipped) when Pillow cannot identify its header, when ``Image.verify()`` fails (which
  checks PNG chunk CRCs and truncation, but little for JPEG and WebP), or when its format is
  not one the loader reads. A JPEG truncated mid-scan can pass these checks; the training
  loader then skips it with a warning.
* re-encode: decode fully, convert to RGB (alpha is dropped, palettes expanded), optionally
  crop the centred square of side min(width, height), optionally resize with Lanczos so the
  *shorter* side is ``resize_px`` (aspect ratio kept: with ``center_crop`` the result is
  ``resize_px`` x ``resize_px``; without it a 256x341 image at 128 becomes 128x171, never
  squashed; smaller images are upscaled), then save as JPEG (``jpeg_quality``, Pillow's
  default 4:2:0 chroma subsampling) or PNG. Here *unreadable* means the full decode fails.

EXIF orientation is not applied in either mode, so both store the pixels the file holds, as
the loader decodes them. Torch-free: runs in the shard writer's worker processes.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

OutputFormat = Literal["jpeg", "png"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("jpeg", "png")
DEFAULT_JPEG_QUALITY = 95
# Pillow format name -> the extension the shard uses; the loader reads exactly these.
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_OUTPUT_EXTENSIONS = {"jpeg": "jpg", "png": "png"}
_RESAMPLE = Image.Resampling.LANCZOS
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


class UnreadableImage(Exception):
    """A source image this writer cannot use; the message is the reason stored in the manifest."""


@dataclass(frozen=True)
class ImagePrep:
    """What happens to every image; everything here determines the stored bytes."""

    keep_original: bool
    center_crop: bool = False
    resize_px: int | None = None
    format: OutputFormat = "jpeg"
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    def __post_init__(self) -> None:
        if self.keep_original and (self.center_crop or self.resize_px is not None):
            raise ValueError("keep_original stores the source bytes: it cannot crop or resize")
        if self.resize_px is not None and self.resize_px <= 0:
            raise ValueError(f"resize_px must be a positive integer, got {self.resize_px}")
        if self.format not in OUTPUT_FORMATS:
            raise ValueError(f"format must be one of {OUTPUT_FORMATS}, got {self.format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    def params(self) -> dict[str, Any]:
        """The manifest ``params`` entries of this preparation (None where not applicable)."""
        reencode = not self.keep_original
        return {
            "keep_original": self.keep_original,
            "center_crop": self.center_crop,
            "resize_px": self.resize_px,
            "resample": "lanczos" if self.resize_px is not None else None,
            "format": self.format if reencode else None,
            "jpeg_quality": self.jpeg_quality if reencode and self.format == "jpeg" else None,
        }


@dataclass(frozen=True)
class PreparedImage:
    """The bytes to store, their extension, and the (width, height) before and after."""

    data: bytes
    ext: str
    source_size_px: tuple[int, int]
    size_px: tuple[int, int]


def prepare_image(data: bytes, prep: ImagePrep) -> PreparedImage:
    """Apply ``prep`` to one encoded image.

    Raises:
        UnreadableImage: the image cannot be used (see the module docstring); the message
            says why.
    """
    if prep.keep_original:
        return _keep_original(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            source_size_px = image.size
            rgb = image.convert("RGB")  # decodes: a broken file fails here
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error...)
        raise UnreadableImage(_reason(exc)) from exc
    if prep.center_crop:
        rgb = rgb.crop(_centre_square(rgb.size))
    if prep.resize_px is not None:
        target_px = _shorter_side_to(rgb.size, prep.resize_px)
        if target_px != rgb.size:
            rgb = rgb.resize(target_px, _RESAMPLE)
    buffer = io.BytesIO()
    if prep.format == "jpeg":
        rgb.save(buffer, format="JPEG", quality=prep.jpeg_quality)
    else:
        rgb.save(buffer, format="PNG")
    return PreparedImage(buffer.getvalue(), _OUTPUT_EXTENSIONS[prep.format], source_size_px, rgb.size)


def _keep_original(data: bytes) -> PreparedImage:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format, size_px = image.format, image.size
            image.verify()
    except Exception as exc:  # see prepare_image
        raise UnreadableImage(_reason(exc)) from exc
    ext = _KEPT_FORMATS.get(image_format or "")
    if ext is None:
        raise UnreadableImage(
            f"format {image_format} is not one the loader reads (JPEG, PNG, WebP); "
            f"re-encode it with --format jpeg or --format png"
        )
    return PreparedImage(bytes(data), ext, size_px, size_px)


def _centre_square(size_px: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square; odd margins put the extra pixel right/below."""
    width, height = size_px
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _shorter_side_to(size_px: tuple[int, int], side_px: int) -> tuple[int, int]:
    width, height = size_px
    if width <= height:
        return side_px, max(1, round(height * side_px / width))
    return max(1, round(width * side_px / height)), side_px


def _reason(exc: Exception) -> str:
    """One line for the manifest: the error type and the first line of its message.

    Object reprs (Pillow's "cannot identify image file <_io.BytesIO object at 0x7f...>") are
    dropped: their addresses differ per run and would make the manifest non-deterministic.
    """
    message = _OBJECT_REPR.sub("", str(exc).splitlines()[0] if str(exc) else "").strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
