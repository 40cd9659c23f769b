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

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:  # the type only: importing config at run time would import YAML here
    from introvae_dist.config import ModelConfig

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
    (non-reentrant, so one block may serve x, x_r and x_p in one loss). Inside E and G the
    networks checkpoint each block together with its pooling or upsampling (`Segment`).
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
        #: Checkpoint only when the input's side is at least this (see set_checkpointing).
        self.checkpoint_min_side_px = 0

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The block's computation, never checkpointed (the caller may checkpoint around it)."""
        h = F.leaky_relu(self.norm1(self.conv1(x)), LEAKY_SLOPE)
        h = self.conv2(h)
        return F.leaky_relu(self.norm2(h + self.shortcut(x)), LEAKY_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _maybe_recomputed(self, self.body, x, x.shape[-1])


def _maybe_recomputed(owner: ResidualBlock | Stem, run: Callable[[torch.Tensor], torch.Tensor],
                      x: torch.Tensor, side_px: int) -> torch.Tensor:
    """`run(x)`, under non-reentrant checkpointing when `owner` is switched on and runs at
    `side_px` >= its threshold; the recomputation restores `owner`'s BatchNorm statistics."""
    if (owner.checkpointing and torch.is_grad_enabled() and side_px >= owner.checkpoint_min_side_px
            and not _segment_running):
        return checkpoint(run, x, use_reentrant=False, context_fn=lambda: (_NoContext(), _RestoreBuffersAfter(owner)))
    return run(x)


#: True while run_segments runs a segment (or recomputes one): its segment decided about
#: checkpointing for everything inside, so the blocks do not checkpoint again.
_segment_running = False


@contextmanager
def _inside_segment() -> Iterator[None]:
    global _segment_running
    outer, _segment_running = _segment_running, True
    try:
        yield
    finally:
        _segment_running = outer


class Stem(nn.Sequential):
    """E's first layer (Table 3): Conv 5x5, norm, LeakyReLU at full resolution.

    At 1024 px its three full-size activations are most of what one encoder pass keeps for
    the backward once the residual blocks are checkpointed, so it is checkpointed with them
    (docs/BENCHMARKS.md, memory at 1024). Its children keep nn.Sequential's names (0, 1, 2).
    """

    def __init__(self, width: int, norm: NormKind, checkpointing: bool) -> None:
        super().__init__(nn.Conv2d(3, width, 5, padding=2, bias=norm == "none"), make_norm(norm, width),
                         nn.LeakyReLU(LEAKY_SLOPE))
        self.checkpointing = checkpointing
        self.checkpoint_min_side_px = 0

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's computation, never checkpointed (the caller may checkpoint around it)."""
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _maybe_recomputed(self, self.body, x, x.shape[-1])


@dataclass(frozen=True)
class Segment:
    """One checkpointed unit of a network: a residual block (or E's stem) together with the
    parameter-free layers next to it (E's AvgPool after it; G's Upsample before it and, at the
    top, the to-RGB conv after it).

    Those layers would otherwise keep full-size tensors for their backward outside the
    checkpoint: AvgPool its input (the block's output), the block its upsampled input, to-RGB
    its input. Inside, a segment keeps only its own input, the smallest tensor of the group.
    """

    names: tuple[str, ...]
    #: The layer whose switches (checkpointing, checkpoint_min_side_px) decide.
    owner: str
    #: Side the owner runs at, over the segment input's side (2 after G's Upsample).
    side_factor: int = 1


def run_segments(features: nn.Sequential, segments: Sequence[Segment], x: torch.Tensor) -> torch.Tensor:
    """`features(x)`, with each segment checkpointed as its owner's switches say."""
    for segment in segments:
        layers = [getattr(features, name) for name in segment.names]

        def run(h: torch.Tensor, layers: list[nn.Module] = layers) -> torch.Tensor:
            with _inside_segment():  # also during the backward's recomputation
                for layer in layers:
                    h = layer(h)
            return h

        x = _maybe_recomputed(getattr(features, segment.owner), run, x, x.shape[-1] * segment.side_factor)
    return x


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
            ("stem", Stem(widths[0], norm, checkpointing)),
            ("pool0", nn.AvgPool2d(2)),
        ]
        for i in range(1, len(widths)):
            layers.append((f"res{i}", ResidualBlock(widths[i - 1], widths[i], norm, checkpointing)))
            layers.append((f"pool{i}", nn.AvgPool2d(2)))
        layers.append(("res_bottom", ResidualBlock(widths[-1], widths[-1], norm, checkpointing)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.fc = nn.Linear(widths[-1] * BOTTOM_SIDE_PX * BOTTOM_SIDE_PX, 2 * latent_dim)
        self.segments = (Segment(("stem", "pool0"), "stem"),
                         *(Segment((f"res{i}", f"pool{i}"), f"res{i}") for i in range(1, len(widths))),
                         Segment(("res_bottom",), "res_bottom"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = run_segments(self.features, self.segments, x)  # (B, W, 4, 4)
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
        n = len(widths)
        self.segments = (Segment(("res_bottom",), "res_bottom"),
                         *(Segment((f"up{i}", f"res{i}"), f"res{i}", 2) for i in range(1, n)),
                         Segment((f"up{n}", "res_top", "to_rgb"), "res_top", 2))
        #: Layout of the activations from the 4x4 bottom on. Convolutions follow their input's
        #: layout, so channels_last here makes G run in NHWC; the encoder follows its input's.
        self.activation_memory_format = torch.contiguous_format

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.bottom_width, BOTTOM_SIDE_PX, BOTTOM_SIDE_PX)
        return run_segments(self.features, self.segments, h.contiguous(memory_format=self.activation_memory_format))


def set_checkpointing(module: nn.Module, enabled: bool, min_side_px: int = 0) -> None:
    """Switch activation checkpointing of the residual blocks (and E's stem) in `module`: all
    of them, or with `min_side_px` those that run at a side of at least that many pixels."""
    for block in module.modules():
        if isinstance(block, (ResidualBlock, Stem)):
            block.checkpointing = enabled
            block.checkpoint_min_side_px = min_side_px


def build_networks(model: ModelConfig, device: str | torch.device | None = None) -> tuple[Encoder, Generator]:
    """Freshly initialised E and G of a model section (Table 3's widths unless it names its
    own), with its activation checkpointing; ``device="meta"`` allocates nothing.

    The one place E and G are built from a config: the trainer, exported weights and the
    benchmarks all come here, so they cannot build different networks from the same section.
    """
    args = (model.resolution_px, model.latent_dim, model.resolved_widths(), model.norm, model.checkpoint_blocks)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        encoder, generator = Encoder(*args), Generator(*args)
    for network in (encoder, generator):
        set_checkpointing(network, model.checkpoint_blocks, model.checkpoint_min_side_px)
    return encoder, generator


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's parameters: bf16 inside a bf16 engine, fp32 otherwise. E and G
    may differ (one precision per engine section), so inputs are cast per network."""
    return next(module.parameters()).dtype
