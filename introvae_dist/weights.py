"""Exported inference weights: E and G in fp32 in one safetensors file (``introvae-dist export``).

    from introvae_dist.weights import load_exported
    encoder, generator, model = load_exported("celebahq-256.safetensors")
    z = torch.randn(16, model.latent_dim)
    with torch.no_grad():
        images = generator(z).clamp(0, 1)   # (16, 3, R, R) in [0, 1]

This module imports torch, safetensors, :mod:`introvae_dist.models` and the dataclasses of
:mod:`introvae_dist.config` only (no DeepSpeed, webdataset or YAML, which config imports only
to read a file), so inference needs none of the training dependencies. The model section comes
back as the :class:`~introvae_dist.config.ModelConfig` training used, widths resolved.

The file (written by :func:`introvae_dist.export.export_checkpoint`):

- tensors ``ema.encoder.<name>`` and ``ema.generator.<name>`` (runs trained with ``ema.*``):
  the same for the weights' moving average (introvae_dist.ema), with the buffers of the live
  network; metadata ``introvae_dist.ema`` names the networks averaged and the ema section.
  Loading takes these by default (``weights="ema"``), the raw ones with ``weights="raw"``;
- tensors ``encoder.<name>`` and ``generator.<name>``: each network's whole ``state_dict()``,
  parameters and BatchNorm running statistics, fp32 (``num_batches_tracked``: int64);
- metadata (strings): ``introvae_dist.format`` = :data:`FORMAT`; ``introvae_dist.model``, the
  JSON of the model section with the widths resolved, :data:`MODEL_KEYS` only
  (:func:`model_to_json`); ``introvae_dist.step`` and ``introvae_dist.images_seen`` of the checkpoint;
  ``introvae_dist.tensors_sha256``, :func:`tensors_sha256` of all the tensors, checked on every
  load (safetensors itself checks the header, not the data: a flipped byte inside a tensor
  would load as a wrong weight, or a NaN). Files written before it was added load unchecked,
  with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from introvae_dist.config import ConfigError, ModelConfig
from introvae_dist.models import Encoder, Generator, build_networks

#: Bump when the layout above changes incompatibly; readers refuse any other value.
FORMAT = "introvae-dist-weights/1"
META_FORMAT = "introvae_dist.format"
META_MODEL = "introvae_dist.model"
META_STEP = "introvae_dist.step"
META_IMAGES_SEEN = "introvae_dist.images_seen"
META_SHA256 = "introvae_dist.tensors_sha256"
#: Tensor name prefix of each network, in file order.
PREFIXES = {"encoder": "encoder.", "generator": "generator."}
#: ... of each network's moving average (introvae_dist.ema), whole state dicts, when trained with one.
EMA_PREFIXES = {"encoder": "ema.encoder.", "generator": "ema.generator."}
#: JSON: the networks the file holds an EMA of, and the ema section they were averaged with.
META_EMA = "introvae_dist.ema"
#: Which weights to load: the moving average where the file has one (the default), or the raw ones.
WeightsChoice = Literal["ema", "raw"]
#: The model section's keys in ``introvae_dist.model``, as every exported file has held them.
#: checkpoint_min_side_px is left out: it only trades memory for time in training.
MODEL_KEYS = ("resolution_px", "latent_dim", "widths", "norm", "checkpoint_blocks")
_NORMS = ("batch", "group", "none")


class WeightsError(ValueError):
    """An exported weights file is missing, unreadable or not what this version writes; the
    message names the file."""


def exported_model(model: ModelConfig) -> ModelConfig:
    """``model`` as an exported file records it: the :data:`MODEL_KEYS`, widths resolved (the
    others at their defaults), which is what :func:`read_info` gives back for that file."""
    return ModelConfig(resolution_px=model.resolution_px, latent_dim=model.latent_dim,
                       widths=list(model.resolved_widths()), norm=model.norm,
                       checkpoint_blocks=model.checkpoint_blocks)


def model_to_json(model: ModelConfig) -> str:
    """The ``introvae_dist.model`` metadata of ``model`` (keys sorted: the same bytes for the
    same section, as files exported before it was a ModelConfig hold)."""
    exported = exported_model(model)
    return json.dumps({key: getattr(exported, key) for key in MODEL_KEYS}, sort_keys=True)


def model_from_json(text: str, source: str) -> ModelConfig:
    """Parse and check the ``introvae_dist.model`` metadata; WeightsError naming `source`."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{source}: metadata {META_MODEL} is not JSON: {e}") from None
    if not isinstance(raw, dict) or set(raw) != set(MODEL_KEYS):
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise WeightsError(f"{source}: metadata {META_MODEL} must hold {sorted(MODEL_KEYS)}, got {got}")
    # Types here, as load_config's reader checks them: ModelConfig checks only the ranges.
    ints_ok = all(type(raw[k]) is int and raw[k] > 0 for k in ("resolution_px", "latent_dim"))
    widths_ok = isinstance(raw["widths"], list) and raw["widths"] and all(
        type(w) is int and w > 0 for w in raw["widths"])
    if not (ints_ok and widths_ok and raw["norm"] in _NORMS and type(raw["checkpoint_blocks"]) is bool):
        raise WeightsError(f"{source}: metadata {META_MODEL} has invalid values: {text}")
    try:
        return ModelConfig(**raw)  # e.g. widths that do not fit the resolution
    except ConfigError as e:
        raise WeightsError(f"{source}: metadata {META_MODEL} is not a valid model section ({e})") from None


