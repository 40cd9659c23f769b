"""Soft-IntroVAE's step (Daniel & Tamar 2021) on the same two engines as Algorithm 1.

The phases mirror algorithm.py: `soft_decode` (E(x), x_r = G(z), x_p = G(z_p), once per step),
`soft_encoder_phase` (E's update) and `soft_generator_phase` (G's update, with the updated E),
with the same rule for keeping the engines apart under ZeRO 1-3 (algorithm.py, FIELD-NOTES):
the network not being updated is called through its bare module with its weights frozen, and
a gradient that must pass through G on its way to E is taken at z with `torch.autograd.grad`.

What differs from Algorithm 1 (the losses are in soft_losses.py):

* E's phase decodes the re-encodings of x_r and x_p: their ELBO has a reconstruction term.
  Those two G forwards run through G's bare module, frozen, so E's backward passes through G
  for data gradients only.
* G's phase re-encodes x_r and x_p with the updated E (frozen, bare module) as Algorithm 1
  does, and decodes the detached re-encodings through G again (gamma_r's term): two more G
  forwards, part of G's own backward.
* Each re-encoding is reparameterised with its own eps (StepNoise.eps_reencoded), as the
  authors' code draws a fresh one for each.

G's outputs of `soft_decode` serve both phases, as in algorithm.decode: G's weights do not
change during E's phase, so its graph stays valid, and the authors' recomputation of x_r and
x_p in G's phase would give the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from introvae_dist.algorithm import (
    AdoptOutputs,
    Engine,
    GradientHook,
    StepNoise,
    encode,
    frozen,
    run_in_dtype,
    through_z,
)
from introvae_dist.losses import kl_per_image, reconstruction_per_image, reparameterize
from introvae_dist.soft_losses import (
    SoftWeights,
    exp_neg_elbo,
    per_pixel_scale,
    soft_encoder_loss,
    soft_generator_loss,
)

#: The figures of a Soft-IntroVAE step; all are batch means. "_e" / "_g" as in
#: algorithm.METRIC_NAMES. rec_err: rec(x, x_r), the sum of squared errors per image.
#: exp_elbo_rec / exp_elbo_fake: E's exponentiated ELBO of x_r / x_p (in (0, 1]).
SOFT_METRIC_NAMES: tuple[str, ...] = (
    "loss_e", "loss_g", "rec_err", "kl_real", "kl_rec_e", "kl_fake_e", "kl_rec_g", "kl_fake_g",
    "exp_elbo_rec", "exp_elbo_fake",
)
#: Re-encodings per step that need their own eps: E(x_r), E(x_p) in E's phase, then in G's.
REENCODINGS = 4


@dataclass
class SoftDecoded:
    """E(x), x_r = G(z) and x_p = G(z_p), shared by both phases (see the module docstring)."""

    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor  # carries E's graph
    x_rec: torch.Tensor  # carries G's graph (from a detached copy of z)
    x_fake: torch.Tensor  # carries G's graph
    rec_real: torch.Tensor  # (B,) rec(x, x_r), carries G's graph
    #: d(s beta_rec mean rec(x, x_r))/dz through G: that term's gradient for E, taken without
    #: touching G's weight gradients.
    grad_z: torch.Tensor
    scale: float  # s = 1 / (C H W)


def soft_decode(enc: Engine, gen: Engine, x: torch.Tensor, noise: StepNoise, w: SoftWeights) -> SoftDecoded:
    """Encode x, decode z and z_p once, and take the real ELBO's reconstruction gradient at z."""
    scale = per_pixel_scale(x)
    mu, logvar = encode(enc, enc.module, x)
    z = reparameterize(mu.float(), logvar.float(), noise.eps)
    z_leaf = z.detach().requires_grad_(True)
    # G through its bare module, as algorithm.decode: the data-only backward below must not run
    # G's engine hooks; soft_generator_phase attaches them before G's own backward.
    x_rec = run_in_dtype(gen.module, gen.module, z_leaf)
    x_fake = run_in_dtype(gen.module, gen.module, noise.z_prior)
    rec_real = _rec(x, x_rec)
    (grad_z,) = torch.autograd.grad(scale * w.beta_rec * rec_real.mean(), z_leaf, retain_graph=True)
    return SoftDecoded(mu, logvar, z, x_rec, x_fake, rec_real, grad_z, scale)


