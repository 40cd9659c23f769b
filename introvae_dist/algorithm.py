"""Algorithm 1 of IntroVAE as two phases: an encoder update, then a generator update.

Each phase names the network it updates and the one it freezes (the StyleGAN3 pattern). The
updated network is called through its engine, the frozen one through its bare module with
`requires_grad_(False)`: the pattern that keeps two DeepSpeed engines apart under ZeRO 1-3
(FIELD-NOTES, deepspeedai/DeepSpeed#4923).

Nothing here imports DeepSpeed: an engine is anything with `__call__`, `module`, `backward`
and `step`, so the same code runs on DeepSpeed engines and in plain-PyTorch tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from introvae_dist.losses import (
    LossWeights,
    encoder_loss,
    generator_loss,
    kl_per_image,
    reconstruction_per_image,
    reparameterize,
)


class Engine(Protocol):
    """The part of a DeepSpeed engine the algorithm uses."""

    module: nn.Module

    def __call__(self, x: torch.Tensor) -> object: ...

    def backward(self, loss: torch.Tensor) -> object: ...

    def step(self) -> object: ...


@dataclass(frozen=True)
class StepNoise:
    """The randomness of one step: eps for the reparameterisation and z_p ~ N(0, I)."""

    eps: torch.Tensor  # (B, latent)
    z_prior: torch.Tensor  # (B, latent)

    @staticmethod
    def sample(batch: int, latent_dim: int, generator: torch.Generator, device: torch.device) -> StepNoise:
        eps = torch.randn(batch, latent_dim, generator=generator).to(device)
        z_prior = torch.randn(batch, latent_dim, generator=generator).to(device)
        return StepNoise(eps=eps, z_prior=z_prior)


#: Names of the per-step figures; all are batch means. "_e" = as seen by E in the encoder
#: phase, "_g" = as seen by the updated E in the generator phase (Algorithm 1, lines 8 and 11).
METRIC_NAMES: tuple[str, ...] = (
    "loss_e", "loss_g", "l_ae", "kl_real", "kl_rec_e", "kl_fake_e", "kl_rec_g", "kl_fake_g",
)

#: Called between a phase's backward and its optimiser step with the phase's name.
GradientHook = Callable[[str], None]


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Freeze `module`'s parameters for one phase and restore their flags afterwards."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


@contextmanager
def norm_stats_unchanged(module: nn.Module) -> Iterator[None]:
    """Keep `module`'s buffers (BatchNorm running statistics) as they are on entry.

    The generator phase re-runs G on the same z and z_p as the encoder phase; G's statistics
    have already seen that batch, so this keeps them to one update per step, as in the
    authors' code, which runs G once.
    """
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _run(net: Callable[[torch.Tensor], object], module: nn.Module, t: torch.Tensor) -> object:
    """Call `net` on `t` cast to `module`'s dtype: E and G may run in different precisions."""
    return net(t.to(_param_dtype(module)))


def _encode(net: Callable[[torch.Tensor], object], module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, logvar = _run(net, module, x)  # type: ignore[misc]
    return mu, logvar


def encoder_phase(
    enc: Engine, gen: Engine, x: torch.Tensor, noise: StepNoise, w: LossWeights, on_gradients: GradientHook | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Algorithm 1, lines 3-10: update E with L_E of Eq. 11. Returns figures and z (detached)."""
    with frozen(gen.module):
        mu, logvar = _encode(enc, enc.module, x)
        z = reparameterize(mu.float(), logvar.float(), noise.eps)
        x_rec = _run(gen.module, gen.module, z)  # graph reaches E through z: beta * L_AE trains E
        with torch.no_grad():
            x_fake = _run(gen.module, gen.module, noise.z_prior)
        l_ae = reconstruction_per_image(x_rec, x, w.l_ae_factor)  # type: ignore[arg-type]
        kl_real = kl_per_image(mu, logvar)
        kl_rec = kl_per_image(*_encode(enc, enc.module, x_rec.detach()))  # type: ignore[union-attr]  # ng(x_r)
        kl_fake = kl_per_image(*_encode(enc, enc.module, x_fake))  # type: ignore[arg-type]  # ng(x_p)
        loss = encoder_loss(kl_real, kl_rec, kl_fake, l_ae, w)
        enc.backward(loss)
        if on_gradients is not None:
            on_gradients("encoder")
        enc.step()
    figures = {"loss_e": loss, "l_ae": l_ae.mean(), "kl_real": kl_real.mean(),
               "kl_rec_e": kl_rec.mean(), "kl_fake_e": kl_fake.mean()}
    return {k: v.detach() for k, v in figures.items()}, z.detach()


def generator_phase(
    enc: Engine, gen: Engine, x: torch.Tensor, z: torch.Tensor, noise: StepNoise, w: LossWeights,
    on_gradients: GradientHook | None,
) -> dict[str, torch.Tensor]:
    """Algorithm 1, lines 11-13: re-encode x_r and x_p with the updated E, update G with L_G.

    x_r and x_p are decoded again from the same z and z_p, because the encoder phase's graph
    must not be reused across E's optimiser step (FIELD-NOTES); beta * L_AE therefore enters
    L_G explicitly instead of through leftover gradients as in the authors' code.
    """
    with frozen(enc.module), norm_stats_unchanged(gen.module):
        x_rec = _run(gen, gen.module, z)
        x_fake = _run(gen, gen.module, noise.z_prior)
        l_ae = reconstruction_per_image(x_rec, x, w.l_ae_factor)  # type: ignore[arg-type]
        kl_rec = kl_per_image(*_encode(enc.module, enc.module, x_rec))  # type: ignore[arg-type]
        kl_fake = kl_per_image(*_encode(enc.module, enc.module, x_fake))  # type: ignore[arg-type]
        loss = generator_loss(kl_rec, kl_fake, l_ae, w)
        gen.backward(loss)
        if on_gradients is not None:
            on_gradients("generator")
        gen.step()
    return {"loss_g": loss.detach(), "kl_rec_g": kl_rec.mean().detach(), "kl_fake_g": kl_fake.mean().detach()}


def train_step(
    enc: Engine, gen: Engine, x: torch.Tensor, noise: StepNoise, w: LossWeights,
    on_gradients: GradientHook | None = None,
) -> dict[str, torch.Tensor]:
    """One iteration of Algorithm 1: the encoder phase, then the generator phase.

    During the VAE warm-up the caller passes alpha = 0, which reduces Eq. 11-12 to a VAE.
    Returns the figures named in METRIC_NAMES as 0-dim tensors.
    """
    figures, z = encoder_phase(enc, gen, x, noise, w, on_gradients)
    figures.update(generator_phase(enc, gen, x, z, noise, w, on_gradients))
    return figures
