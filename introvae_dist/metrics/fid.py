"""Fréchet Inception Distance (Heusel et al. 2017) from running feature sums.

FID between two image sets is the Fréchet distance between Gaussians fitted to their
features: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. The features come from
any :data:`FeatureExtractor`: the standard FID Inception network
(:mod:`introvae_dist.metrics.inception`) for figures comparable with papers, or anything
else (the tests use a small convolutional net).

:class:`FeatureStats` keeps float64 sums (count, sum, sum of outer products) instead of the
features themselves, so ranks add theirs with one ``all_reduce`` and memory does not grow with
the number of images (2048-d features: 32 MiB of sums, whatever the count).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

#: Images (B, 3, H, W), float in [0, 1] -> features (B, D).
FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


class FeatureStats:
    """Count, sum and sum of outer products of feature vectors, in float64."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.count = 0
        # On the features' device: on a GPU the (D, D) products would otherwise cost the CPU
        # more time than the Inception forward that produced them.
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        """Add a batch of features (B, D)."""
        f = features.detach().to(self.total.device, torch.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {tuple(f.shape)}")
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def to_flat(self) -> torch.Tensor:
        """``[count, total, outer]`` in one float64 vector, for a single ``all_reduce(SUM)``."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.total.device)
        return torch.cat([count, self.total, self.outer.flatten()])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, dim: int) -> FeatureStats:
        stats = cls(dim)
        flat = flat.to("cpu", torch.float64)
        stats.count = int(round(flat[0].item()))
        stats.total = flat[1:1 + dim].clone()
        stats.outer = flat[1 + dim:].reshape(dim, dim).clone()
        return stats

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and unbiased covariance (D, D), as ``np.mean`` / ``np.cov(rowvar=False)``
        of the features would give (pytorch-fid's ``calculate_activation_statistics``)."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}")
        n = self.count
        mu = self.total.cpu() / n
        cov = (self.outer.cpu() - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), ((cov + cov.T) / 2).numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``.

    ``tr((S1 S2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric positive semi-definite ``S1^(1/2) S2 S1^(1/2)``, which has the same eigenvalues
    as ``S1 S2``. Symmetric eigensolvers only: stable for the singular covariances of fewer
    images than feature dimensions, where pytorch-fid's ``scipy.linalg.sqrtm`` needs an
    epsilon fallback. Tiny negative eigenvalues from rounding are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different shapes: {mu1.shape}/{sigma1.shape} and {mu2.shape}/{sigma2.shape}")
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T  # S1^(1/2)
    middle = root1 @ sigma2 @ root1
    eigen = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigen, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_of_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov())