def _rec(target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """rec(target, x) of soft_losses: the per-image sum of squares, Eq. 10's L_AE without its 0.5."""
    return reconstruction_per_image(x, target, factor=1.0)


def _reencoded(net: Engine | torch.nn.Module, enc_module: torch.nn.Module, images: torch.Tensor, eps: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(E(images)) per image and z = the reparameterised encoding, E called as `net`."""
    mu, logvar = encode(net, enc_module, images)
    return kl_per_image(mu, logvar), reparameterize(mu.float(), logvar.float(), eps)


def _eps(noise: StepNoise) -> torch.Tensor:
    if noise.eps_reencoded is None or noise.eps_reencoded.shape[0] != REENCODINGS:
        raise ValueError(f"a Soft-IntroVAE step needs StepNoise.sample(..., reencodings={REENCODINGS})")
    return noise.eps_reencoded


def soft_encoder_phase(enc: Engine, gen: Engine, d: SoftDecoded, noise: StepNoise, w: SoftWeights,
                       on_gradients: GradientHook | None) -> dict[str, torch.Tensor]:
    """E's update with L_E (soft_losses): the real ELBO, and the exponentiated ELBO of ng(x_r)
    and ng(x_p), each decoded again through G frozen."""
    eps = _eps(noise)
    kl_real = kl_per_image(d.mu, d.logvar)
    x_rec, x_fake = d.x_rec.detach(), d.x_fake.detach()  # ng(x_r), ng(x_p): data for E
    kl_rec, z_rec = _reencoded(enc, enc.module, x_rec, eps[0])
    kl_fake, z_fake = _reencoded(enc, enc.module, x_fake, eps[1])
    with frozen(gen.module):
        rec_rec = _rec(x_rec, run_in_dtype(gen.module, gen.module, z_rec))
        rec_fake = _rec(x_fake, run_in_dtype(gen.module, gen.module, z_fake))
        exp_rec = exp_neg_elbo(rec_rec, kl_rec, d.scale, w)
        exp_fake = exp_neg_elbo(rec_fake, kl_fake, d.scale, w)
        loss = soft_encoder_loss(d.rec_real.detach(), kl_real, exp_rec, exp_fake, d.scale, w)
        enc.backward(loss + through_z(d.z, d.grad_z))
    if on_gradients is not None:
        on_gradients("encoder")
    enc.step()
    figures = {"loss_e": loss, "rec_err": d.rec_real.mean(), "kl_real": kl_real.mean(), "kl_rec_e": kl_rec.mean(),
               "kl_fake_e": kl_fake.mean(), "exp_elbo_rec": exp_rec.mean(), "exp_elbo_fake": exp_fake.mean()}
    return {k: v.detach() for k, v in figures.items()}


def soft_generator_phase(enc: Engine, gen: Engine, d: SoftDecoded, noise: StepNoise, w: SoftWeights,
                         on_gradients: GradientHook | None, *, adopt: AdoptOutputs) -> dict[str, torch.Tensor]:
    """G's update with L_G (soft_losses): x_r and x_p re-encoded by the updated E (frozen, data
    gradients into G), and decoded again from their detached encodings (gamma_r's term)."""
    eps = _eps(noise)
    with frozen(enc.module):
        kl_rec, z_rec = _reencoded(enc.module, enc.module, d.x_rec, eps[2])
        kl_fake, z_fake = _reencoded(enc.module, enc.module, d.x_fake, eps[3])
        # Through G's bare module like x_r and x_p, so that one adopt() gives all four outputs
        # G's engine hooks before its backward.
        x_rec_rec = run_in_dtype(gen.module, gen.module, z_rec.detach())
        x_fake_rec = run_in_dtype(gen.module, gen.module, z_fake.detach())
        adopt(gen, d.x_rec, d.x_fake, x_rec_rec, x_fake_rec)
        rec_rec = _rec(d.x_rec.detach(), x_rec_rec)
        rec_fake = _rec(d.x_fake.detach(), x_fake_rec)
        loss = soft_generator_loss(d.rec_real, kl_rec, kl_fake, rec_rec, rec_fake, d.scale, w)
        gen.backward(loss)
        if on_gradients is not None:
            on_gradients("generator")
        gen.step()
    return {"loss_g": loss.detach(), "kl_rec_g": kl_rec.mean().detach(), "kl_fake_g": kl_fake.mean().detach()}


def soft_train_step(enc: Engine, gen: Engine, x: torch.Tensor, noise: StepNoise, w: SoftWeights,
                    on_gradients: GradientHook | None = None, *, adopt: AdoptOutputs) -> dict[str, torch.Tensor]:
    """One Soft-IntroVAE iteration: E's update, then G's (the authors' order). During the VAE
    warm-up the caller passes `w.adversarial=False`. `noise` needs its re-encodings' eps
    (`StepNoise.sample(..., reencodings=REENCODINGS)`); `adopt` as in algorithm.train_step.
    Returns the figures named in SOFT_METRIC_NAMES as 0-dim tensors."""
    _eps(noise)  # before any forward: a missing eps is the caller's error, not a half-done step
    d = soft_decode(enc, gen, x, noise, w)
    figures = soft_encoder_phase(enc, gen, d, noise, w, on_gradients)
    figures.update(soft_generator_phase(enc, gen, d, noise, w, on_gradients, adopt=adopt))
    return {name: figures[name] for name in SOFT_METRIC_NAMES}
