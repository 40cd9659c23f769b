"""PNG grids of images (no torchvision here: numpy + Pillow)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8, clipping out-of-range values."""
    array = images.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(rows: Sequence[torch.Tensor], path: Path, pad_px: int = 2) -> None:
    """Write rows of images, each (N, 3, H, W) in [0, 1], as one PNG with white gaps."""
    blocks = [to_uint8(r) for r in rows]
    n, h, w = max(b.shape[0] for b in blocks), blocks[0].shape[1], blocks[0].shape[2]
    canvas = np.full((len(blocks) * (h + pad_px) + pad_px, n * (w + pad_px) + pad_px, 3), 255, np.uint8)
    for r, block in enumerate(blocks):
        for c, image in enumerate(block):
            top, left = pad_px + r * (h + pad_px), pad_px + c * (w + pad_px)
            canvas[top : top + h, left : left + w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(canvas).save(tmp)
    tmp.replace(path)
