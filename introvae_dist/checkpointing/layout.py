"""Checkpoint folders on disk: layout, checksum manifest, the `latest` pointer, discovery and
retention.

Layout of a run folder's ``checkpoints/``::

    latest                      name of the newest complete step folder (atomic replace)
    step_00000400/
        encoder/ds/...          DeepSpeed sharded checkpoint of E (its own folder: two
        generator/ds/...        engines in one folder overwrite each other, FIELD-NOTES)
        ranks/rank_00000.pt     per-rank state: RNGs, data stream position, BN buffers
        ema.pt                  the weights' moving average, whole fp32 (when ema is on)
        trainer_state.json      step, images seen, phase, world size, config, versions
        MANIFEST.json           size and sha256 of every file above; written last
    universal/step_00000400/    DeepSpeed universal conversions, made on a world-size change

A step folder is complete only when ``MANIFEST.json`` exists and every file matches it: the
manifest is written after every rank has finished writing, so a kill at any point before
leaves a folder without one, which resume skips. DeepSpeed's own ``latest`` files inside
``encoder/`` and ``generator/`` are never read (they are written before its final barrier,
without fsync or rename); loading always names the tag.

No DeepSpeed or torch here: this module only reads and writes files, so it is tested alone
and the export command can use it without starting an engine.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from introvae_dist.files import fsync_dir, sha256_of_file, write_json_atomic, write_text_atomic

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "introvae-dist-checkpoint/1"
#: What marked a complete checkpoint before the manifest existed (the export still reads it).
LEGACY_COMPLETE_NAME = "COMPLETE"
LATEST_NAME = "latest"
TRAINER_STATE_NAME = "trainer_state.json"
#: The weights' moving average (introvae_dist.ema), whole fp32 tensors, written by rank 0.
EMA_NAME = "ema.pt"
RANKS_DIR = "ranks"
UNIVERSAL_DIR = "universal"
#: Sub-folder of each engine and the DeepSpeed tag inside it.
ENGINE_DIRS = ("encoder", "generator")
ENGINE_TAG = "ds"

_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint or run folder is missing, incomplete, damaged or not ours."""


def step_folder_name(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    """``step_00000400`` -> 400; None for any other name."""
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def rank_state_path(folder: Path, rank: int) -> Path:
    return folder / RANKS_DIR / f"rank_{rank:05d}.pt"


# -- the manifest -----------------------------------------------------------------------------


def list_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a sorted relative POSIX path, except the manifest."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST_NAME)


def describe_files(folder: Path, relpaths: list[str]) -> dict[str, dict[str, Any]]:
    """``{relpath: {"bytes", "sha256"}}`` for the given files (one rank's share of a folder)."""
    return {rel: {"bytes": (folder / rel).stat().st_size, "sha256": sha256_of_file(folder / rel)} for rel in relpaths}


def write_manifest(folder: Path, step: int, files: dict[str, dict[str, Any]]) -> None:
    """Write ``MANIFEST.json`` last: from here on the folder counts as a complete checkpoint."""
    fsync_dir(folder)
    write_json_atomic(folder / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "step": step, "files": files})


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest; raises CheckpointError when it is absent or not ours."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST_NAME}, so the save did not finish (incomplete checkpoint)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: not an introvae-dist checkpoint manifest (expected format {MANIFEST_FORMAT!r})")
    return manifest


