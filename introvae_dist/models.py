"""Encoder E and generator G of IntroVAE (Huang et al. 2018, Appendix B, Table 3).

Table 3 gives the 1024x1024 networks. Smaller resolutions "reduce the number of
[Res-block + AvgPool] in the inference model and [Upsample + Res-block] in the generator";
we drop the highest-resolution pairs, so every remaining stage keeps Table 3's width for its
spatial size (512 px: 32 .. 512, 256 px: 64 .. 512, 128 px: 128 .. 512).

Layer details the paper leaves open follow the authors' public code: BatchNorm +
LeakyReLU(0.2) inside each residual block and after the encoder's stem conv, average pooling,
nearest-neighbour upsampling, a linear 5x5 output conv, images in [0, 1].

This module imports torch only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NormKind = Literal["batch", "group", "none"]

#: Widths of the 8 stages of Table 3 (1024 px), from the highest resolution to 4x4.
TABLE3_WIDTHS_1024: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 512, 512)
#: Side of the smallest feature map in both networks (Table 3: 512 x 4 x 4).
BOTTOM_SIDE_PX = 4
LEAKY_SLOPE = 0.2


def num_stages(resolution_px: int) -> int:
    """Number of 2x resolution changes between the image and the 4x4 bottom."""
    stages = math.log2(resolution_px / BOTTOM_SIDE_PX) if resolution_px > 0 else -1.0
    if stages < 1 or not stages.is_integer():
        raise ValueError(
            f"resolution_px={resolution_px}: expected a power of two >= 8 (the networks halve "
            f"the side down to {BOTTOM_SIDE_PX}x{BOTTOM_SIDE_PX})"
        )
    return int(stages)


def table3_widths(resolution_px: int) -> tuple[int, ...]:
    """Table 3's widths for `resolution_px`, dropping the highest-resolution stages."""
    stages = num_stages(resolution_px)
    if stages > len(TABLE3_WIDTHS_1024):
        raise ValueError(f"resolution_px={resolution_px}: Table 3 defines at most 1024 px")
    return TABLE3_WIDTHS_1024[len(TABLE3_WIDTHS_1024) - stages :]


def _check_widths(resolution_px: int, widths: Sequence[int]) -> None:
    if len(widths) != num_stages(resolution_px):
        raise ValueError(
            f"widths has {len(widths)} entries; resolution_px={resolution_px} needs "
            f"{num_stages(resolution_px)} (one per 2x step between the image and 4x4)"
        )


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose running statistics stay fp32 when the weights are cast to bf16.

    DeepSpeed's bf16 mode casts parameters but not buffers, and the CPU kernel rejects bf16
    weights next to fp32 running stats (FIELD-NOTES). Casting the (tiny) affine parameters to
    the statistics' dtype keeps the statistics exact and the activations in bf16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.running_mean is None or self.weight.dtype == self.running_mean.dtype:
            return super().forward(x)
        # Same as nn.BatchNorm2d.forward with running stats tracked, affine cast to fp32.
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight.to(self.running_mean.dtype),
            None if self.bias is None else self.bias.to(self.running_mean.dtype),
            self.training,
            momentum,
            self.eps,
        )


def make_norm(kind: NormKind, channels: int) -> nn.Module:
    """Normalisation layer; `group` and `none` do not depend on how a batch is split."""
    if kind == "batch":
        return BatchNorm2d(channels)
    if kind == "group":
        groups = math.gcd(channels, 32)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r}: expected one of 'batch', 'group', 'none'")


class _RestoreBuffersAfter:
    """Context that puts a module's buffers back as they were on entry.

    Used as the recomputation context of activation checkpointing: the backward pass re-runs
    the block's forward, which would advance BatchNorm running statistics a second time
    (pytorch#96136). Restoring them makes one forward advance the statistics exactly once.
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> None:
        self._saved = [(b, b.detach().clone()) for b in self._module.buffers()]

    def __exit__(self, *exc: object) -> bool:
        with torch.no_grad():
            for buffer, saved in self._saved:
                buffer.copy_(saved)
        self._saved = []
        return False


class _NoContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


class ResidualBlock(nn.Module):
    """Table 3's Res-block: a 1x1 conv shortcut where the width changes, plus two 3x3 convs.

    out = act(norm2(conv2(act(norm1(conv1(x)))) + shortcut(x))), as in the authors' code.
    With `checkpointing`, activations inside the block are recomputed in the backward pass
    (non-reentrant, so one block may serve x, x_r and x_p in one loss).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: NormKind, checkpointing: bool) -> None:
        super().__init__()
        bias = norm == "none"  # a following norm layer would cancel a conv bias
        self.shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1, bias=bias) if in_channels != out_channels else nn.Identity()
        )
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, out_channels)
        self.checkpointing = checkpointing

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.norm1(self.conv1(x)), LEAKY_SLOPE)
        h = self.conv2(h)
        return F.leaky_relu(self.norm2(h + self.shortcut(x)), LEAKY_SLOPE)

    def _contexts(self) -> tuple[_NoContext, _RestoreBuffersAfter]:
        return _NoContext(), _RestoreBuffersAfter(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._body, x, use_reentrant=False, context_fn=self._contexts)
        return self._body(x)


