"""An exponential moving average of E's and G's weights during training, for samples, metrics and
export (StyleGAN2-ADA's G_ema: Karras et al. 2020, training_loop.py; not in the IntroVAE paper).

After every step each weight w_ema <- beta * w_ema + (1 - beta) * w, with beta chosen so that a
weight's influence halves every ``ema.half_life_images`` images (StyleGAN's ema_kimg), and, with
``ema.rampup``, every ``rampup x images_seen`` images while that is shorter: early weights,
far from the later ones, are forgotten fast (StyleGAN's ema_rampup). BatchNorm statistics are
not averaged: the EMA networks take the live network's buffers, as StyleGAN copies them.

The average is kept in fp32 whatever the engine's precision, and of the weights as each rank
holds them: whole under ZeRO 0-2, this rank's partition under ZeRO-3 (engine.local_weights),
so an update costs no collective and no extra memory beyond one fp32 copy of what the rank
holds. Saving, loading and building EMA networks reassemble the whole weights (collectives
under ZeRO-3; every rank calls alike), so a checkpoint's EMA is the same at any world size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from introvae_dist.config import EmaConfig, ModelConfig

#: The format tag of the EMA file in a checkpoint (checkpointing.layout.EMA_NAME).
EMA_STATE_FORMAT = "introvae-dist-ema/1"


def ema_beta(batch_images: int, images_seen: int, half_life_images: float, rampup: float) -> float:
    """The decay of one step of ``batch_images`` images after ``images_seen`` (StyleGAN2-ADA:
    ema_nimg = min(ema_kimg * 1000, cur_nimg * ema_rampup); beta = 0.5 ** (batch / ema_nimg))."""
    half_life = half_life_images
    if rampup > 0:
        half_life = min(half_life, images_seen * rampup)
    return 0.5 ** (batch_images / max(half_life, 1e-8))


class TrainingEMA:
    """The EMA of both networks' weights on one rank (one per engine name: "encoder", "generator")."""

    def __init__(self, cfg: EmaConfig, batch_global: int, engines: dict[str, Any]) -> None:
        from introvae_dist import engine as ds  # the DeepSpeed side: weights as this rank holds them

        self.cfg, self.batch_global, self.engines, self._ds = cfg, batch_global, engines, ds
        self.shadow = {name: {k: v.float().clone() for k, v in ds.local_weights(e).items()}
                       for name, e in engines.items()}

    @torch.no_grad()
    def update(self, images_seen: int) -> float:
        """One step's averaging, after both engines' optimiser steps; returns beta."""
        beta = ema_beta(self.batch_global, images_seen, self.cfg.half_life_images, self.cfg.rampup)
        for name, e in self.engines.items():
            live = self._ds.local_weights(e)
            shadow = self.shadow[name]
            names = list(shadow)
            # lerp(a, b, t) = a + t (b - a): the same update as StyleGAN's p_ema.copy_(p.lerp(p_ema, beta)).
            torch._foreach_lerp_([shadow[k] for k in names], [live[k].float() for k in names], 1.0 - beta)
        return beta

    # -- checkpoints (every rank calls these) ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Whole fp32 weights per network, the same on every rank (collective under ZeRO-3)."""
        state: dict[str, Any] = {"format": EMA_STATE_FORMAT}
        for name, e in self.engines.items():
            state[name] = self._ds.full_from_local(e, self.shadow[name])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Restore the saved average; returns the networks the state has none of (ema.encoder
        switched on at a resume), which start at their current weights."""
        if state.get("format") != EMA_STATE_FORMAT:
            raise ValueError(f"not an introvae-dist EMA state (expected format {EMA_STATE_FORMAT!r})")
        fresh = []
        for name, e in self.engines.items():
            if name not in state:
                self.shadow[name] = {k: v.float().clone() for k, v in self._ds.local_weights(e).items()}
                fresh.append(name)
                continue
            saved = state[name]
            if set(saved) != set(self.shadow[name]):
                raise ValueError(f"the EMA of {name} has other weights than the network "
                                 f"(checkpoint: {sorted(saved)[:3]}..., network: {sorted(self.shadow[name])[:3]}...)")
            self.shadow[name] = {k: v.float() for k, v in self._ds.local_from_full(e, saved).items()}
        return fresh

    def reset_to_live(self) -> None:
        """Start the average at the current weights (a checkpoint saved without an EMA)."""
        self.shadow = {name: {k: v.float().clone() for k, v in self._ds.local_weights(e).items()}
                       for name, e in self.engines.items()}

    # -- use ---------------------------------------------------------------------------------

    def networks(self, model: ModelConfig, device: torch.device) -> dict[str, nn.Module]:
        """fp32 copies of the networks with the EMA weights and the live networks' buffers, in
        eval mode, on ``device`` (collective under ZeRO-3: every rank calls alike)."""
        from introvae_dist.models import build_networks

        encoder, generator = build_networks(model, device="meta")
        built = {"encoder": encoder, "generator": generator}
        out = {}
        for name, e in self.engines.items():
            weights = self._ds.full_from_local(e, self.shadow[name])
            buffers = {k: b.detach() for k, b in e.module.named_buffers()}
            net = built[name].to_empty(device=device)
            net.load_state_dict({**weights, **buffers}, strict=True)
            out[name] = net.float().eval()
        return out
