"""Sample grids: small images are enlarged by a whole factor, pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from introvae_dist.images import cell_scale, save_grid, to_uint8


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


def test_to_uint8_rounds_to_the_nearest_level_and_clips() -> None:
    levels = torch.tensor([0, 1, 127, 254])
    below, above = (levels + 0.5 - 1e-3) / 255, (levels + 0.5 + 1e-3) / 255  # either side of each midpoint
    x = torch.cat([below, above, torch.tensor([0.5, -0.3, 1.7, -float("inf"), float("inf")])])
    got = to_uint8(x.view(1, 1, 1, -1).expand(2, 3, 1, -1))  # (B, 3, H, W), any H and W
    assert got.dtype == torch.uint8 and got.shape == (2, 3, 1, x.numel())
    want = [*levels.tolist(), *(levels + 1).tolist(), 128, 0, 255, 0, 255]  # 0.5 * 255 = 127.5: ties to even
    assert (got == torch.tensor(want, dtype=torch.uint8)).all()


def test_to_uint8_of_bf16_images_is_that_of_their_fp32_values() -> None:
    x = torch.linspace(0, 1, 20001).bfloat16().unique()  # every bf16 value in [0, 1] this reaches
    assert (to_uint8(x.view(1, 1, 1, -1)) == to_uint8(x.float().view(1, 1, 1, -1))).all()
    naive = x.mul(255).round().to(torch.uint8)  # 255 * x rounded to bf16 first
    assert (naive != to_uint8(x.view(1, 1, 1, -1)).flatten()).any()  # so the fp32 cast matters


def test_save_grid_writes_to_uint8s_levels(tmp_path: Path) -> None:
    images = torch.rand(2, 3, 8, 8) * 1.4 - 0.2  # some values outside [0, 1]
    save_grid([images], tmp_path / "g.png", pad_px=0)
    grid = np.asarray(Image.open(tmp_path / "g.png"))  # (8, 16, 3)
    assert (grid == torch.cat(list(to_uint8(images)), dim=2).permute(1, 2, 0).numpy()).all()
