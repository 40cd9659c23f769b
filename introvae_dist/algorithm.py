"""Algorithm 1 of IntroVAE as two phases: an encoder update, then a generator update.

Each phase names the network it updates. The updated network is called through its engine;
in the generator phase E is called through its bare module with `requires_grad_(False)`, the
pattern that keeps two DeepSpeed engines apart under ZeRO 1-3 (FIELD-NOTES,
deepspeedai/DeepSpeed#4923). G runs once per step (`decode`): its graph serves both phases,
and the encoder phase takes L_AE's gradient at z with `torch.autograd.grad`, which computes no
weight gradient of G, so neither engine's backward ever reaches the other's weights.

Nothing here imports DeepSpeed: an engine is anything with `__call__`, `module`, `backward`
and `step`, so the same code runs on DeepSpeed engines and in plain-PyTorch tests
(`introvae_dist.plain_engine`). What differs between the two is passed in explicitly: the
hook that makes outputs of a bare module part of its engine's backward (`AdoptOutputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

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
from introvae_dist.models import param_dtype


class Engine(Protocol):
    """The part of a DeepSpeed engine the algorithm uses."""

    module: nn.Module

    def __call__(self, x: torch.Tensor) -> object: ...

    def backward(self, loss: torch.Tensor) -> object: ...

    def step(self) -> object: ...


class AdoptOutputs(Protocol):
    """Makes tensors computed by `engine.module`, not by `engine(...)`, part of `engine`'s next
    backward as if `engine(...)` had returned them.

    The step runs a network through its bare module where a data-only `torch.autograd.grad`
    must pass through it first (`decode`, `shared_encoder_phases`); an engine that hooks its
    backward in `__call__` (DeepSpeed) needs those hooks on these outputs before its own
    backward. Each kind of engine comes with its own: `introvae_dist.engine.adopt_outputs`,
    `introvae_dist.plain_engine.adopt_outputs`. Each refuses the other's engines, so a
    DeepSpeed step given the plain one stops in its first step with a message saying which to
    pass, not inside DeepSpeed's backward (an IndexError in reduce_ipg_grads).
    """

    # Any: each hook takes its own kind of engine, not every Engine.
    def __call__(self, engine: Any, *outputs: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class StepNoise:
    """The randomness of one step: eps for the reparameterisation and z_p ~ N(0, I), and for
    Soft-IntroVAE the eps of its four re-encodings (soft_algorithm.py)."""

    eps: torch.Tensor  # (B, latent)
    z_prior: torch.Tensor  # (B, latent)
    #: (REENCODINGS, B, latent) or None: eps of E(x_r), E(x_p) in E's phase, then in G's.
    eps_reencoded: torch.Tensor | None = None

    @staticmethod
    def sample(batch: int, latent_dim: int, generator: torch.Generator, device: torch.device,
               reencodings: int = 0) -> StepNoise:
        """Drawn in this order from `generator`; IntroVAE (reencodings 0) draws what it always has."""
        eps = torch.randn(batch, latent_dim, generator=generator).to(device)
        z_prior = torch.randn(batch, latent_dim, generator=generator).to(device)
        extra = torch.randn(reencodings, batch, latent_dim, generator=generator).to(device) if reencodings else None
        return StepNoise(eps=eps, z_prior=z_prior, eps_reencoded=extra)

    def to(self, device: torch.device) -> StepNoise:
        """The same noise on `device`."""
        extra = None if self.eps_reencoded is None else self.eps_reencoded.to(device)
        return StepNoise(eps=self.eps.to(device), z_prior=self.z_prior.to(device), eps_reencoded=extra)

    def rows(self, index: slice) -> StepNoise:
        """The noise of images `index` of the batch (a rank's share of a global batch)."""
        extra = None if self.eps_reencoded is None else self.eps_reencoded[:, index]
        return StepNoise(eps=self.eps[index], z_prior=self.z_prior[index], eps_reencoded=extra)


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


def run_in_dtype(net: Callable[[torch.Tensor], object], module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Call `net` (an engine or its bare module) on `t` cast to `module`'s dtype: E and G may
    run in different precisions."""
    out: torch.Tensor = net(t.to(param_dtype(module)))  # type: ignore[assignment]
    return out


def encode(net: Callable[[torch.Tensor], object], module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) of E, called as `net` (its engine or bare module)."""
    mu, logvar = run_in_dtype(net, module, x)
    return mu, logvar


def through_z(z: torch.Tensor, grad_z: torch.Tensor) -> torch.Tensor:
    """A zero-valued term whose gradient for E is grad_z . dz/dtheta_E: how a loss whose
    gradient at z was taken through G (with `torch.autograd.grad`) reaches E's weights."""
    inner = (z * grad_z).sum()
    return inner - inner.detach()


@dataclass
class Decoded:
    """Algorithm 1, lines 3-6, shared by both phases: z from E(x), x_r = G(z), x_p = G(z_p).

    G runs once per step. Its graph is built from `z_leaf`, a detached copy of z, and kept for
    the generator phase: G's weights do not change during the encoder phase, so its graph
    stays valid across E's optimiser step, and the generator phase reuses it instead of
    decoding again. The encoder phase reaches E through z with `grad_z` instead.
    """

    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor  # carries E's graph
    x_rec: torch.Tensor  # carries G's graph (from z_leaf)
    x_fake: torch.Tensor  # carries G's graph
    l_ae: torch.Tensor  # (B,), carries G's graph
    #: d(beta * mean L_AE)/dz through G: L_AE's gradient for E (Eq. 11), without touching G's
    #: gradients, so G's engine sees nothing of the encoder phase.
    grad_z: torch.Tensor


def decode(enc: Engine, gen: Engine, x: torch.Tensor, noise: StepNoise, w: LossWeights) -> Decoded:
    """Encode x, decode z and z_p once, and take L_AE's gradient at z (data gradients of G only)."""
    mu, logvar = encode(enc, enc.module, x)
    z = reparameterize(mu.float(), logvar.float(), noise.eps)
    z_leaf = z.detach().requires_grad_(True)
    # G through its bare module: its first backward is the data-only one below, which must not
    # run G's engine hooks; generator_phase attaches them before G's own backward.
    x_rec = run_in_dtype(gen.module, gen.module, z_leaf)
    x_fake = run_in_dtype(gen.module, gen.module, noise.z_prior)
    l_ae = reconstruction_per_image(x_rec, x, w.l_ae_factor)
    # autograd.grad runs only the path to z_leaf: no weight gradients of G are computed and
    # none of G's ZeRO gradient hooks fire. The graph is kept for the generator phase.
    (grad_z,) = torch.autograd.grad(w.beta * l_ae.mean(), z_leaf, retain_graph=True)
    return Decoded(mu, logvar, z, x_rec, x_fake, l_ae, grad_z)


def encoder_phase(enc: Engine, d: Decoded, w: LossWeights, on_gradients: GradientHook | None
                  ) -> dict[str, torch.Tensor]:
    """Algorithm 1, lines 7-10: update E with L_E of Eq. 11 (gradients stopped at x_r, x_p)."""
    kl_real = kl_per_image(d.mu, d.logvar)
    kl_rec = kl_per_image(*encode(enc, enc.module, d.x_rec.detach()))  # ng(x_r)
    kl_fake = kl_per_image(*encode(enc, enc.module, d.x_fake.detach()))  # ng(x_p)
    loss = encoder_loss(kl_real, kl_rec, kl_fake, d.l_ae.detach(), w)
    enc.backward(loss + through_z(d.z, d.grad_z))
    if on_gradients is not None:
        on_gradients("encoder")
    enc.step()
    figures = {"loss_e": loss, "l_ae": d.l_ae.mean(), "kl_real": kl_real.mean(),
               "kl_rec_e": kl_rec.mean(), "kl_fake_e": kl_fake.mean()}
    return {k: v.detach() for k, v in figures.items()}


def generator_phase(
    enc: Engine, gen: Engine, d: Decoded, w: LossWeights, on_gradients: GradientHook | None, *, adopt: AdoptOutputs
) -> dict[str, torch.Tensor]:
    """Algorithm 1, lines 11-13: re-encode x_r and x_p with the updated E, update G with L_G.

    E is called through its bare module with its weights frozen (FIELD-NOTES: the frozen
    engine stays out of the backward), so only data gradients pass through it into G's graph.
    """
    adopt(gen, d.x_rec, d.x_fake)  # decode() ran G through its bare module
    with frozen(enc.module):
        kl_rec = kl_per_image(*encode(enc.module, enc.module, d.x_rec))
        kl_fake = kl_per_image(*encode(enc.module, enc.module, d.x_fake))
        loss = generator_loss(kl_rec, kl_fake, d.l_ae, w)
        gen.backward(loss)
        if on_gradients is not None:
            on_gradients("generator")
        gen.step()
    return {"loss_g": loss.detach(), "kl_rec_g": kl_rec.mean().detach(), "kl_fake_g": kl_fake.mean().detach()}


def shared_encoder_phases(
    enc: Engine, gen: Engine, d: Decoded, w: LossWeights, on_gradients: GradientHook | None, *, adopt: AdoptOutputs
) -> dict[str, torch.Tensor]:
    """The fast path: one encoder pass over x_r and x_p serves L_E (Eq. 11) and L_G (Eq. 12).

    Appendix C says other orders of the two updates also train; this is the one that shares
    the re-encoding. The pass runs with E's weights as they were before E's step, so G's
    gradient is taken with E_t where Algorithm 1 uses E_{t+1}; everything else is Algorithm 1.
    It saves the generator phase's second encoder forward over x_r and x_p.

    One forward of E on leaf copies of x_r and x_p: first the data gradients of alpha * L_G's
    KL terms at x_r and x_p (autograd.grad: E's weight gradients and hooks untouched), then
    E's own backward of L_E and its step, then G's backward through the kept graph of decode().
    """
    kl_real = kl_per_image(d.mu, d.logvar)
    x_rec = d.x_rec.detach().requires_grad_(True)
    x_fake = d.x_fake.detach().requires_grad_(True)
    # Through E's bare module, as decode() runs G: the data-only autograd.grad below must not
    # run E's engine hooks; they are attached afterwards for E's own backward.
    encoded_rec, encoded_fake = encode(enc.module, enc.module, x_rec), encode(enc.module, enc.module, x_fake)
    kl_rec, kl_fake = kl_per_image(*encoded_rec), kl_per_image(*encoded_fake)
    grad_rec, grad_fake = torch.autograd.grad((w.alpha * (kl_rec + kl_fake)).mean(), (x_rec, x_fake),
                                              retain_graph=True)
    adopt(enc, *encoded_rec, *encoded_fake)
    loss_e = encoder_loss(kl_real, kl_rec, kl_fake, d.l_ae.detach(), w)
    enc.backward(loss_e + through_z(d.z, d.grad_z))
    if on_gradients is not None:
        on_gradients("encoder")
    enc.step()
    loss_g = generator_loss(kl_rec.detach(), kl_fake.detach(), d.l_ae, w)
    adopt(gen, d.x_rec, d.x_fake)
    through_e = (d.x_rec.float() * grad_rec.float()).sum() + (d.x_fake.float() * grad_fake.float()).sum()
    gen.backward(loss_g + through_e - through_e.detach())
    if on_gradients is not None:
        on_gradients("generator")
    gen.step()
    figures = {"loss_e": loss_e, "l_ae": d.l_ae.mean(), "kl_real": kl_real.mean(),
               "kl_rec_e": kl_rec.mean(), "kl_fake_e": kl_fake.mean(), "loss_g": loss_g,
               "kl_rec_g": kl_rec.mean(), "kl_fake_g": kl_fake.mean()}
    return {k: v.detach() for k, v in figures.items()}


#: "algorithm1": the paper's order (default). "shared_encoder": the fast path of
#: `shared_encoder_phases`, documented in docs/BENCHMARKS.md with its measured speedup.
StepOrder = Literal["algorithm1", "shared_encoder"]
STEP_ORDERS: tuple[str, ...] = ("algorithm1", "shared_encoder")


def train_step(
    enc: Engine, gen: Engine, x: torch.Tensor, noise: StepNoise, w: LossWeights,
    on_gradients: GradientHook | None = None, order: StepOrder = "algorithm1", *, adopt: AdoptOutputs,
) -> dict[str, torch.Tensor]:
    """One iteration of Algorithm 1: the encoder phase, then the generator phase.

    During the VAE warm-up the caller passes alpha = 0, which reduces Eq. 11-12 to a VAE.
    `order="shared_encoder"` takes the fast path (see `shared_encoder_phases`).
    `adopt` is the output hook of the engines' kind, required so that no caller can leave it
    out: `introvae_dist.engine.adopt_outputs` for DeepSpeed engines,
    `introvae_dist.plain_engine.adopt_outputs` for `PlainEngine`s.
    Returns the figures named in METRIC_NAMES as 0-dim tensors.
    """
    d = decode(enc, gen, x, noise, w)
    if order == "shared_encoder":
        return shared_encoder_phases(enc, gen, d, w, on_gradients, adopt=adopt)
    if order != "algorithm1":
        raise ValueError(f"order={order!r}: expected one of {STEP_ORDERS}")
    figures = encoder_phase(enc, d, w, on_gradients)
    figures.update(generator_phase(enc, gen, d, w, on_gradients, adopt=adopt))
    return figures
