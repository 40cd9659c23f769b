"""MS-SSIM (Wang et al. 2003) exactly as PGGAN computes it for sample diversity.

Transcribed into torch from Karras et al.'s ``metrics/ms_ssim.py`` in
github.com/tkarras/progressive_growing_of_gans (itself adapted from TensorFlow's
``research/compression/image_encoder/msssim.py``; Apache License 2.0). The IntroVAE paper
(Table 2) reports PGGAN's figure: the mean MS-SSIM over 10,000 pairs of generated images at
128x128. PGGAN's version differs from pytorch-msssim and torchmetrics, which assert images
larger than 160 px for an 11-px window and 5 levels:

* at every level the Gaussian window shrinks to ``min(11, height, width)`` pixels, with its
  sigma scaled by the same factor (``size * 1.5 / 11``), so 128 px images work (the fifth
  level is 8x8, with an 8-px window);
* the window is MATLAB's ``fspecial('gaussian')`` (half-pixel offsets for even sizes), applied
  as a "valid" convolution over height and width of each colour channel;
* SSIM and contrast terms are averaged over height, width and channel per image, clipped at
  0, and combined with the weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) of the paper and
  MATLAB code (they do not sum to 1); levels are 2x2 box-downsampled;
* images are 8-bit values (``max_val=255``), computed in float64 (PGGAN's float32 images
  meet scipy's float64 window, so its convolutions run in float64).

PGGAN's ``msssim`` returns the mean over a batch of pairs; :func:`ms_ssim` returns one value
per pair, so ranks can sum them. The 2-D window is separable (the outer product of its
normalised 1-D factors), so it is applied as a row and a column convolution. Imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PGGAN_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def gaussian_window_1d(size: int, sigma: float) -> torch.Tensor:
    """The 1-D factor of PGGAN's ``_FSpecialGauss(size, sigma)`` (float64, sums to 1)."""
    radius = size // 2
    offset, stop = (0.5, radius) if size % 2 == 0 else (0.0, radius + 1)
    coords = torch.arange(-radius, stop, dtype=torch.float64) + offset
    window = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return window / window.sum()


def _band(length: int, window: torch.Tensor) -> torch.Tensor:
    """(length, length - size + 1) matrix whose column j holds the window at rows j..j+size-1:
    ``x @ band`` is the valid convolution of every row of x with the (symmetric) window."""
    size = window.numel()
    band = torch.zeros(length, length - size + 1, dtype=window.dtype, device=window.device)
    for j in range(length - size + 1):
        band[j:j + size, j] = window
    return band


def _blur_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Valid convolution of every channel of (B, C, H, W) with the separable window.

    As two matrix products with banded matrices: float64 matmul runs on BLAS, about 10x
    faster on CPU than float64 ``conv2d`` although it multiplies the zeros too.
    """
    rows = _band(x.shape[3], window)  # (W, W')
    cols = _band(x.shape[2], window)  # (H, H')
    return cols.T @ (x @ rows)  # (B, C, H', W')


def _ssim_and_cs(img1: torch.Tensor, img2: torch.Tensor, max_val: float, filter_size: int, filter_sigma: float,
                 k1: float, k2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PGGAN's ``_SSIMForMultiScale``: mean SSIM and contrast-structure term per image, (B,) each."""
    size = min(filter_size, img1.shape[2], img1.shape[3])
    sigma = size * filter_sigma / filter_size
    window = gaussian_window_1d(size, sigma).to(img1.device)
    mu1, mu2 = _blur_valid(img1, window), _blur_valid(img2, window)
    mu11, mu22, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma11 = _blur_valid(img1 * img1, window) - mu11
    sigma22 = _blur_valid(img2 * img2, window) - mu22
    sigma12 = _blur_valid(img1 * img2, window) - mu12
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    v1 = 2.0 * sigma12 + c2
    v2 = sigma11 + sigma22 + c2
    ssim = (((2.0 * mu12 + c1) * v1) / ((mu11 + mu22 + c1) * v2)).mean(dim=(1, 2, 3))
    cs = (v1 / v2).mean(dim=(1, 2, 3))
    return ssim, cs


def ms_ssim(img1: torch.Tensor, img2: torch.Tensor, max_val: float = 255.0, filter_size: int = 11,
            filter_sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
            weights: tuple[float, ...] = PGGAN_WEIGHTS) -> torch.Tensor:
    """MS-SSIM of each pair ``(img1[i], img2[i])``: (B,) float64.

    Args:
        img1, img2: (B, C, H, W) images on the 0..``max_val`` scale (uint8 or float), H and W
            divisible by 2 ** (levels - 1) (16 for the 5 default levels).
    """
    if img1.shape != img2.shape or img1.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of one shape, got {tuple(img1.shape)} and {tuple(img2.shape)}")
    levels = len(weights)
    side = min(img1.shape[2], img1.shape[3])
    if side % (2 ** (levels - 1)) or side < 2 ** (levels - 1):
        raise ValueError(f"MS-SSIM over {levels} levels needs sides divisible by {2 ** (levels - 1)}, "
                         f"got {tuple(img1.shape[2:])}")
    x1, x2 = img1.to(torch.float64), img2.to(torch.float64)
    ssims, css = [], []
    for level in range(levels):
        ssim, cs = _ssim_and_cs(x1, x2, max_val, filter_size, filter_sigma, k1, k2)
        ssims.append(ssim)
        css.append(cs)
        if level < levels - 1:
            x1, x2 = F.avg_pool2d(x1, 2), F.avg_pool2d(x2, 2)  # PGGAN's _HoxDownsample
    mssim = torch.stack(ssims).clamp(min=0.0)  # (levels, B); clipped, "otherwise we get NaNs"
    mcs = torch.stack(css).clamp(min=0.0)
    w = torch.tensor(weights, dtype=torch.float64, device=mssim.device)
    return torch.prod(mcs[:-1] ** w[:-1, None], dim=0) * mssim[-1] ** w[-1]
