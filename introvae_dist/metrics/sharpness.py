"""How sharp images are, per image: two measures of the high frequencies a blurry generator
lacks, to compare samples with real images of the same resolution.

VAEs are known for blurry samples and IntroVAE's adversarial terms are meant to sharpen them
(Huang et al. 2018, introduction); FID mixes sharpness with everything else, and MS-SSIM measures
diversity. These two look at sharpness alone, on the luma of each image:

* :func:`laplacian_variance`: the variance of the image's Laplacian, the classic focus / blur
  measure (Pech-Pacheco et al. 2000): blur flattens edges, so the second derivative
  varies less. Scale-dependent (4x for an image of twice the contrast); on the [0, 1] scale
  here, multiply by 255^2 for the figure on 8-bit values that OpenCV-based code reports.
* :func:`high_frequency_share`: the share of the (mean-removed, Hann-windowed) image's
  spectral power at radial frequencies above half of Nyquist, 0.25 cycles/pixel. Free of
  contrast (a ratio) and bounded: 0 for an image without detail finer than about 4 pixels, 1
  for a checkerboard; white noise gives about 1 - pi/16 = 0.80, the share of the frequency
  plane outside that radius.

Both are computed in float64 and return (B,) tensors, so ranks can add their sums. Imports
torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: ITU-R BT.601 luma weights of R, G, B: the grey PIL's "L" and OpenCV's cvtColor give, on
#: which the Laplacian measure is usually computed.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
#: The 4-neighbour Laplacian (scipy.ndimage.laplace's and OpenCV's ksize=1 kernel).
LAPLACIAN_KERNEL = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
#: Half of Nyquist (0.5 cycles/pixel): detail finer than 4 pixels per period.
HALF_NYQUIST = 0.25


def luma(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, H, W) float64 luma (BT.601 weights, :data:`LUMA_WEIGHTS`)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (B, 3, H, W), got {tuple(images.shape)}")
    weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64, device=images.device)
    return torch.einsum("bchw,c->bhw", images.to(torch.float64), weights)


def laplacian_variance(images: torch.Tensor) -> torch.Tensor:
    """(B,) float64: the variance of each image's Laplacian of the luma (Pech-Pacheco et al. 2000).

    The 3x3 kernel :data:`LAPLACIAN_KERNEL` over the valid region only, (H-2) x (W-2) values
    (no padding: a padded border would add edges the image does not have, or hide some);
    population variance (divided by the number of values). Images of at least 3x3 pixels.
    """
    y = luma(images)  # (B, H, W)
    if y.shape[1] < 3 or y.shape[2] < 3:
        raise ValueError(f"the 3x3 Laplacian needs images of at least 3x3 pixels, got {tuple(y.shape[1:])}")
    kernel = torch.tensor(LAPLACIAN_KERNEL, dtype=torch.float64, device=y.device).view(1, 1, 3, 3)
    lap = F.conv2d(y.unsqueeze(1), kernel).flatten(1)  # (B, (H-2)(W-2)); the kernel is symmetric
    return lap.var(dim=1, correction=0)


def radial_frequency(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W) float64: sqrt(fx^2 + fy^2) in cycles/pixel of each bin of ``torch.fft.fft2``'s
    output (fx, fy from ``fftfreq``: 0, 1/N, ..., with -0.5 at Nyquist for even N)."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64, device=device)
    fx = torch.fft.fftfreq(width, dtype=torch.float64, device=device)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def hann_window_2d(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W) float64: the outer product of periodic Hann windows, w[n] = sin^2(pi n / N).

    Its DFT along each axis has just three bins (1/2 at 0, -1/4 at +-1/N), so a windowed
    frequency spreads to its neighbour bins and no further."""
    wy = torch.hann_window(height, periodic=True, dtype=torch.float64, device=device)
    wx = torch.hann_window(width, periodic=True, dtype=torch.float64, device=device)
    return torch.outer(wy, wx)


def high_frequency_share(images: torch.Tensor, cutoff: float = HALF_NYQUIST) -> torch.Tensor:
    """(B,) float64: the share of each image's spectral power at radial frequency above ``cutoff``.

    Power is |FFT|^2 of the luma, less its window-weighted mean, times a 2-D Hann window
    (:func:`hann_window_2d`); the radial frequency of a bin is the Euclidean sqrt(fx^2 + fy^2)
    in cycles/pixel (:func:`radial_frequency`), isotropic, 0.5 on the axes and 0.71 at the
    corners; bins strictly above ``cutoff`` (0.25, half of Nyquist) count as high.

    Why the window: the FFT treats the image as periodic, so its opposite borders meet, and the
    jump there puts high-frequency power into every image whose borders differ. On 32 px scenes
    that floor was a third of a sharp image's share without the window, and a blur of sigma
    1.5 px scored no lower than one of 0.8; with it, the share falls with every blur. The
    window's leakage reaches one bin (1/N cycles/pixel) each way. Removing the weighted mean
    leaves the windowed image no power at DC, so a constant image has none at all: it gives 0.
    """
    y = luma(images)  # (B, H, W)
    window = hann_window_2d(y.shape[1], y.shape[2], y.device)  # (H, W)
    mean = (y * window).sum(dim=(1, 2), keepdim=True) / window.sum()
    power = torch.fft.fft2((y - mean) * window).abs().pow(2)  # (B, H, W)
    high = radial_frequency(y.shape[1], y.shape[2], y.device) > cutoff  # (H, W)
    total = power.sum(dim=(1, 2))
    above = (power * high).sum(dim=(1, 2))
    # total / (HW)^2 is the windowed image's mean square (Parseval): a constant image's is 0 up
    # to rounding (~1e-33); one 8-bit level in the centre pixel of a 1024^2 image gives 1.5e-11.
    mean_square = total / (y.shape[1] * y.shape[2]) ** 2
    return torch.where(mean_square > 1e-20, above / total.clamp(min=1e-300), 0.0)
