"""IntroVAE losses (Huang et al. 2018, Eq. 9-12) as pure tensor functions.

Normalisation choices, against the paper and the authors' code:

* Per image, KL sums over latent dimensions and L_AE over pixels and channels, as Eq. 9 and
  Eq. 10 write them. The margin m (90-120 in Sec. 4.1) is therefore a per-image KL.
* L_AE keeps Eq. 10's factor 0.5 (`l_ae_factor`); the authors' code omits it, which equals
  `l_ae_factor=1.0`.
* Over the batch we average (the authors' code) where Eq. 9-10 sum over N. A mean makes the
  loss independent of the batch size and of how a batch is split across ranks, because
  DeepSpeed averages gradients over ranks. With Adam the two differ only through epsilon.
* The hinge [m - KL]^+ of Eq. 11 is applied per image, then averaged. The authors apply it to
  the batch-mean KL and scale it by an extra 0.5; per image keeps the loss independent of the
  split across ranks, and the two agree when every image lies on the same side of m.
* Eq. 9 as printed lost its minus sign; KL here is -0.5 * sum(1 + logvar - mu^2 - exp(logvar))
  which is >= 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """alpha, beta and m of Eq. 11-12, and the factor of Eq. 10."""

    alpha: float
    beta: float
    margin: float
    l_ae_factor: float = 0.5


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with sigma = exp(logvar / 2) (Sec. 3.3)."""
    return mu + torch.exp(0.5 * logvar) * eps


def kl_per_image(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """L_REG of Eq. 9 for each image: KL(N(mu, sigma^2) || N(0, I)), shape (B,), >= 0."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def reconstruction_per_image(x_r: torch.Tensor, x: torch.Tensor, factor: float = 0.5) -> torch.Tensor:
    """L_AE of Eq. 10 for each image: factor * sum over (C, H, W) of (x_r - x)^2, shape (B,)."""
    return factor * (x_r.float() - x.float()).pow(2).flatten(1).sum(dim=1)


def encoder_loss(
    kl_real: torch.Tensor,
    kl_rec: torch.Tensor,
    kl_fake: torch.Tensor,
    l_ae: torch.Tensor,
    w: LossWeights,
) -> torch.Tensor:
    """L_E of Eq. 11, averaged over images.

    kl_rec and kl_fake are KL(Enc(ng(x_r))) and KL(Enc(ng(x_p))): the caller stops gradients
    at x_r and x_p. Each argument has shape (B,).
    """
    hinge = F.relu(w.margin - kl_rec) + F.relu(w.margin - kl_fake)
    return (kl_real + w.alpha * hinge + w.beta * l_ae).mean()


def generator_loss(kl_rec: torch.Tensor, kl_fake: torch.Tensor, l_ae: torch.Tensor, w: LossWeights) -> torch.Tensor:
    """L_G of Eq. 12, averaged over images: alpha * (KL(Enc(x_r)) + KL(Enc(x_p))) + beta * L_AE."""
    return (w.alpha * (kl_rec + kl_fake) + w.beta * l_ae).mean()
