"""A trained IntroVAE in use: E and G from any checkpoint or exported file, seeded samples,
reconstructions and latent interpolations.

One loader for every command (:func:`find_source` + :func:`load_models`) reads either

* an exported weights file (``introvae-dist export``; :func:`introvae_dist.weights.load_exported`),
* a training checkpoint ``RUN/checkpoints/step_NNNNNNNN/``, consolidated to fp32 state dicts by
  :func:`introvae_dist.export.consolidated_networks` (any ZeRO stage and number of ranks; no
  DeepSpeed engine is started), or
* a run folder (or its ``checkpoints/``): its newest complete checkpoint, as a resume would pick.

Reproducible generation: image ``i`` of seed ``s`` decodes the latent drawn from its own
generator seeded with ``(s, i)`` (:func:`latents`), and is always computed in the batch
``[kB, (k+1)B)`` that holds it (:func:`generated_batches`): batched convolutions round
differently for other batch compositions (about 1e-7), so this is what makes one rank, two
ranks, or a range asked for alone give the same images, bit for bit, for the same batch size
B and thread count.

No DeepSpeed (only inside the checkpoint consolidation), WebDataset or YAML at import.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from introvae_dist.checkpointing.layout import CHECKPOINTS_DIR, survey
from introvae_dist.config import ModelConfig
from introvae_dist.models import Encoder, Generator, build_networks, param_dtype
from introvae_dist.weights import WeightsChoice, WeightsError, load_exported, read_info

#: Random streams drawn per image, so a latent and a reparameterisation noise never coincide.
LATENT_STREAM, NOISE_STREAM = 0, 1
InterpolationMode = Literal["linear", "slerp"]


class ModelSourceError(ValueError):
    """The weights file, checkpoint or run folder cannot be used; the message names the path."""


@dataclass(frozen=True)
class ModelSource:
    """What a SOURCE argument points at, read without loading any weights."""

    #: The path as given.
    given: Path
    kind: Literal["weights", "checkpoint"]
    #: The exported file or the checkpoint step folder that is read.
    path: Path
    model: ModelConfig
    step: int
    images_seen: int
    #: The run folder of a checkpoint (where eval.jsonl goes), None for an exported file.
    run_dir: Path | None

    def describe(self) -> str:
        m = self.model
        return (f"{self.path} (step {self.step:,}, {self.images_seen:,} images seen; {m.resolution_px} px, "
                f"latent {m.latent_dim})")


@dataclass(frozen=True)
class Models:
    """E and G in eval mode, fp32, on one device, and where they came from."""

    encoder: Encoder
    generator: Generator
    source: ModelSource
    #: The networks loaded with their moving average's weights; the others are raw.
    averaged: tuple[str, ...] = ()

    def weights(self) -> str:
        """Which weights are loaded, for the commands' output."""
        if not self.averaged:
            return "raw weights"
        return "EMA weights" + ("" if len(self.averaged) == 2 else f" of the {self.averaged[0]}, raw of the other")

    @property
    def model(self) -> ModelConfig:
        return self.source.model


def find_source(path: str | Path) -> ModelSource:
    """Resolve a weights file, a checkpoint step folder or a run folder; read its model config,
    step and images seen (headers and ``trainer_state.json`` only, no tensors).

    Raises:
        ModelSourceError: missing path, not one of the three, no complete checkpoint, or a
            damaged/incomplete one (the message names it).
    """
    given = Path(path)
    if not given.exists():
        raise ModelSourceError(f"{given}: no such file or folder (expected an exported .safetensors file, a "
                               f"checkpoint folder RUN/checkpoints/step_NNNNNNNN or a run folder)")
    if given.is_file():
        try:
            info = read_info(given)
        except WeightsError as e:
            raise ModelSourceError(str(e)) from None
        return ModelSource(given, "weights", given, info.model, info.step, info.images_seen, None)
    from introvae_dist.export import ExportError, read_checkpoint  # deferred: only a checkpoint needs it

    step_folder = _step_folder(given)
    try:
        state = read_checkpoint(step_folder)
    except ExportError as e:
        raise ModelSourceError(str(e)) from None
    run_dir = step_folder.parent.parent if step_folder.parent.name == CHECKPOINTS_DIR else None
    return ModelSource(given, "checkpoint", step_folder, state["model"], state["step"], state["images_seen"], run_dir)


