"""PNG grids of images (no torchvision here: numpy + Pillow)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from introvae_dist.files import write_atomic


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] -> uint8 (B, 3, H, W) on the same device, as PNGs store them.

    Out-of-range values are clipped to 0 and 255, and each value goes to the nearest of the
    256 levels (ties to even, torch.round). The cast to fp32 comes first: 255 * x in bf16 is
    itself rounded to bf16 (steps of 0.5 between 64 and 128), which moves some values to the
    neighbouring level, so a bf16 network's images would be saved differently from fp32's.
    """
    return images.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def cell_scale(side_px: int, min_cell_px: int) -> int:
    """The whole factor that shows a ``side_px`` image at least ``min_cell_px`` on a side (>= 1)."""
    return max(1, -(-min_cell_px // side_px))


def save_grid(rows: Sequence[torch.Tensor], path: Path, pad_px: int = 2, min_cell_px: int = 0) -> None:
    """Write rows of images, each (N, 3, H, W) in [0, 1], as one PNG with white gaps.

    ``min_cell_px``: cells smaller than this are enlarged by a whole factor, each pixel a
    block (nearest neighbour): a 32 px image is readable at 128 px, and every pixel is still
    the network's own (no interpolation invents detail).
    """
    blocks = [to_uint8(r).permute(0, 2, 3, 1).cpu().numpy() for r in rows]  # (N, H, W, 3) each
    scale = cell_scale(blocks[0].shape[1], min_cell_px)
    if scale > 1:
        blocks = [b.repeat(scale, axis=1).repeat(scale, axis=2) for b in blocks]
    n, h, w = max(b.shape[0] for b in blocks), blocks[0].shape[1], blocks[0].shape[2]
    canvas = np.full((len(blocks) * (h + pad_px) + pad_px, n * (w + pad_px) + pad_px, 3), 255, np.uint8)
    for r, block in enumerate(blocks):
        for c, image in enumerate(block):
            top, left = pad_px + r * (h + pad_px), pad_px + c * (w + pad_px)
            canvas[top : top + h, left : left + w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda stream: Image.fromarray(canvas).save(stream, format="PNG"))
