"""Where a run starts: its run folder, and the checkpoint it resumes from.

All checks that need no process group run in :func:`plan_resume`, before any engine starts:
the run folder is writable, an explicit ``run.resume`` path exists and is a checkpoint, and
the config does not change the networks. The checksums of the candidates are read afterwards,
split over the ranks (:func:`introvae_dist.trainer.select_checkpoint`), newest first, and the
first that matches its manifest is the one resumed.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from introvae_dist.checkpoint import (
    CHECKPOINTS_DIR, MANIFEST_NAME, CheckpointError, config_changes, parse_step, read_trainer_state, survey,
)
from introvae_dist.config import ConfigError
from introvae_dist.files import write_text_atomic

#: The run folder's per-step logs; both are cut back to the resumed step on a resume.
METRICS_NAME = "metrics.jsonl"
EVAL_LOG_NAME = "eval.jsonl"
STEP_LOGS = (METRICS_NAME, EVAL_LOG_NAME)


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


LOCK_NAME = ".lock"


def lock_run_dir(run_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the run folder for the life of the returned file (rank 0).

    Two jobs training into one folder (a job started twice, a requeue while the old one
    still runs) would overwrite each other's checkpoints: the second is refused, naming the
    first. The lock is released by the kernel when the process ends, however it ends.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / LOCK_NAME).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{run_dir} is in use by {holder}; two jobs must not train into one run folder "
                          "(wait for it to end, or set another run.name)") from None
    handle.seek(0), handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def trim_metrics(run_dir: Path, step: int, name: str = METRICS_NAME) -> int:
    """Keep a per-step JSONL log (metrics.jsonl, eval.jsonl) up to ``step`` (the resumed one) so
    it has no gap and no repeated step; the records after it (from steps that are redone) move
    to NAME.discarded.jsonl. Returns how many were moved."""
    path = run_dir / name
    if not path.is_file():
        return 0
    kept, moved = [], []
    for line in path.read_text().splitlines():
        try:
            later = json.loads(line).get("step", 0) > step
        except ValueError:
            later = True  # a line cut off by the kill
        (moved if later else kept).append(line)
    if moved:
        with (run_dir / name.replace(".jsonl", ".discarded.jsonl")).open("a") as f:
            f.write("\n".join(moved) + "\n")
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return len(moved)
