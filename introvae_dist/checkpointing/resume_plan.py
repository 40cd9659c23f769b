"""Where a run starts: its run folder, and the checkpoint it resumes from.

All checks that need no process group run in :func:`plan_resume`, before any engine starts:
the run folder is writable, an explicit ``run.resume`` path exists and is a checkpoint, and
the config does not change the networks. The checksums of the candidates are read afterwards,
split over the ranks (:meth:`introvae_dist.checkpointing.checkpointer.Checkpointer.start`), newest first, and the
first that matches its manifest is the one resumed.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from introvae_dist.checkpointing.layout import (
    CHECKPOINTS_DIR, MANIFEST_NAME, CheckpointError, parse_step, read_trainer_state, survey,
)
from introvae_dist.config import ConfigError


@dataclass(frozen=True)
class ResumePlan:
    """The run folder and the checkpoints a resume may start from, newest first."""

    run_dir: Path
    #: Step folders with a manifest, newest first; empty for a fresh start.
    candidates: tuple[Path, ...] = ()
    #: True when run.resume named one step folder: no falling back to an older one.
    explicit_step: bool = False
    #: Config changes accepted for the newest candidate (logged at start).
    accepted_changes: tuple[str, ...] = ()
    #: Warnings to log at start (incomplete checkpoints, foreign files).
    warnings: tuple[str, ...] = field(default_factory=tuple)


def check_writable(folder: Path, key: str) -> None:
    """Raise ConfigError unless files can be created in ``folder`` (or its nearest existing
    parent). A real probe file, because for root ``os.access`` says yes to read-only mounts."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is a file, expected a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".introvae-write-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot write into {existing} ({e.strerror}); the run folder must be writable") from None


def plan_resume(run_dir: Path, resume: str, current_config: dict[str, Any]) -> ResumePlan:
    """Check the run folder and find the checkpoints to resume from; raise ConfigError with the
    reason before any work starts. Reads no checksums (that is split over ranks later)."""
    check_writable(run_dir, f"run.root/run.name ({run_dir})")
    ckpt_dir = run_dir / CHECKPOINTS_DIR
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise ConfigError(f"{ckpt_dir} is a file; the run folder's checkpoints/ must be a folder (move the file away)")
    if ckpt_dir.is_dir():
        check_writable(ckpt_dir, f"checkpoints folder {ckpt_dir}")
    own = survey(ckpt_dir)
    warnings = [f"ignoring {p}: not a checkpoint this trainer wrote (left as it is)" for p in own.foreign]
    warnings += [f"ignoring incomplete checkpoint {p} (no {MANIFEST_NAME}: its save did not finish)" for p in own.incomplete]

    explicit_step = False
    if resume == "auto":
        candidates = [folder for _, folder in own.with_manifest]
    else:
        candidates, explicit_step = _explicit_candidates(Path(resume))
        _refuse_mixing_runs(Path(resume), candidates, own.with_manifest, run_dir)
    if not candidates:
        return ResumePlan(run_dir, warnings=tuple(warnings))
    try:
        changes = check_config(candidates[0], current_config)
    except ConfigError as e:
        raise ConfigError(f"{e}{_older_match_hint(candidates, current_config)}") from None
    return ResumePlan(run_dir, tuple(candidates), explicit_step, tuple(changes), tuple(warnings))


def _older_match_hint(candidates: list[Path], current_config: dict[str, Any]) -> str:
    """When the newest checkpoint holds another config, name the newest older one that fits
    this config and the folders to move away to resume from it (a run is never resumed from
    behind the user's back, nor are their checkpoints deleted)."""
    for i, folder in enumerate(candidates[1:], start=1):
        try:
            check_config(folder, current_config)
        except ConfigError:
            continue
        newer = ", ".join(str(p) for p in candidates[:i])
        return (f". {folder} fits this config: to resume from it, move {newer} out of {folder.parent} "
                "and run again")
    return ""


def check_config(folder: Path, current_config: dict[str, Any]) -> list[str]:
    """The accepted config changes against ``folder``'s; ConfigError listing refused ones."""
    try:
        saved = read_trainer_state(folder)["config"]
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    changes = config_changes(saved, current_config)
    if changes.refused:
        raise ConfigError(
            f"cannot resume from {folder}: the config changes the networks or their engines' saved layout: "
            + "; ".join(changes.refused)
            + ". Resume with the checkpoint's values, or start a new run (another run.name)"
        )
    return changes.accepted


def _explicit_candidates(path: Path) -> tuple[list[Path], bool]:
    if not path.exists():
        raise ConfigError(f"run.resume={path}: no such file or folder")
    if path.is_dir() and parse_step(path.name) is not None:
        if not (path / MANIFEST_NAME).is_file():
            raise ConfigError(f"run.resume={path}: incomplete checkpoint (no {MANIFEST_NAME}; its save did not finish)")
        return [path], True
    ckpt_dir = path if path.name == CHECKPOINTS_DIR else path / CHECKPOINTS_DIR
    found = survey(ckpt_dir).with_manifest if ckpt_dir.is_dir() else []
    if not found:
        raise ConfigError(f"run.resume={path}: not a checkpoint (a step_NNNNNNNN folder with {MANIFEST_NAME}) "
                          f"nor a run folder holding complete checkpoints in {CHECKPOINTS_DIR}/")
    return [folder for _, folder in found], False


def _refuse_mixing_runs(resume: Path, candidates: list[Path], own: list[tuple[int, Path]], run_dir: Path) -> None:
    """An explicit resume must not write into a run folder whose checkpoints it would overwrite
    or whose retention would delete them."""
    if not own:
        return
    newest_own = own[0][0]
    resume_step = parse_step(candidates[0].name) or 0
    inside = resume.resolve().is_relative_to(run_dir.resolve())
    if not inside or resume_step < newest_own:
        raise ConfigError(
            f"run.resume={resume}: the run folder {run_dir} already holds checkpoints up to step {newest_own}; "
            "resuming another or an older checkpoint into it would overwrite or delete them. "
            "Give the resumed run its own folder (run.name=...)"
        )


# -- config changes on resume -----------------------------------------------------------------

#: Keys whose change alters the networks or the layout of the engines' saved state; a resume
#: that changes one is refused. Everything else (learning rates, intervals, logging, data,
#: loss weights, length) is accepted and logged.
NETWORK_KEYS = ("model.", "encoder.zero_stage", "encoder.precision", "generator.zero_stage", "generator.precision")
#: Under NETWORK_KEYS, but only choose what the backward recomputes: the weights are the same.
RECOMPUTE_KEYS = ("model.checkpoint_blocks", "model.checkpoint_min_side_px")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


@dataclass(frozen=True)
class ConfigChanges:
    refused: list[str]
    accepted: list[str]


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> ConfigChanges:
    """Differences between a checkpoint's config and the current one, as ``key: old -> new``."""
    old, new = flatten(saved), flatten(current)
    refused, accepted = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") == new.get(key, "<absent>"):
            continue
        line = f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
        (refused if key.startswith(NETWORK_KEYS) and key not in RECOMPUTE_KEYS else accepted).append(line)
    return ConfigChanges(refused, accepted)
