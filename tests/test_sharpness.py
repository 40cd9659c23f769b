"""The sharpness measures on tensors alone: values worked out by hand on tiny images, the
orderings they exist for (blur lowers both), their limits (constant, checkerboard, white
noise), and numpy/scipy transcriptions of their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from introvae_dist.data.synthetic import render_image
from introvae_dist.metrics.ms_ssim import gaussian_window_1d
from introvae_dist.metrics.sharpness import (
    LUMA_WEIGHTS, high_frequency_share, laplacian_variance, luma, radial_frequency,
)


def _grey(rows: torch.Tensor) -> torch.Tensor:
    """(H, W) values -> one (1, 3, H, W) grey image: equal channels, so the luma is the values."""
    return rows.to(torch.float64).expand(1, 3, *rows.shape).clone()


def _scenes(n: int, size_px: int = 32) -> torch.Tensor:
    """(n, 3, S, S) in [0, 1]: the synthetic scenes training uses (shapes, faces, gradients)."""
    images = [torch.from_numpy(np.array(render_image(i, size_px))).permute(2, 0, 1) for i in range(n)]
    return torch.stack(images).double() / 255


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    window = gaussian_window_1d(7, sigma).to(images.dtype)
    x = F.pad(images, (3, 3, 3, 3), mode="reflect")
    x = F.conv2d(x, window.view(1, 1, 1, 7).expand(3, 1, 1, 7), groups=3)
    return F.conv2d(x, window.view(1, 1, 7, 1).expand(3, 1, 7, 1), groups=3)


def test_laplacian_variance_of_an_impulse_by_hand() -> None:
    # A 5x5 image, 1 at the centre: the valid 3x3 Laplacian holds -4 at the centre, 1 at its
    # four neighbours, 0 at the corners; mean 0, variance (16 + 4 x 1) / 9.
    impulse = torch.zeros(5, 5)
    impulse[2, 2] = 1.0
    assert laplacian_variance(_grey(impulse)).item() == pytest.approx(20 / 9, abs=1e-12)
    # A checkerboard: every valid value is -4 (on a 1) or +4 (on a 0), as many of each.
    board = (torch.arange(6)[:, None] + torch.arange(6)[None, :]) % 2
    assert laplacian_variance(_grey(board)).item() == pytest.approx(16.0, abs=1e-12)


def test_high_frequency_share_of_two_cosines_by_hand() -> None:
    # Rows 0.5 + 0.25 cos(2 pi 2n / 16) + 0.25 cos(2 pi 6n / 16) of a 16x16 image. The Hann
    # window spreads each cosine to its neighbour bins only (k - 1..k + 1 along x, 0 and +-1
    # along y): the first to radial frequencies <= sqrt(3^2 + 1) / 16 = 0.198, the second to
    # >= 5 / 16 = 0.3125, on either side of 0.25, with equal power (equal amplitudes, the same
    # window); the weighted mean is exactly 0.5 (the window has no power at k = 2, 6): 1/2.
    n = torch.arange(16, dtype=torch.float64)
    low, high = 0.25 * torch.cos(2 * torch.pi * 2 * n / 16), 0.25 * torch.cos(2 * torch.pi * 6 * n / 16)
    rows = (0.5 + low + high).expand(16, 16)
    assert high_frequency_share(_grey(rows)).item() == pytest.approx(1 / 2, abs=1e-12)
    assert high_frequency_share(_grey(rows.T)).item() == pytest.approx(1 / 2, abs=1e-12)
    assert high_frequency_share(_grey((0.5 + low).expand(16, 16))).item() == pytest.approx(0.0, abs=1e-12)
    assert high_frequency_share(_grey((0.5 + high).expand(16, 16))).item() == pytest.approx(1.0, abs=1e-12)


def test_constant_images_give_zero_and_a_checkerboard_all_high_frequencies() -> None:
    constant = torch.full((3, 3, 16, 16), 0.37)
    assert laplacian_variance(constant).tolist() == [0.0] * 3
    assert high_frequency_share(constant).tolist() == [0.0] * 3
    board = _grey(((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).to(torch.float64))
    assert high_frequency_share(board).item() == pytest.approx(1.0, abs=1e-12)
    stripes = _grey((torch.arange(16) % 2).to(torch.float64).expand(16, 16))  # Nyquist on one axis
    assert high_frequency_share(stripes).item() == pytest.approx(1.0, abs=1e-12)


def test_white_noise_has_the_share_of_the_plane_outside_half_nyquist() -> None:
    torch.manual_seed(0)
    share = high_frequency_share(torch.rand(64, 3, 64, 64)).mean().item()
    bins_above = (radial_frequency(64, 64) > 0.25).double().sum().item() / (64 * 64 - 1)  # DC holds nothing
    assert bins_above == pytest.approx(1 - np.pi / 16, abs=0.01)
    assert share == pytest.approx(bins_above, abs=0.01)


def test_blur_lowers_both_measures_image_by_image() -> None:
    # The window is what makes the share fall with every blur: without it, the jump between
    # opposite borders kept a floor, and sigma 1.5 scored above 0.8 on some of these scenes.
    sharp = _scenes(16)
    for measure in (laplacian_variance, high_frequency_share):
        values = [measure(x) for x in (sharp, _blur(sharp, 0.5), _blur(sharp, 0.8), _blur(sharp, 1.5))]
        assert all(torch.all(a > b) for a, b in zip(values, values[1:])), measure.__name__


def test_laplacian_variance_matches_scipy_ndimage_laplace_on_the_valid_region() -> None:
    torch.manual_seed(1)
    images = torch.rand(4, 3, 12, 17, dtype=torch.float64)
    grey = np.tensordot(np.asarray(LUMA_WEIGHTS), images.numpy(), axes=([0], [1]))  # (B, H, W)
    want = [scipy.ndimage.laplace(g)[1:-1, 1:-1].var() for g in grey]  # scipy pads; its interior is valid
    assert torch.allclose(luma(images), torch.from_numpy(grey), atol=1e-15)
    assert laplacian_variance(images).numpy() == pytest.approx(want, rel=1e-12)


def test_high_frequency_share_matches_a_numpy_transcription() -> None:
    torch.manual_seed(2)
    images = _blur(torch.rand(3, 3, 10, 15, dtype=torch.float64), 1.0)
    want = []
    for g in np.tensordot(np.asarray(LUMA_WEIGHTS), images.numpy(), axes=([0], [1])):
        window = np.outer(np.sin(np.pi * np.arange(g.shape[0]) / g.shape[0]) ** 2,
                          np.sin(np.pi * np.arange(g.shape[1]) / g.shape[1]) ** 2)
        power = np.abs(np.fft.fft2((g - (g * window).sum() / window.sum()) * window)) ** 2
        fy, fx = np.meshgrid(np.fft.fftfreq(g.shape[0]), np.fft.fftfreq(g.shape[1]), indexing="ij")
        want.append(power[np.hypot(fx, fy) > 0.25].sum() / power.sum())
    assert high_frequency_share(images).numpy() == pytest.approx(want, rel=1e-10)


def test_grey_images_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"expected RGB images \(B, 3, H, W\), got \(2, 1, 8, 8\)"):
        laplacian_variance(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="at least 3x3 pixels"):
        laplacian_variance(torch.zeros(1, 3, 2, 8))
