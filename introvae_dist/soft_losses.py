"""Soft-IntroVAE's objective (Daniel & Tamar, CVPR 2021) as pure tensor functions.

Soft-IntroVAE replaces IntroVAE's hinge [m - KL]^+ on generated images (Eq. 11) with a smooth
exponential of their ELBO. With s = 1 / (C x H x W), each ELBO term is scaled to a per-pixel
value, so that the weights do not depend on the resolution:

* E maximises the ELBO of real images and pushes down that of generated ones:
  L_E = s (beta_rec rec(x, x_r) + beta_kl KL(x))
        + 1/4 (mean exp(-2 s ELBO_neg(x_r)) + mean exp(-2 s ELBO_neg(x_p))),
  ELBO_neg(y) = beta_rec rec(y, G(E(y))) + beta_neg KL(E(y)) for y = ng(x_r), ng(x_p).
* G, with E fixed, maximises the ELBO of real images and of its own images:
  L_G = s (beta_rec rec(x, x_r) + beta_kl / 2 (KL(x_r) + KL(x_p))
           + gamma_r beta_rec / 2 (rec(x_r, G(z_r)) + rec(x_p, G(z_p'))))
  with z_r, z_p' the reparameterised encodings of x_r, x_p, G run on them detached.

Conventions, against the authors' train_soft_intro_vae.py:

* rec(a, b) is the sum of squared errors over (C, H, W) per image (their "mse" with sum over
  pixels): ``losses.reconstruction_per_image(a, b, factor=1.0)``, Eq. 10 without its 0.5; KL is ours (losses.kl_per_image, summed over latent dimensions). Terms outside the
  exponential are averaged over the batch, as theirs; the exponential is taken per image and
  then averaged, as theirs.
* Inside E's exponential the generated image y is data: its gradient reaches E through E(y)
  and G(E(y)) only, never through y itself, as the paper writes ELBO(D(z)) for a fixed sample.
  The authors' code takes rec(x_r, ...) with x_r not detached there, which also sends
  E's exponential term through x_r = G(E(x)) back into E; this implementation does not
  (docs/TRAINING.md, "Soft-IntroVAE").
* exp(-2 s ELBO_neg) lies in (0, 1]: both terms of ELBO_neg are >= 0, so it cannot overflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SoftWeights:
    """beta_rec, beta_kl, beta_neg and gamma_r of Soft-IntroVAE; `adversarial` False weights the
    exponential and G's terms of x_r, x_p by 0, leaving the plain VAE of the warm-up (their
    num_vae)."""

    beta_rec: float
    beta_kl: float
    beta_neg: float
    gamma_r: float
    adversarial: bool = True


def per_pixel_scale(images: torch.Tensor) -> float:
    """s = 1 / (C x H x W) of a batch (B, C, H, W)."""
    _, c, h, w = images.shape
    return 1.0 / (c * h * w)


def exp_neg_elbo(rec: torch.Tensor, kl: torch.Tensor, scale: float, w: SoftWeights) -> torch.Tensor:
    """exp(-2 s (beta_rec rec + beta_neg KL)) per image, shape (B,): the exponentiated (negative)
    ELBO of a generated image as E sees it."""
    return torch.exp(-2.0 * scale * (w.beta_rec * rec + w.beta_neg * kl))


def soft_encoder_loss(rec_real: torch.Tensor, kl_real: torch.Tensor, exp_rec: torch.Tensor, exp_fake: torch.Tensor,
                      scale: float, w: SoftWeights) -> torch.Tensor:
    """L_E: the scaled ELBO of real images plus 1/4 of the mean exponentiated ELBO of x_r and of
    x_p (the module docstring). Each tensor argument has shape (B,)."""
    real = scale * (w.beta_rec * rec_real.mean() + w.beta_kl * kl_real.mean())
    return real + _adversarial(w) * 0.25 * (exp_rec.mean() + exp_fake.mean())


def soft_generator_loss(rec_real: torch.Tensor, kl_rec: torch.Tensor, kl_fake: torch.Tensor,
                        rec_rec: torch.Tensor, rec_fake: torch.Tensor, scale: float, w: SoftWeights) -> torch.Tensor:
    """L_G: the scaled reconstruction of real images, KL of x_r and x_p as E sees them, and
    gamma_r's reconstruction of x_r and x_p (the module docstring). Arguments of shape (B,)."""
    real = w.beta_rec * rec_real.mean()
    kl_fakes = 0.5 * w.beta_kl * (kl_rec.mean() + kl_fake.mean())
    rec_fakes = w.gamma_r * 0.5 * w.beta_rec * (rec_rec.mean() + rec_fake.mean())
    return scale * (real + _adversarial(w) * (kl_fakes + rec_fakes))


def _adversarial(w: SoftWeights) -> float:
    """1, or 0 in the warm-up. The terms stay in the graph times 0 rather than being left out:
    every engine forward of the step then takes part in its engine's backward (ZeRO-3 expects
    that), and a NaN in them still shows in the loss."""
    return 1.0 if w.adversarial else 0.0
