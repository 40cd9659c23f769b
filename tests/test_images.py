"""Sample grids: small images are enlarged by a whole factor, pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from introvae_dist.images import cell_scale, save_grid


def test_small_cells_are_enlarged_by_a_whole_factor_without_new_values(tmp_path: Path) -> None:
    images = torch.rand(3, 3, 32, 32)
    save_grid([images, images], tmp_path / "g.png", pad_px=2, min_cell_px=128)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert cell_scale(32, 128) == 4 and grid.shape == (2 + 2 * (128 + 2), 2 + 3 * (128 + 2), 3)
    cell = grid[2:130, 132:260]  # row 0, image 1
    native = (images[1].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert (cell[::4, ::4] == native).all() and (cell[3::4, 3::4] == native).all()


def test_large_cells_and_zero_keep_their_size(tmp_path: Path) -> None:
    assert cell_scale(256, 128) == 1 and cell_scale(32, 0) == 1 and cell_scale(48, 128) == 3
    save_grid([torch.rand(1, 3, 16, 16)], tmp_path / "g.png", pad_px=0)
    assert Image.open(tmp_path / "g.png").size == (16, 16)
