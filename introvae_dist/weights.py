"""Exported inference weights: E and G in fp32 in one safetensors file (``introvae-dist export``).

    from introvae_dist.weights import load_exported
    encoder, generator, model = load_exported("celebahq-256.safetensors")
    z = torch.randn(16, model.latent_dim)
    with torch.no_grad():
        images = generator(z).clamp(0, 1)   # (16, 3, R, R) in [0, 1]

This module imports torch, safetensors and :mod:`introvae_dist.models` only (no DeepSpeed,
webdataset or YAML), so inference needs none of the training dependencies. For the same reason
the model section comes back as :class:`ExportedModelConfig`, not :class:`introvae_dist.config.ModelConfig`
(whose module reads YAML); the fields are the same.

The file (written by :func:`introvae_dist.export.export_checkpoint`):

- tensors ``encoder.<name>`` and ``generator.<name>``: each network's whole ``state_dict()``,
  parameters and BatchNorm running statistics, fp32 (``num_batches_tracked``: int64);
- metadata (strings): ``introvae_dist.format`` = :data:`FORMAT`; ``introvae_dist.model``, the
  JSON of the model section with the widths resolved (resolution_px, latent_dim, widths, norm,
  checkpoint_blocks); ``introvae_dist.step`` and ``introvae_dist.images_seen`` of the checkpoint;
  ``introvae_dist.tensors_sha256``, :func:`tensors_sha256` of all the tensors, checked on every
  load (safetensors itself checks the header, not the data: a flipped byte inside a tensor
  would load as a wrong weight, or a NaN). Files written before it was added load unchecked,
  with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from introvae_dist.models import Encoder, Generator

#: Bump when the layout above changes incompatibly; readers refuse any other value.
FORMAT = "introvae-dist-weights/1"
META_FORMAT = "introvae_dist.format"
META_MODEL = "introvae_dist.model"
META_STEP = "introvae_dist.step"
META_IMAGES_SEEN = "introvae_dist.images_seen"
META_SHA256 = "introvae_dist.tensors_sha256"
#: Tensor name prefix of each network, in file order.
PREFIXES = {"encoder": "encoder.", "generator": "generator."}
_NORMS = ("batch", "group", "none")


class WeightsError(ValueError):
    """An exported weights file is missing, unreadable or not what this version writes; the
    message names the file."""


@dataclass(frozen=True)
class ExportedModelConfig:
    """The model section an exported file was trained with (``ModelConfig``'s fields)."""

    resolution_px: int
    latent_dim: int
    #: Width per stage, highest resolution first (always resolved, never null).
    widths: tuple[int, ...]
    norm: str = "batch"
    checkpoint_blocks: bool = True

    def resolved_widths(self) -> tuple[int, ...]:
        return self.widths

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "widths": list(self.widths)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> ExportedModelConfig:
        """Parse and check the ``introvae_dist.model`` metadata; WeightsError naming `source`."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise WeightsError(f"{source}: metadata {META_MODEL} is not JSON: {e}") from None
        expected = {"resolution_px", "latent_dim", "widths", "norm", "checkpoint_blocks"}
        if not isinstance(raw, dict) or set(raw) != expected:
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise WeightsError(f"{source}: metadata {META_MODEL} must hold {sorted(expected)}, got {got}")
        ints_ok = all(type(raw[k]) is int and raw[k] > 0 for k in ("resolution_px", "latent_dim"))
        widths_ok = isinstance(raw["widths"], list) and raw["widths"] and all(
            type(w) is int and w > 0 for w in raw["widths"])
        if not (ints_ok and widths_ok and raw["norm"] in _NORMS and type(raw["checkpoint_blocks"]) is bool):
            raise WeightsError(f"{source}: metadata {META_MODEL} has invalid values: {text}")
        return cls(raw["resolution_px"], raw["latent_dim"], tuple(raw["widths"]), raw["norm"], raw["checkpoint_blocks"])


@dataclass(frozen=True)
class ExportInfo:
    """What an exported file's header says (no tensor data read)."""

    path: Path
    model: ExportedModelConfig
    step: int
    images_seen: int


def build_models(model: ExportedModelConfig, device: str | torch.device | None = None) -> tuple[Encoder, Generator]:
    """Freshly initialised E and G of the given shape (``device="meta"`` allocates nothing)."""
    args = (model.resolution_px, model.latent_dim, model.widths, model.norm, model.checkpoint_blocks)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return Encoder(*args), Generator(*args)


def read_info(path: str | Path) -> ExportInfo:
    """Read and check an exported file's header: format tag, model section, step, names.

    Raises:
        WeightsError: missing file, not a safetensors file, missing or unknown format tag, bad metadata.
    """
    path = Path(path)
    with _open(path) as f:
        return _info(path, f.metadata() or {})


def load_exported(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Encoder, Generator, ExportedModelConfig]:
    """E and G of an exported file, fp32, in eval mode, on `device`.

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
    encoder, generator = build_models(info.model)
    unexpected = [name for name in state if not name.startswith(tuple(PREFIXES.values()))]
    if unexpected:
        raise WeightsError(f"{path}: tensors outside encoder./generator.: {_some(unexpected)}")
    for net_name, net in (("encoder", encoder), ("generator", generator)):
        prefix = PREFIXES[net_name]
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
    model = ExportedModelConfig.from_json(metadata[META_MODEL], str(path))
    try:
        step, images_seen = int(metadata[META_STEP]), int(metadata[META_IMAGES_SEEN])
    except ValueError:
        raise WeightsError(f"{path}: metadata {META_STEP}/{META_IMAGES_SEEN} are not integers") from None
    return ExportInfo(path, model, step, images_seen)


def _some(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
