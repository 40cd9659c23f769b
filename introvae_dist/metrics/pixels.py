"""Reconstruction error per image: mean squared error and PSNR on the [0, 1] scale."""

from __future__ import annotations

import torch

#: PSNR of a perfect reconstruction would be infinite; such images count as this many dB.
PSNR_CAP_DB = 100.0


def mse_per_image(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """(B,) float64 mean of squared differences over channels and pixels; inputs (B, 3, H, W) in [0, 1]."""
    diff = images.to(torch.float64) - reconstructions.to(torch.float64).clamp(0.0, 1.0)
    return diff.pow(2).flatten(1).mean(1)


def psnr_db(mse: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio for peak 1: 10 log10(1 / MSE), capped at :data:`PSNR_CAP_DB`."""
    return (-10.0 * torch.log10(mse.clamp(min=10.0 ** (-PSNR_CAP_DB / 10.0)))).clamp(max=PSNR_CAP_DB)