class Encoder(nn.Module):
    """Inference model E: image (B, 3, R, R) -> (mu, logvar), each (B, latent_dim).

    Stem conv 5x5 + AvgPool, then [Res-block, AvgPool] per stage, a Res-block at 4x4, and an
    FC layer whose 2 * latent_dim outputs are split into mu and logvar (Table 3, left).
    """

    def __init__(
        self,
        resolution_px: int,
        latent_dim: int,
        widths: Sequence[int],
        norm: NormKind = "batch",
        checkpointing: bool = True,
    ) -> None:
        super().__init__()
        _check_widths(resolution_px, widths)
        self.resolution_px = resolution_px
        self.latent_dim = latent_dim
        layers: list[tuple[str, nn.Module]] = [
            ("stem", nn.Sequential(
                nn.Conv2d(3, widths[0], 5, padding=2, bias=norm == "none"),
                make_norm(norm, widths[0]),
                nn.LeakyReLU(LEAKY_SLOPE),
            )),
            ("pool0", nn.AvgPool2d(2)),
        ]
        for i in range(1, len(widths)):
            layers.append((f"res{i}", ResidualBlock(widths[i - 1], widths[i], norm, checkpointing)))
            layers.append((f"pool{i}", nn.AvgPool2d(2)))
        layers.append(("res_bottom", ResidualBlock(widths[-1], widths[-1], norm, checkpointing)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.fc = nn.Linear(widths[-1] * BOTTOM_SIDE_PX * BOTTOM_SIDE_PX, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)  # (B, W, 4, 4)
        mu, logvar = self.fc(h.flatten(1)).chunk(2, dim=1)  # (B, latent) each
        return mu, logvar


class Generator(nn.Module):
    """Generator G: latent (B, latent_dim) -> image (B, 3, R, R) (Table 3, right).

    FC + ReLU to W x 4 x 4, a Res-block, then [Upsample, Res-block] per stage with the widths
    reversed, and a linear 5x5 conv to RGB.
    """

    def __init__(
        self,
        resolution_px: int,
        latent_dim: int,
        widths: Sequence[int],
        norm: NormKind = "batch",
        checkpointing: bool = True,
    ) -> None:
        super().__init__()
        _check_widths(resolution_px, widths)
        self.resolution_px = resolution_px
        self.latent_dim = latent_dim
        self.bottom_width = widths[-1]
        self.fc = nn.Sequential(nn.Linear(latent_dim, widths[-1] * BOTTOM_SIDE_PX * BOTTOM_SIDE_PX), nn.ReLU())
        reversed_widths = list(reversed(widths))
        layers: list[tuple[str, nn.Module]] = [
            ("res_bottom", ResidualBlock(widths[-1], reversed_widths[0], norm, checkpointing))
        ]
        current = reversed_widths[0]
        for i, width in enumerate(reversed_widths[1:], start=1):
            layers.append((f"up{i}", nn.Upsample(scale_factor=2, mode="nearest")))
            layers.append((f"res{i}", ResidualBlock(current, width, norm, checkpointing)))
            current = width
        layers.append((f"up{len(widths)}", nn.Upsample(scale_factor=2, mode="nearest")))
        layers.append(("res_top", ResidualBlock(current, current, norm, checkpointing)))
        layers.append(("to_rgb", nn.Conv2d(current, 3, 5, padding=2)))
        self.features = nn.Sequential(OrderedDict(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.bottom_width, BOTTOM_SIDE_PX, BOTTOM_SIDE_PX)
        return self.features(h)  # (B, 3, R, R)


def set_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Switch activation checkpointing of every residual block in `module`."""
    for block in module.modules():
        if isinstance(block, ResidualBlock):
            block.checkpointing = enabled