def load_models(source: ModelSource | str | Path, device: str | torch.device = "cpu",
                weights: WeightsChoice = "ema") -> Models:
    """E and G of ``source`` (see :func:`find_source`), fp32, eval mode, on ``device``: each
    network's moving average where the source has one (``weights="ema"``), else its raw weights."""
    if not isinstance(source, ModelSource):
        source = find_source(source)
    if source.kind == "weights":
        try:
            encoder, generator, _ = load_exported(source.path, device, weights)
            averaged = read_info(source.path).ema_networks if weights == "ema" else ()
        except WeightsError as e:
            raise ModelSourceError(str(e)) from None
        return Models(encoder, generator, source, averaged)
    from introvae_dist.export import ExportError, consolidated_networks, ema_networks

    try:
        states = consolidated_networks(source.path, source.model)
        averaged_states = ema_networks(source.path, states) if weights == "ema" else {}
        states = {**states, **averaged_states}
    except ExportError as e:
        raise ModelSourceError(str(e)) from None
    encoder, generator = build_networks(source.model)
    for net, state in ((encoder, states["encoder"]), (generator, states["generator"])):
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
        net.to(device=device, dtype=torch.float32).eval()
    return Models(encoder, generator, source, tuple(averaged_states))


def _step_folder(folder: Path) -> Path:
    """A run folder or its checkpoints/ folder -> its newest complete checkpoint; else ``folder``."""
    ckpt_dir = folder if folder.name == CHECKPOINTS_DIR else folder / CHECKPOINTS_DIR
    if not ckpt_dir.is_dir():
        return folder  # a step folder, or nothing usable: read_checkpoint says which
    found = survey(ckpt_dir)
    if not found.with_manifest:
        incomplete = f" ({len(found.incomplete)} incomplete: saves that never finished)" if found.incomplete else ""
        raise ModelSourceError(f"{folder}: no complete checkpoint in {ckpt_dir}{incomplete}")
    return found.with_manifest[0][1]


# --- seeded latents and batched decoding -----------------------------------------------------

def image_seed(seed: int, index: int, stream: int = LATENT_STREAM) -> int:
    """A 63-bit seed for image ``index`` of ``seed`` (SeedSequence mixing: no two (seed, index)
    pairs share a stream, unlike seed + index)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed} and {index}")
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def latents(seed: int, indices: range, latent_dim: int, stream: int = LATENT_STREAM) -> torch.Tensor:
    """(len(indices), latent_dim) float32 standard normal draws, row j from ``image_seed(seed, indices[j])``."""
    rows = [torch.randn(latent_dim, generator=torch.Generator().manual_seed(image_seed(seed, i, stream)))
            for i in indices]
    return torch.stack(rows) if rows else torch.zeros(0, latent_dim)


@torch.no_grad()
def decode(generator: nn.Module, z: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """G(z) as float32 (B, 3, R, R) in [0, 1] on the CPU."""
    images = generator(z.to(device=device, dtype=param_dtype(generator)))
    return images.float().clamp(0.0, 1.0).cpu()


@torch.no_grad()
def encode_mu(encoder: nn.Module, images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """E(x)'s mu, float32 (B, latent_dim) on the CPU; ``images`` float in [0, 1]."""
    mu, _ = encoder(images.to(device=device, dtype=param_dtype(encoder)))
    return mu.float().cpu()


