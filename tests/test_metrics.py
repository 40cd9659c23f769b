"""The metric code on tensors alone: FID from feature statistics, PGGAN's MS-SSIM, the FID
Inception-v3 network's structure and file checks. No Inception weights file is needed: FID is
exercised with a small convolutional feature network built here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from introvae_dist.data.synthetic import render_image
from introvae_dist.metrics.fid import FeatureStats, fid_of_stats, frechet_distance
from introvae_dist.metrics.inception import (
    FID_INCEPTION_URL, FIDInceptionV3, InceptionWeightsError, STANDARD_ID, load_fid_inception,
)
from introvae_dist.metrics.ms_ssim import gaussian_window_1d, ms_ssim
from introvae_dist.metrics.pixels import PSNR_CAP_DB, mse_per_image, psnr_db

REPO = Path(__file__).resolve().parents[1]


def _photos(n: int, size_px: int = 32) -> torch.Tensor:
    """(n, 3, S, S) in [0, 1]: the synthetic scenes training uses (shapes, faces, gradients)."""
    return torch.stack([torch.from_numpy(np.array(render_image(i, size_px))).permute(2, 0, 1) for i in range(n)]).float() / 255


def _feature_net() -> nn.Module:
    """A small fixed random conv net: (B, 3, S, S) -> (B, 32), standing in for Inception."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def _stats(net: nn.Module, images: torch.Tensor, batch: int = 50) -> FeatureStats:
    stats = FeatureStats(32)
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            stats.add(net(images[i:i + batch]))
    return stats


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    window = gaussian_window_1d(7, sigma).float()
    x = F.pad(images, (3, 3, 3, 3), mode="reflect")
    x = F.conv2d(x, window.view(1, 1, 1, 7).expand(3, 1, 1, 7), groups=3)
    return F.conv2d(x, window.view(1, 1, 7, 1).expand(3, 1, 7, 1), groups=3)


# --- FID -------------------------------------------------------------------------------------

def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise_and_blur() -> None:
    net, images = _feature_net(), _photos(300)
    reference = _stats(net, images)
    assert abs(fid_of_stats(reference, _stats(net, images))) < 1e-9
    generator = torch.Generator().manual_seed(1)
    noisy = [fid_of_stats(reference, _stats(net, (images + s * torch.randn(images.shape, generator=generator)).clamp(0, 1)))
             for s in (0.02, 0.05, 0.1, 0.2)]
    blurred = [fid_of_stats(reference, _stats(net, _blur(images, s))) for s in (0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(noisy, noisy[1:])), noisy
    assert all(a < b for a, b in zip(blurred, blurred[1:])), blurred
    assert noisy[0] > 1e3 * abs(fid_of_stats(reference, _stats(net, images))) and blurred[0] > 0


def test_feature_sums_merge_over_ranks_as_if_seen_at_once() -> None:
    features = torch.randn(90, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    whole = FeatureStats(32)
    whole.add(features)
    parts = [FeatureStats(32) for _ in range(3)]
    for part, chunk in zip(parts, features.split([10, 50, 30])):
        part.add(chunk)
    merged = FeatureStats.from_flat(sum(p.to_flat() for p in parts), 32)  # what all_reduce(SUM) computes
    mu, cov = merged.mean_cov()
    assert merged.count == 90
    np.testing.assert_allclose(mu, features.mean(0).numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(features.numpy(), rowvar=False), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(whole.mean_cov()[1], cov, rtol=1e-10, atol=1e-10)


def test_frechet_distance_matches_the_sqrtm_formula_of_pytorch_fid() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2)).real  # pytorch-fid's calculate_frechet_distance
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_is_finite_for_fewer_images_than_feature_dimensions() -> None:
    features = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))  # singular covariances
    a, b = FeatureStats(32), FeatureStats(32)
    a.add(features)
    b.add(features + 0.5)
    # Only the means differ; the square roots of the zero eigenvalues' rounding noise cost ~1e-7.
    assert fid_of_stats(a, b) == pytest.approx(32 * 0.25, rel=1e-6)


# --- MS-SSIM ---------------------------------------------------------------------------------