@dataclass(frozen=True)
class ExportInfo:
    """What an exported file's header says (no tensor data read)."""

    path: Path
    model: ModelConfig
    step: int
    images_seen: int
    #: The networks the file holds a moving average of ("encoder", "generator"); () for none.
    ema_networks: tuple[str, ...] = ()
    #: The ema section they were averaged with (half_life_images, rampup, encoder), or None.
    ema: dict[str, Any] | None = None


def read_info(path: str | Path) -> ExportInfo:
    """Read and check an exported file's header: format tag, model section, step, names.

    Raises:
        WeightsError: missing file, not a safetensors file, missing or unknown format tag, bad metadata.
    """
    path = Path(path)
    with _open(path) as f:
        return _info(path, f.metadata() or {})


def load_exported(
    path: str | Path, device: str | torch.device = "cpu", weights: WeightsChoice = "ema"
) -> tuple[Encoder, Generator, ModelConfig]:
    """E and G of an exported file, fp32, in eval mode, on `device`: each network's moving
    average where the file holds one (``weights="ema"``), else (or with ``"raw"``) its weights.

    Every tensor of both networks must be in the file and nothing else (``strict=True``).

    Raises:
        WeightsError: missing file, not a safetensors file, missing or unknown format tag, bad
            metadata, missing/unexpected tensors or wrong shapes.
    """
    path = Path(path)
    with _open(path) as f:
        metadata = f.metadata() or {}
        info = _info(path, metadata)
        state = {name: f.get_tensor(name) for name in f.keys()}
    _check_sha256(path, state, metadata.get(META_SHA256))
    encoder, generator = build_networks(info.model)
    prefixes = (*PREFIXES.values(), *(EMA_PREFIXES[n] for n in info.ema_networks))
    unexpected = [name for name in state if not name.startswith(prefixes)]
    if unexpected:
        raise WeightsError(f"{path}: tensors outside {'/'.join(prefixes)}: {_some(unexpected)}")
    for net_name, net in (("encoder", encoder), ("generator", generator)):
        prefix = EMA_PREFIXES[net_name] if weights == "ema" and net_name in info.ema_networks else PREFIXES[net_name]
        net_state = {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}
        try:
            net.load_state_dict(net_state, strict=True)
        except RuntimeError as e:
            problems = " ".join(str(e).split())  # torch's message spans several lines
            raise WeightsError(f"{path}: the {net_name} tensors do not fit the model in its metadata: "
                               f"{problems}") from None
    for net in (encoder, generator):
        net.to(device=device, dtype=torch.float32).eval()
    return encoder, generator, info.model


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Flattened first: a 0-dim tensor (num_batches_tracked) cannot be viewed as bytes.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- helpers ---------------------------------------------------------------------------------

def _check_sha256(path: Path, state: dict[str, torch.Tensor], recorded: str | None) -> None:
    if recorded is None:
        warnings.warn(f"{path}: no {META_SHA256} in its metadata (exported by an older version): "
                      "its tensors cannot be checked", stacklevel=3)
        return
    actual = tensors_sha256(state)
    if actual != recorded:
        raise WeightsError(f"{path}: its tensors do not match the checksum in its metadata ({META_SHA256} "
                           f"{recorded[:16]}..., the data gives {actual[:16]}...): the file is damaged. "
                           "Export it again from its checkpoint")

def _open(path: Path):  # -> safetensors' safe_open handle (a context manager)
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if not path.is_file():
        raise WeightsError(f"{path}: not a file")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a safetensors file ({e})") from None


def _info(path: Path, metadata: dict[str, str]) -> ExportInfo:
    tag = metadata.get(META_FORMAT)
    if tag is None:
        raise WeightsError(f"{path}: a safetensors file, but not one written by introvae-dist export "
                           f"(no {META_FORMAT} in its metadata)")
    if tag != FORMAT:
        raise WeightsError(f"{path}: format {tag!r}; this version reads {FORMAT!r}")
    for key in (META_MODEL, META_STEP, META_IMAGES_SEEN):
        if key not in metadata:
            raise WeightsError(f"{path}: metadata {key} is missing")
    model = model_from_json(metadata[META_MODEL], str(path))
    try:
        step, images_seen = int(metadata[META_STEP]), int(metadata[META_IMAGES_SEEN])
    except ValueError:
        raise WeightsError(f"{path}: metadata {META_STEP}/{META_IMAGES_SEEN} are not integers") from None
    ema_networks, ema = _ema_metadata(path, metadata.get(META_EMA))
    return ExportInfo(path, model, step, images_seen, ema_networks, ema)


def ema_to_json(networks: tuple[str, ...], section: dict[str, Any]) -> str:
    return json.dumps({"networks": list(networks), "section": section}, sort_keys=True)


def _ema_metadata(path: Path, text: str | None) -> tuple[tuple[str, ...], dict[str, Any] | None]:
    """The META_EMA entry: (networks averaged, ema section); ((), None) for a file without it
    (exported before the EMA existed, or trained with ema.half_life_images=0)."""
    if text is None:
        return (), None
    try:
        raw = json.loads(text)
        networks = tuple(raw["networks"])
        section = raw["section"]
    except (ValueError, KeyError, TypeError):
        raise WeightsError(f"{path}: metadata {META_EMA} is not {{networks: [...], section: {{...}}}}: {text}") from None
    if not set(networks) <= set(EMA_PREFIXES) or not isinstance(section, dict):
        raise WeightsError(f"{path}: metadata {META_EMA} names networks {list(networks)}; expected encoder/generator")
    return networks, section


def _some(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