def generated_batches(generator: Generator, start: int, stop: int, seed: int, batch: int,
                      device: torch.device | str, temperature: float = 1.0) -> Iterator[tuple[int, torch.Tensor]]:
    """Images ``[start, stop)`` of ``seed`` in order, as ``(index of the first, float (n, 3, R, R)
    in [0, 1] on the CPU)`` per batch, decoded from z_p ~ N(0, temperature^2 I) (1: the prior
    of Sec. 3; below 1 trades diversity for typical samples).

    Every image is computed inside its aligned batch ``[kB, (k+1)B)`` (the whole batch is
    decoded even where the range covers part of it), so its pixels do not depend on the range
    asked for; see the module docstring.
    """
    for chunk in range(start // batch * batch, stop, batch):
        z = latents(seed, range(chunk, chunk + batch), generator.latent_dim) * temperature
        images = decode(generator, z, device)
        first, last = max(start, chunk), min(stop, chunk + batch)
        yield first, images[first - chunk:last - chunk]


# --- reconstruction and interpolation --------------------------------------------------------

def reconstruct(models: Models, images: torch.Tensor, device: torch.device | str, batch: int, *,
                stochastic: bool = False, seed: int = 0) -> torch.Tensor:
    """G(E(x)) of float images (N, 3, R, R) in [0, 1], in batches ``[kB, (k+1)B)`` of the list.

    Deterministic from mu by default; ``stochastic`` decodes z = mu + sigma * eps instead, eps
    of image i seeded with ``(seed, i)``.
    """
    out = []
    for first in range(0, images.shape[0], batch):
        x = images[first:first + batch]
        with torch.no_grad():
            mu, logvar = models.encoder(x.to(device=device, dtype=param_dtype(models.encoder)))
        z = mu.float().cpu()
        if stochastic:
            eps = latents(seed, range(first, first + x.shape[0]), z.shape[1], NOISE_STREAM)
            z = z + torch.exp(0.5 * logvar.float().cpu()) * eps
        out.append(decode(models.generator, z, device))
    return torch.cat(out)


def interpolate_latents(a: torch.Tensor, b: torch.Tensor, steps: int, mode: InterpolationMode = "linear") -> torch.Tensor:
    """``steps`` points from ``a`` to ``b`` (both (D,)), ends included and exactly ``a`` and ``b``.

    ``linear``: (1 - t) a + t b, as the paper's Fig. 6. ``slerp``: along the great circle
    between the directions of a and b (Shoemake), ``sin((1-t) W)/sin W a + sin(t W)/sin W b``
    with W the angle between them, which keeps intermediate codes at a typical norm of the
    prior instead of cutting through its low-density centre; linear where a and b are parallel.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the two ends), got {steps}")
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)[:, None]  # (steps, 1)
    a64, b64 = a.double(), b.double()
    if mode == "linear":
        path = (1 - t) * a64 + t * b64
    elif mode == "slerp":
        cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp(min=1e-12)
        omega = torch.arccos(cos.clamp(-1.0, 1.0))
        if math.sin(omega.item()) < 1e-6:
            path = (1 - t) * a64 + t * b64
        else:
            path = (torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64) / torch.sin(omega)
    else:
        raise ValueError(f"mode={mode!r}: expected 'linear' or 'slerp'")
    path = path.to(a.dtype)
    path[0], path[-1] = a, b
    return path


def interpolation_strips(models: Models, images: torch.Tensor, steps: int, mode: InterpolationMode,
                         device: torch.device | str, batch: int) -> list[torch.Tensor]:
    """One strip per consecutive pair of ``images`` (N >= 2): real a | G(mu_a) | interpolations |
    G(mu_b) | real b, each (steps + 2, 3, R, R), as the paper's Fig. 6.

    The ends next to the real images are the reconstructions from mu computed by
    :func:`reconstruct` over the same inputs, the very images ``introvae-dist reconstruct``
    draws; only the ``steps - 2`` inner codes are decoded separately.
    """
    if images.shape[0] < 2:
        raise ValueError(f"interpolation needs at least 2 images, got {images.shape[0]}")
    ends = reconstruct(models, images, device, batch)
    mus = torch.cat([encode_mu(models.encoder, images[i:i + batch], device) for i in range(0, images.shape[0], batch)])
    strips = []
    for i in range(images.shape[0] - 1):
        inner = interpolate_latents(mus[i], mus[i + 1], steps, mode)[1:-1]
        middle = decode(models.generator, inner, device) if inner.shape[0] else images[:0]
        strips.append(torch.cat([images[i:i + 1], ends[i:i + 1], middle, ends[i + 1:i + 2], images[i + 1:i + 2]]))
    return strips
