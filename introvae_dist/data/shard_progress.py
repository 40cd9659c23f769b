"""What a shard job has finished, kept on disk so an interrupted job resumes where it stopped.

While a job runs, ``NAME.progress.json`` in the output folder holds the job's identity
(``name``, ``source``, ``params``) and one entry per finished shard (file, counts, bytes,
sha256, the skipped images, and its resolution). The main process rewrites it atomically
after every finished shard and once before the first one, so the folder is marked as this
job's before any shard lands in it. When the job completes, ``manifest.json`` is written and
the progress file is removed: a complete folder holds shards and manifest only, and the
manifest carries everything a resume needs (its ``skipped`` entries have the source index,
which says which shard each one belongs to).

A shard entry is trusted only while its file exists with the recorded size; anything else
is rewritten. A folder whose records name another job (different name, source or params),
or that holds ``NAME-*.tar`` files no record explains, is refused: nothing a user made is
ever deleted or overwritten.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from introvae_dist.data.shard_writer import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SHARD_PATTERN,
    ShardInputError,
    build_manifest,
    write_json_atomic,
)

PROGRESS_FORMAT = "introvae-dist-shards-progress/1"
_SHARD_GLOB = "{name}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"


@dataclass
class JobRecord:
    """Identity of one shard job plus the shards it has finished, keyed by shard index."""

    out_dir: Path
    name: str
    source: dict[str, Any]
    params: dict[str, Any]
    num_shards: int
    done: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def progress_path(self) -> Path:
        return self.out_dir / f"{self.name}.progress.json"

    def shard_path(self, index: int) -> Path:
        return self.out_dir / SHARD_PATTERN.format(name=self.name, index=index)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "params": self.params}

    def save_progress(self) -> None:
        """Atomically rewrite the progress file from the current ``done`` entries."""
        write_json_atomic(self.progress_path, {
            "format": PROGRESS_FORMAT,
            **self.identity(),
            "num_shards": self.num_shards,
            "done": {str(index): entry for index, entry in sorted(self.done.items())},
        })

    def load_existing(self) -> None:
        """Fill ``done`` from the progress file and manifest of an earlier run of this job.

        Raises:
            ShardInputError: the folder holds records of another job, unreadable records, or
                shard files without any record.
        """
        manifest_path = self.out_dir / MANIFEST_NAME
        found: dict[int, dict[str, Any]] = {}
        if manifest_path.exists():
            manifest = self._read_record(manifest_path, MANIFEST_FORMAT)
            found.update(self._entries_from_manifest(manifest))
        if self.progress_path.exists():
            progress = self._read_record(self.progress_path, PROGRESS_FORMAT)
            found.update({int(index): entry for index, entry in progress.get("done", {}).items()})
        elif not manifest_path.exists():
            unexplained = sorted(self.out_dir.glob(_SHARD_GLOB.format(name=self.name)))
            if unexplained:
                raise ShardInputError(
                    f"--out {self.out_dir} already holds {len(unexplained)} {self.name}-*.tar file(s) "
                    f"(first: {unexplained[0].name}) but no {self.progress_path.name} or {MANIFEST_NAME} "
                    f"saying how they were made; refusing to overwrite them: use another --out or --name"
                )
        self.done = {
            index: entry for index, entry in found.items()
            if index < self.num_shards and _file_has_size(self.shard_path(index), entry.get("num_bytes"))
        }

    def manifest(self) -> dict[str, Any]:
        """The ``manifest.json`` object of the finished job (every shard must be done)."""
        entries = [self.done[index] for index in range(self.num_shards)]
        skipped = sorted((item for entry in entries for item in entry["skipped"]), key=lambda s: s["index"])
        sides = {entry["resolution_px"] for entry in entries if entry["num_samples"] > 0}
        resolution_px = sides.pop() if len(sides) == 1 else None
        return build_manifest(self.name, self.source, resolution_px, self.params, entries, skipped)

    def manifest_is_current(self) -> bool:
        """True when ``manifest.json`` already describes this finished job."""
        manifest_path = self.out_dir / MANIFEST_NAME
        try:
            return json.loads(manifest_path.read_text()) == self.manifest()
        except (OSError, json.JSONDecodeError, KeyError):
            return False

    def _read_record(self, path: Path, expected_format: str) -> dict[str, Any]:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ShardInputError(
                f"cannot read {path} ({exc}); refusing to write shards next to it: use another --out"
            ) from exc
        recorded = {"format": record.get("format") if isinstance(record, dict) else None}
        if isinstance(record, dict):
            recorded.update({key: record.get(key) for key in ("name", "source", "params")})
        differences = _differences(recorded, {"format": expected_format, **self.identity()})
        if differences:
            raise ShardInputError(
                f"--out {self.out_dir} holds shards made differently ({path.name}: "
                f"{'; '.join(differences)}); refusing to mix or overwrite them: use another --out, "
                f"or re-run with the recorded parameters"
            )
        return record

    def _entries_from_manifest(self, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
        samples_per_shard = int(self.params["samples_per_shard"])
        entries: dict[int, dict[str, Any]] = {}
        skipped = manifest.get("skipped", [])
        for index, shard in enumerate(manifest.get("shards", [])):
            entries[index] = {
                **shard,
                "skipped": [item for item in skipped if item["index"] // samples_per_shard == index],
                # The manifest keeps one resolution for all shards: if it is set, every
                # non-empty shard has it; if it is None, None is the safe per-shard answer.
                "resolution_px": manifest.get("resolution_px"),
            }
        return entries


def lock_output_dir(out_dir: Path) -> int:
    """Take an exclusive lock on ``out_dir`` for this process; returns the fd to close later.

    The lock lets a run delete stale ``.tmp`` files safely (no other run is writing them), and
    the kernel drops it when the process dies, even by ``kill -9``.

    Raises:
        ShardInputError: another run holds the lock.
    """
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ShardInputError(
            f"another `introvae-dist shards` run is writing into --out {out_dir}; "
            f"wait for it or use another --out"
        ) from None
    return fd


def remove_stale_tmp_files(out_dir: Path, name: str) -> list[Path]:
    """Delete ``.tmp`` files a killed run of job ``name`` left behind; call under the lock."""
    stale = [
        *out_dir.glob(_SHARD_GLOB.format(name=name) + ".tmp"),
        *(out_dir / f"{file}.tmp" for file in (f"{name}.progress.json", MANIFEST_NAME)),
    ]
    removed = [path for path in stale if path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _file_has_size(path: Path, num_bytes: Any) -> bool:
    try:
        return isinstance(num_bytes, int) and path.stat().st_size == num_bytes
    except OSError:
        return False


def _differences(recorded: Any, wanted: Any, prefix: str = "") -> list[str]:
    """``"key.sub: X recorded, Y now"`` for every leaf where two JSON-like values differ."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        return [
            line
            for key in sorted(set(recorded) | set(wanted))
            for line in _differences(recorded.get(key), wanted.get(key), f"{prefix}{key}.")
        ]
    if recorded == wanted:
        return []
    return [f"{prefix.rstrip('.')}: {json.dumps(recorded)} recorded, {json.dumps(wanted)} now"]
