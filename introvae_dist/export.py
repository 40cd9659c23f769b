"""A training checkpoint -> one safetensors file of fp32 weights for inference (``introvae-dist export``).

Reads ``RUN/checkpoints/step_NNNNNNNN/`` as :class:`introvae_dist.checkpointing.checkpointer.Checkpointer` writes it:
``encoder/`` and ``generator/`` (each a DeepSpeed ``save_checkpoint(..., tag="ds")`` folder, any
ZeRO stage, any number of ranks, bf16 or fp32), ``trainer_state.json`` (step, images_seen, the
run config) and the marker that the save finished. Writes the layout that
:mod:`introvae_dist.weights` documents and reads back.

The weights are consolidated by DeepSpeed's own ``zero_to_fp32`` (stages 1-3), which takes the
fp32 master weights from the optimizer partitions of every rank, so a bf16 run exports its fp32
masters, not the bf16 copies. Buffers (BatchNorm running statistics) are those of rank 0: ranks
do not synchronise them, rank 0 is the only rank whose buffers a ZeRO-1/2 checkpoint holds, and
rank 0's are the ones the trainer's sample grids were drawn with. DeepSpeed's tool does not read
ZeRO stage 0 checkpoints (no optimizer partitions); :func:`_stage0_state` covers them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from introvae_dist.checkpointing.layout import (
    EMA_NAME,
    ENGINE_DIRS,
    ENGINE_TAG,
    LEGACY_COMPLETE_NAME,
    MANIFEST_NAME,
    TRAINER_STATE_NAME,
    CheckpointError,
    check_files,
    read_manifest,
)
from introvae_dist.config import ConfigError, ModelConfig
from introvae_dist.files import write_atomic
from introvae_dist.models import build_networks
from introvae_dist.state_dict_check import state_dict_problems
from introvae_dist.weights import (
    FORMAT,
    META_FORMAT,
    META_IMAGES_SEEN,
    META_SHA256,
    META_MODEL,
    META_STEP,
    EMA_PREFIXES,
    META_EMA,
    PREFIXES,
    ema_to_json,
    exported_model,
    model_to_json,
    tensors_sha256,
)

#: Markers that a checkpoint is complete: the manifest, or the marker of older runs.
COMPLETE_MARKERS = (MANIFEST_NAME, LEGACY_COMPLETE_NAME)


class ExportError(ValueError):
    """The checkpoint or the output path is not usable; the message names the path.

    The command line turns it into one line on stderr and exit status 2.
    """


def check_checkpoint_complete(step_folder: Path) -> None:
    """Raise ExportError unless the save of `step_folder` finished on every rank.

    The trainer writes its marker last, after all ranks wrote their files.
    """
    if not any((step_folder / marker).is_file() for marker in COMPLETE_MARKERS):
        raise ExportError(
            f"{step_folder}: incomplete checkpoint (no {' or '.join(COMPLETE_MARKERS)}): its save was "
            f"interrupted or is still running; export an earlier step_* folder"
        )
    if (step_folder / MANIFEST_NAME).is_file():
        # Sizes only: a truncated or missing shard is the common damage, and the full sha256
        # is for resume, which must be sure; the export then reads every byte anyway.
        try:
            manifest = read_manifest(step_folder)
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        problems = check_files(step_folder, manifest, sorted(manifest["files"]), check="size")
        if problems:
            raise ExportError(f"{step_folder}: damaged checkpoint: " + "; ".join(problems[:5]))


def export_checkpoint(step_folder: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Write E's and G's consolidated fp32 weights and the model config of `step_folder` into
    the safetensors file `out`; returns `out`.

    The file appears under its name only once complete (written as a temporary file in the
    same folder, then renamed); on any failure nothing is left behind.

    Raises:
        ExportError: `step_folder` is missing, not a checkpoint, incomplete or damaged; `out`
            exists (without `overwrite`), is a folder, or its folder cannot be written.
        OSError: writing `out` failed (e.g. the disk is full).
    """
    step_folder, out = Path(step_folder), Path(out)
    state = read_checkpoint(step_folder)
    model = state["model"]
    _check_output(out, overwrite)
    tmp = _reserve_temp(out)
    try:
        tensors: dict[str, torch.Tensor] = {}
        raw = consolidated_networks(step_folder, model)
        for net_name, net_state in raw.items():
            tensors.update({PREFIXES[net_name] + name: _fp32_copy(t) for name, t in net_state.items()})
        averaged = ema_networks(step_folder, raw)
        for net_name, net_state in averaged.items():
            tensors.update({EMA_PREFIXES[net_name] + name: _fp32_copy(t) for name, t in net_state.items()})
        metadata = {
            META_FORMAT: FORMAT,
            META_MODEL: model_to_json(model),
            META_STEP: str(state["step"]),
            META_IMAGES_SEEN: str(state["images_seen"]),
            META_SHA256: tensors_sha256(tensors),
        }
        if averaged:
            metadata[META_EMA] = ema_to_json(tuple(averaged), state["ema"] or {})
        from safetensors.torch import save

        data = save(tensors, metadata=metadata)  # not save_file: it creates files with mode 0600
        del tensors
        write_atomic(out, lambda stream: stream.write(data), tmp=tmp)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_checkpoint(step_folder: Path) -> dict[str, Any]:
    """Check that `step_folder` is a complete checkpoint; return its step, images_seen and
    model section (a :class:`ModelConfig` as the exported file will record it,
    :func:`introvae_dist.weights.exported_model`)."""
    if not step_folder.exists():
        raise ExportError(f"{step_folder}: no such checkpoint folder")
    if not step_folder.is_dir():
        raise ExportError(f"{step_folder}: not a checkpoint folder (expected RUN/checkpoints/step_NNNNNNNN/)")
    parts = [step_folder / name for name in (*ENGINE_DIRS, TRAINER_STATE_NAME, *COMPLETE_MARKERS)]
    if not any(p.exists() for p in parts):
        raise ExportError(f"{step_folder}: not a checkpoint folder (no {'/, '.join(ENGINE_DIRS)}/ or {TRAINER_STATE_NAME})"
                          + _checkpoint_hint(step_folder))
    check_checkpoint_complete(step_folder)
    for net in ENGINE_DIRS:
        if not (step_folder / net / ENGINE_TAG).is_dir():
            raise ExportError(f"{step_folder / net / ENGINE_TAG}: missing; the checkpoint is damaged")
    state_path = step_folder / TRAINER_STATE_NAME
    try:
        state = json.loads(state_path.read_text())
        step, images_seen, model_section = int(state["step"]), int(state["images_seen"]), state["config"]["model"]
        ema_section = state["config"].get("ema")
    except FileNotFoundError:
        raise ExportError(f"{state_path}: missing; the checkpoint is damaged") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{state_path}: unreadable or without step/images_seen/config.model ({e!r})") from None
    return {"step": step, "images_seen": images_seen, "model": _model_config(model_section, state_path),
            "ema": ema_section}