def check_files(folder: Path, manifest: dict[str, Any], relpaths: list[str], check: str = "sha256") -> list[str]:
    """Problems of the given manifest entries (one rank's share): missing, wrong size, wrong sha256."""
    problems = []
    for rel in relpaths:
        entry, path = manifest["files"][rel], folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif (size := path.stat().st_size) != entry["bytes"]:
            problems.append(f"{rel} has {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        elif check == "sha256" and sha256_of_file(path) != entry["sha256"]:
            problems.append(f"{rel} does not match its sha256 in the manifest")
    return problems


def read_trainer_state(folder: Path) -> dict[str, Any]:
    path = folder / TRAINER_STATE_NAME
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {TRAINER_STATE_NAME}; not an introvae-dist checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable: {e}") from None
    if not isinstance(state, dict) or not {"step", "images_seen", "config", "world_size"} <= set(state):
        raise CheckpointError(f"{path}: expected step, images_seen, world_size and config; not an introvae-dist checkpoint")
    return state


# -- the latest pointer -----------------------------------------------------------------------


def write_latest(checkpoints_dir: Path, folder_name: str) -> None:
    """Point ``latest`` at a complete step folder (temp file, fsync, rename)."""
    write_text_atomic(checkpoints_dir / LATEST_NAME, folder_name + "\n")


def read_latest(checkpoints_dir: Path) -> str | None:
    try:
        return (checkpoints_dir / LATEST_NAME).read_text().strip() or None
    except OSError:
        return None


# -- discovery --------------------------------------------------------------------------------


@dataclass
class Survey:
    """What a ``checkpoints/`` folder holds, before any checksum is read."""

    #: (step, folder) of step folders with a manifest, newest first (checksums not yet checked).
    with_manifest: list[tuple[int, Path]] = field(default_factory=list)
    #: Step folders without a manifest: saves that never finished.
    incomplete: list[Path] = field(default_factory=list)
    #: Step folders renamed ``step_N.set-aside-TIME`` (damaged, or in the way of a save), oldest first.
    set_aside: list[Path] = field(default_factory=list)
    #: Anything else: left alone, named in a warning.
    foreign: list[Path] = field(default_factory=list)


_OWN_NAMES = {LATEST_NAME, UNIVERSAL_DIR, LATEST_NAME + ".tmp"}


def survey(checkpoints_dir: Path) -> Survey:
    result = Survey()
    if not checkpoints_dir.is_dir():
        return result
    for path in sorted(checkpoints_dir.iterdir()):
        step = parse_step(path.name)
        if step is not None and path.is_dir():
            if (path / MANIFEST_NAME).is_file():
                result.with_manifest.append((step, path))
            else:
                result.incomplete.append(path)
        elif _set_aside_time(path.name) is not None and path.is_dir():
            result.set_aside.append(path)
        elif path.name not in _OWN_NAMES:
            result.foreign.append(path)
    result.with_manifest.sort(key=lambda item: item[0], reverse=True)
    result.set_aside.sort(key=lambda p: (_set_aside_time(p.name), p.name))
    return result


_SET_ASIDE = ".set-aside-"


def _set_aside_time(name: str) -> int | None:
    """The time (s since the epoch) in a name ``step_N.set-aside-TIME``, or None."""
    step, sep, when = name.partition(_SET_ASIDE)
    return int(when) if sep and parse_step(step) is not None and when.isdigit() else None


def set_aside(path: Path) -> Path:
    """Rename ``path`` out of the way instead of deleting it (nothing a user made is lost)."""
    target = path.with_name(f"{path.name}{_SET_ASIDE}{int(time.time())}")
    path.rename(target)
    fsync_dir(path.parent)
    return target


# -- retention --------------------------------------------------------------------------------


def retention_victims(steps: list[int], keep_last: int, keep_every_steps: int, protected: set[int]) -> list[int]:
    """Steps of complete checkpoints to delete: all but the newest ``keep_last``, the multiples
    of ``keep_every_steps`` (permanent) and the ``protected`` ones (the one resumed from)."""
    newest = sorted(steps, reverse=True)[:keep_last]
    keep = set(newest) | protected | {s for s in steps if keep_every_steps and s % keep_every_steps == 0}
    return sorted(s for s in steps if s not in keep)


def set_aside_victims(set_aside: list[Path], keep: int) -> list[Path]:
    """Set-aside folders (oldest first, as `survey` lists them) beyond the newest ``keep``."""
    return set_aside[:max(len(set_aside) - keep, 0)]


def delete_checkpoint(folder: Path) -> None:
    """Delete a complete checkpoint: the manifest goes first, so a kill midway leaves an
    incomplete folder that resume skips, never a damaged one that claims to be complete."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    fsync_dir(folder)
    shutil.rmtree(folder)