def test_ms_ssim_is_one_for_identical_pairs_and_near_zero_for_independent_noise_at_128px() -> None:
    generator = torch.Generator().manual_seed(0)
    photos = (_photos(8, 128) * 255).round().to(torch.uint8)
    assert torch.equal(ms_ssim(photos, photos), torch.ones(8, dtype=torch.float64))
    noise_a = torch.randint(0, 256, (64, 3, 128, 128), generator=generator, dtype=torch.uint8)
    noise_b = torch.randint(0, 256, (64, 3, 128, 128), generator=generator, dtype=torch.uint8)
    noise = ms_ssim(noise_a, noise_b)
    assert noise.mean().item() < 0.1 and noise.min().item() >= 0.0, noise
    noisy_copies = (photos.float() + 20 * torch.randn(photos.shape, generator=generator)).clamp(0, 255).round()
    assert noise.mean() < ms_ssim(photos, noisy_copies).mean() < 1.0


def test_ms_ssim_matches_pggans_numpy_implementation() -> None:
    """A transcription of PGGAN's metrics/ms_ssim.py (scipy fftconvolve, float32 images) as
    the reference, on related and unrelated 128 px images (five levels down to 8 px, where
    the window shrinks to 8 px) and on 16 px ones (the window shrinks from the first level)."""
    signal = pytest.importorskip("scipy.signal")

    def fspecial(size: int, sigma: float) -> np.ndarray:
        offset, start, stop = 0.0, -(size // 2), size // 2 + 1
        if size % 2 == 0:
            offset, stop = 0.5, stop - 1
        x, y = np.mgrid[offset + start:stop, offset + start:stop]
        g = np.exp(-((x**2 + y**2) / (2.0 * sigma**2)))
        return g / g.sum()

    def ssim_cs(img1: np.ndarray, img2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = min(11, img1.shape[1], img1.shape[2])
        window = fspecial(size, size * 1.5 / 11).reshape(1, size, size, 1)
        mu1, mu2 = (signal.fftconvolve(i, window, mode="valid") for i in (img1, img2))
        s11, s22, s12 = (signal.fftconvolve(p, window, mode="valid") for p in (img1 * img1, img2 * img2, img1 * img2))
        s11, s22, s12 = s11 - mu1 * mu1, s22 - mu2 * mu2, s12 - mu1 * mu2
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        v1, v2 = 2.0 * s12 + c2, s11 + s22 + c2
        return (np.mean(((2 * mu1 * mu2 + c1) * v1) / ((mu1 * mu1 + mu2 * mu2 + c1) * v2), axis=(1, 2, 3)),
                np.mean(v1 / v2, axis=(1, 2, 3)))

    def pggan_msssim(img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
        weights = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
        im1, im2, mssim, mcs = img1.astype(np.float32), img2.astype(np.float32), [], []
        for _ in range(5):
            s, c = ssim_cs(im1, im2)
            mssim.append(s)
            mcs.append(c)
            im1, im2 = ((x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) * 0.25 for x in (im1, im2))
        mssim, mcs = np.clip(np.asarray(mssim), 0, np.inf), np.clip(np.asarray(mcs), 0, np.inf)
        return np.prod(mcs[:-1] ** weights[:-1, None], axis=0) * mssim[-1] ** weights[-1]  # per pair

    rng = np.random.default_rng(0)
    for side in (128, 16):
        photos = (_photos(6, side) * 255).round().to(torch.uint8)
        related = (photos.float() + torch.from_numpy(rng.normal(0, 12, photos.shape))).clamp(0, 255).round().to(torch.uint8)
        noise = torch.from_numpy(rng.integers(0, 256, photos.shape, dtype=np.uint8))
        for a, b in ((photos, related), (photos[:3], photos[3:]), (photos, noise)):
            expected = pggan_msssim(a.permute(0, 2, 3, 1).numpy(), b.permute(0, 2, 3, 1).numpy())
            # The reference squares float32 images (ours: float64); a wrong window, weight or
            # level would differ by 1e-2 and more.
            np.testing.assert_allclose(ms_ssim(a, b).numpy(), expected, rtol=0, atol=1e-4)


def test_ms_ssim_refuses_sizes_its_five_levels_cannot_halve() -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        ms_ssim(torch.zeros(1, 3, 24, 24), torch.zeros(1, 3, 24, 24))


def test_psnr_and_mse_per_image() -> None:
    x = torch.zeros(2, 3, 4, 4)
    rec = torch.stack([torch.full((3, 4, 4), 0.1), torch.zeros(3, 4, 4)])
    mse = mse_per_image(x, rec)
    assert mse.tolist() == pytest.approx([0.01, 0.0])
    assert psnr_db(mse).tolist() == pytest.approx([20.0, PSNR_CAP_DB])


# --- the FID Inception network ---------------------------------------------------------------

# Names of the standard file's tensors, as pytorch-fid's fid_inception_v3() builds them:
# torchvision's Inception3(num_classes=1008, aux_logits=False) with FID blocks of the same names.
STANDARD_KEYS_SAMPLE = [
    "Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Conv2d_4a_3x3.bn.bias",
    "Mixed_5b.branch5x5_2.conv.weight", "Mixed_5d.branch_pool.bn.running_mean", "Mixed_6a.branch3x3dbl_3.conv.weight",
    "Mixed_6e.branch7x7dbl_5.bn.weight", "Mixed_7a.branch7x7x3_4.conv.weight", "Mixed_7b.branch3x3_2b.conv.weight",
    "Mixed_7c.branch3x3dbl_3a.bn.running_var", "fc.weight", "fc.bias",
]


def test_fid_inception_has_the_standard_files_names_shapes_and_size() -> None:
    network = FIDInceptionV3()
    state = network.state_dict()
    assert all(key in state for key in STANDARD_KEYS_SAMPLE)
    assert not any("AuxLogits" in key for key in state)  # aux_logits=False
    assert tuple(state["fc.weight"].shape) == (1008, 2048)  # the TensorFlow graph's 1008 classes
    assert tuple(state["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(state["Mixed_7c.branch_pool.conv.weight"].shape) == (192, 2048, 1, 1)
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and
    # with 1008 instead of 1000 classes (+16,392): 23,850,960, about the 95.6 MB of the file.
    assert sum(p.numel() for p in network.parameters()) == 23_850_960
    assert sum(isinstance(m, nn.BatchNorm2d) for m in network.modules()) == 94
    assert all(m.eps == 0.001 for m in network.modules() if isinstance(m, nn.BatchNorm2d))


def test_fid_inception_gives_pool3_features_of_any_input_size() -> None:
    network = FIDInceptionV3().eval()
    with torch.no_grad():
        features = network(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 2048) and bool((features >= 0).all())  # after ReLU and an average


def test_fid_inception_file_loads_and_checks(tmp_path: Path) -> None:
    network = FIDInceptionV3()
    state = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "inception.pth")  # as older files: no num_batches_tracked
    loaded, network_id = load_fid_inception(tmp_path / "inception.pth")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.state_dict()["Mixed_6b.branch1x1.conv.weight"], state["Mixed_6b.branch1x1.conv.weight"])
    assert network_id != STANDARD_ID and network_id.startswith("inception-v3-fid:sha256=")

    with pytest.raises(InceptionWeightsError) as missing:
        load_fid_inception(tmp_path / "absent.pth")
    assert str(missing.value).startswith(f"{tmp_path / 'absent.pth'}: no such file") and FID_INCEPTION_URL in str(missing.value)
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(InceptionWeightsError, match="missing: Mixed_7c.branch_pool.conv.weight; unexpected: AuxLogits"):
        load_fid_inception(tmp_path / "other.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(InceptionWeightsError, match="not a torch weights file"):
        load_fid_inception(tmp_path / "garbage.pth")


def test_metric_modules_import_no_training_dependencies() -> None:
    code = ("import sys, introvae_dist.metrics.fid, introvae_dist.metrics.ms_ssim, introvae_dist.metrics.inception, "
            "introvae_dist.metrics.pixels, introvae_dist.metrics.sharpness; print(sorted(m for m in ('deepspeed', 'yaml', 'webdataset') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