def consolidated_networks(step_folder: Path, model: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """``{"encoder": state, "generator": state}`` of a checked checkpoint (:func:`read_checkpoint`):
    each network's whole state dict (fp32 master weights, rank 0's buffers), checked against
    ``model``. Used by the export and by the inference commands, which need no engine."""
    networks = {}
    for net_name, expected in zip(ENGINE_DIRS, _expected_shapes(model)):
        net_state = consolidate(step_folder / net_name)
        _check_fits(net_state, expected, step_folder / net_name / ENGINE_TAG, net_name)
        networks[net_name] = net_state
    return networks


def ema_networks(step_folder: Path, raw: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Each averaged network's whole state dict: the moving average's weights (``ema.pt``,
    introvae_dist.ema) with the buffers of ``raw`` (:func:`consolidated_networks`), as the EMA
    networks of training use the live buffers; {} for a checkpoint without ``ema.pt``."""
    path = step_folder / EMA_NAME
    if not path.is_file():
        return {}
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file: torch raises several kinds
        raise ExportError(f"{path}: cannot read the moving average ({type(e).__name__}: {e})") from None
    out = {}
    for net in ENGINE_DIRS:
        if net not in saved:
            continue
        weights = saved[net]
        bad = [k for k, v in weights.items() if k not in raw[net] or raw[net][k].shape != v.shape]
        if bad or not weights:
            raise ExportError(f"{path}: the {net} average does not fit the network: {', '.join(bad[:5]) or 'empty'}")
        out[net] = {**raw[net], **weights}
    return out


def consolidate(net_folder: Path) -> dict[str, torch.Tensor]:
    """One network's whole state dict (parameters in fp32, buffers) from its DeepSpeed folder
    ``net_folder/ds``, written by any number of ranks at any ZeRO stage."""
    ds_folder = net_folder / ENGINE_TAG
    zero_to_fp32 = _import_zero_to_fp32()  # outside _quiet(): DeepSpeed's logger keeps the stdout it finds
    try:
        with _quiet():
            if any(ds_folder.glob("*optim_states.pt")):  # ZeRO 1-3: one file per rank
                state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(net_folder), tag=ENGINE_TAG)
            else:
                state = _stage0_state(ds_folder)
    except ExportError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # anything DeepSpeed or torch.load raise on a damaged checkpoint
        message = " ".join(str(e).split())
        raise ExportError(f"{ds_folder}: cannot read the weights ({type(e).__name__}: {message})") from None
    return dict(state)


# --- helpers ---------------------------------------------------------------------------------

def _stage0_state(ds_folder: Path) -> dict[str, torch.Tensor]:
    """ZeRO stage 0: rank 0's ``mp_rank_00_model_states.pt`` holds the module and the optimizer.

    fp32 training: the module's weights are the weights. bf16 training: the fp32 masters are
    the optimizer's ``fp32_groups`` (a list of tensors per group, DeepSpeed's unfused bf16/fp16
    optimizer) or ``fp32_groups_flat`` (one flat tensor per group, the fused one), in the order
    of ``module.parameters()``; each is checked against the module's bf16 copy.
    """
    path = ds_folder / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise ExportError(f"{ds_folder}: no *_optim_states.pt and no mp_rank_00_model_states.pt; the checkpoint "
                          f"is damaged")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    stage = (saved.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if stage:
        raise ExportError(f"{ds_folder}: a ZeRO stage {stage} checkpoint without its *_optim_states.pt files; "
                          f"the checkpoint is damaged")
    module: dict[str, torch.Tensor] = saved["module"]
    buffers = set(saved.get("buffer_names") or ())
    params = [name for name in module if name not in buffers]
    if all(module[name].dtype == torch.float32 for name in params):
        return dict(module)
    optimizer = saved.get("optimizer") or {}
    if "fp32_groups" in optimizer:
        masters = [t for group in optimizer["fp32_groups"] for t in group]
    elif "fp32_groups_flat" in optimizer:
        masters = list(torch.cat([g.flatten() for g in optimizer["fp32_groups_flat"]]).split(
            [module[name].numel() for name in params]))
    else:
        raise ExportError(f"{path}: {module[params[0]].dtype} weights without fp32 master weights in the optimizer "
                          f"state (keys: {sorted(optimizer)})")
    if len(masters) != len(params):
        raise ExportError(f"{path}: {len(masters)} fp32 master tensors for {len(params)} parameters")
    state = dict(module)
    for name, master in zip(params, masters):
        weight = module[name]
        master = master.reshape(weight.shape) if master.numel() == weight.numel() else master
        if master.shape != weight.shape or not torch.equal(master.to(weight.dtype), weight):
            raise ExportError(f"{path}: the fp32 master weight of {name} does not match its {weight.dtype} copy")
        state[name] = master
    return state


def _model_config(section: Any, source: Path) -> ModelConfig:
    """The run's model section, validated as the trainer does (on construction), widths resolved."""
    try:
        model = ModelConfig(**section)
        if model.norm not in ("batch", "group", "none"):
            raise ConfigError(f"model.norm={model.norm!r}")
        return exported_model(model)
    except (TypeError, ConfigError, ValueError) as e:
        raise ExportError(f"{source}: config.model is not a valid model section ({e})") from None


def _checkpoint_hint(folder: Path) -> str:
    """For a run folder or its checkpoints/ folder: name the newest checkpoint inside."""
    steps = sorted(p for base in (folder, folder / "checkpoints") for p in base.glob("step_*") if p.is_dir())
    complete = [p for p in steps if any((p / marker).is_file() for marker in COMPLETE_MARKERS)]
    return f"; pass one step folder, e.g. {(complete or steps)[-1]}" if steps else ""


def _expected_shapes(model: ModelConfig) -> list[dict[str, tuple[int, ...]]]:
    """Name -> shape of every tensor in each network's state dict (built on the meta device)."""
    return [{name: tuple(t.shape) for name, t in net.state_dict().items()} for net in build_networks(model, "meta")]


def _check_fits(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: Path, net: str) -> None:
    problems = state_dict_problems(expected, state)
    if problems:
        raise ExportError(f"{source}: the {net} weights do not fit the model in {TRAINER_STATE_NAME} "
                          f"({'; '.join(problems)})")


def _fp32_copy(t: torch.Tensor) -> torch.Tensor:
    """An own, contiguous copy (ZeRO-1/2 tensors are views of one flat buffer, which safetensors
    refuses), floating point in fp32, integers (num_batches_tracked) as they are."""
    t = t.detach().to("cpu")
    return (t.float() if t.is_floating_point() else t).clone().contiguous()


def _check_output(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; give a file path such as {out / 'weights.safetensors'}")
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; pass --overwrite to replace it")


def _reserve_temp(out: Path) -> Path:
    """Create the temporary file next to `out` now: proves the folder is writable before the
    (long) consolidation starts."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.open("xb").close()  # not mkstemp: its mode 0600 would stick to the output
    except OSError as e:
        raise ExportError(f"{out.parent}: cannot write the output there ({e.strerror or e})") from None
    return tmp


def _import_zero_to_fp32() -> Any:
    """``deepspeed.utils.zero_to_fp32``, without the accelerator warning DeepSpeed's import logs."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        from deepspeed.utils import zero_to_fp32
    finally:
        logging.disable(previous)
    return zero_to_fp32


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow zero_to_fp32's prints and progress bars (it reports to stdout and stderr)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
