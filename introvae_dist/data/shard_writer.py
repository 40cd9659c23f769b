"""Write samples into WebDataset tar shards plus a ``manifest.json`` that describes them.

Layout written into ``out_dir``::

    NAME-000000.tar, NAME-000001.tar, ...   one tar per ``samples_per_shard`` samples
    manifest.json                           see :func:`build_manifest` for the schema

Every file is written under a temporary name and moved into place with ``os.replace``, so a
crash or a kill never leaves a half-written file under a final name; a reader that sees
``NAME-000003.tar`` or ``manifest.json`` sees a complete one.

This module is torch-free on purpose (it writes tars with :mod:`tarfile`, not webdataset's
``TarWriter``, whose import pulls in torch): the parallel shard writers start one process
per worker, and each would otherwise spend a second importing torch for nothing. The tar
members are the ones ``webdataset.TarWriter(encoder=False, mtime=0)`` writes, byte for byte.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from introvae_dist.files import sha256_of_file, write_json_atomic  # noqa: F401  (re-exported)

MANIFEST_NAME = "manifest.json"
# Bump when the manifest schema changes incompatibly; readers and resumers compare it.
MANIFEST_FORMAT = "introvae-dist-shards/1"
SHARD_PATTERN = "{name}-{index:06d}.tar"

# A fixed mtime for every tar member makes the shard bytes (and so the manifest's sha256) a
# function of the samples alone: rewriting the same data gives byte-identical shards.
_TAR_MTIME_S = 0.0

# WebDataset splits "dir/key.ext" at the first dot of the basename, so a dot inside the key
# would silently regroup files into wrong samples; a slash would create tar subfolders.
_VALID_KEY = re.compile(r"^[^./]+$")
_VALID_EXT = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
SHARD_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
# Owner and mode of every tar member: webdataset's TarWriter defaults, so shards written here
# and by webdataset are interchangeable.
_TAR_USER = "bigdata"
_TAR_MODE = 0o444


class ShardInputError(ValueError):
    """Bad input to a shard writer (path, option or existing output); the message names it.

    The command line turns it into one line on stderr and exit status 2.
    """


def write_shards(
    samples: Iterable[tuple[str, bytes, str]],
    out_dir: Path,
    name: str,
    samples_per_shard: int,
    params: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    resolution_px: int | None = None,
) -> list[Path]:
    """Write ``(key, encoded_bytes, extension)`` samples into tar shards and a manifest.

    Args:
        samples: iterable of ``(key, data, ext)``, e.g. ``("00000042", png_bytes, "png")``.
            Consumed lazily, so it may be a generator over a dataset larger than memory.
            Keys must not contain ``.`` or ``/``; ``ext`` has no leading dot.
        out_dir: folder for the shards; created if missing.
        name: shard file prefix; shards are ``NAME-%06d.tar``.
        samples_per_shard: samples in every shard but possibly the last.
        params: free-form JSON-serialisable description of how the data was made, stored in
            the manifest so a later run can tell whether the shards match its request.
        source: the manifest's ``source`` record (``{"kind": ..., "path": ...}``), or None.
        resolution_px: side of every image if all are square and equal, else None.

    Returns:
        The shard paths in order.

    Raises:
        ValueError: bad arguments, a malformed sample, a duplicate key, or no samples at all.

    Existing files are only ever replaced (never deleted), except this function's own
    ``.tmp`` files. Shards of an earlier, larger run that the new manifest does not list are
    left in place with a warning; readers that go through the manifest ignore them.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be a positive integer, got {samples_per_shard}")
    if not SHARD_NAME_PATTERN.match(name):
        raise ValueError(f"shard name must match {SHARD_NAME_PATTERN.pattern}, got {name!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    shard_entries: list[dict[str, Any]] = []
    shard_paths: list[Path] = []
    seen_keys: set[str] = set()
    writer: ShardInProgress | None = None
    try:
        for key, data, ext in samples:
            _check_sample(key, data, ext, seen_keys)
            if writer is None:
                final_path = out_dir / SHARD_PATTERN.format(name=name, index=len(shard_paths))
                writer = ShardInProgress(final_path)
            writer.write(key, data, ext)
            if writer.num_samples == samples_per_shard:
                shard_entries.append(writer.finish())
                shard_paths.append(writer.final_path)
                writer = None
        if writer is not None:
            shard_entries.append(writer.finish())
            shard_paths.append(writer.final_path)
            writer = None
    finally:
        if writer is not None:
            writer.abort()

    if not shard_paths:
        raise ValueError(f"no samples were given for shards {name!r} in {out_dir}")

    manifest = build_manifest(name, source, resolution_px, params or {}, shard_entries, skipped=[])
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    _warn_about_stale_shards(out_dir, name, shard_paths)
    return shard_paths


def build_manifest(
    name: str,
    source: dict[str, Any] | None,
    resolution_px: int | None,
    params: dict[str, Any],
    shard_entries: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
) -> dict[str, Any]:
    """The ``manifest.json`` object; the one place that defines its schema.

    ``{"format", "name", "source", "resolution_px", "params", "shards": [{"file",
    "num_samples", "num_bytes", "sha256"}], "num_samples", "num_skipped", "skipped"}``, where
    ``source`` is ``{"kind", "path", ...}`` or None, ``resolution_px`` the side of every stored
    image when all are square and equal (else None), ``params`` everything that determines
    the shard bytes, and ``skipped`` the unreadable source images (``{"index", "source",
    "reason"}``) that the shards leave out.
    """
    shards = [
        {key: entry[key] for key in ("file", "num_samples", "num_bytes", "sha256")}
        for entry in shard_entries
    ]
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "source": source,
        "resolution_px": resolution_px,
        "params": params,
        "shards": shards,
        "num_samples": sum(entry["num_samples"] for entry in shards),
        "num_skipped": len(skipped),
        "skipped": skipped,
    }


def read_manifest(manifest_path: Path) -> dict[str, Any]:
    """Load a manifest written by :func:`write_shards`, checking its basic shape.

    Raises:
        ValueError: the file is not valid JSON or lacks the ``shards`` list of ``file`` names.
    """
    try:
        manifest = json.loads(Path(manifest_path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read shard manifest {manifest_path}: {exc}") from exc
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("file"), str) for entry in shards
    ):
        raise ValueError(
            f"shard manifest {manifest_path} must hold a 'shards' list of objects with a 'file' name"
        )
    return manifest


class ShardInProgress:
    """One tar shard being written to ``<final>.tmp``; ``finish`` moves it into place."""

    def __init__(self, final_path: Path) -> None:
        self.final_path = Path(final_path)
        self.tmp_path = self.final_path.with_name(self.final_path.name + ".tmp")
        self.num_samples = 0
        self._stream: BinaryIO = open(self.tmp_path, "wb")
        # "w|" streams straight to the file, as webdataset's TarWriter does.
        self._tar = tarfile.open(fileobj=self._stream, mode="w|")

    def write(self, key: str, data: bytes, ext: str, extras: Mapping[str, bytes] | None = None) -> None:
        """Add sample ``key``: ``key.ext`` holding ``data``, plus ``key.<name>`` per extra entry.

        Members are written in sorted extension order with a fixed owner, mode and mtime, so
        the tar bytes depend on the samples alone.
        """
        entries = {ext: data, **(extras or {})}
        for member_ext in sorted(entries):
            payload = bytes(entries[member_ext])
            info = tarfile.TarInfo(f"{key}.{member_ext}")
            info.size = len(payload)
            info.mtime = _TAR_MTIME_S
            info.mode = _TAR_MODE
            info.uname = info.gname = _TAR_USER
            self._tar.addfile(info, io.BytesIO(payload))
        self.num_samples += 1

    def finish(self) -> dict[str, Any]:
        """Close, fsync and rename the shard; return its manifest entry."""
        self._tar.close()
        self._stream.flush()
        # fsync before the rename: otherwise a power loss can leave the final name pointing
        # at an empty or partial file even though the rename itself was atomic.
        os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self.tmp_path, self.final_path)
        return {
            "file": self.final_path.name,
            "num_samples": self.num_samples,
            "num_bytes": self.final_path.stat().st_size,
            "sha256": sha256_of_file(self.final_path),
        }

    def abort(self) -> None:
        """Drop the partial shard after an error; the final name is never touched."""
        # Close the tar layer first: left to the garbage collector it would flush into the
        # already closed file and report an error nobody can act on.
        with contextlib.suppress(Exception):
            self._tar.close()
        self._stream.close()
        self.tmp_path.unlink(missing_ok=True)


def _check_sample(key: str, data: bytes, ext: str, seen_keys: set[str]) -> None:
    if not isinstance(key, str) or not _VALID_KEY.match(key):
        raise ValueError(f"sample key must be a non-empty string without '.' or '/', got {key!r}")
    if key in seen_keys:
        raise ValueError(f"duplicate sample key {key!r}")
    seen_keys.add(key)
    if not isinstance(ext, str) or not _VALID_EXT.match(ext):
        raise ValueError(f"sample {key!r}: extension must look like 'png' (no leading dot), got {ext!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"sample {key!r}: data must be encoded bytes, got {type(data).__name__}")


def _warn_about_stale_shards(out_dir: Path, name: str, written: list[Path]) -> None:
    written_names = {path.name for path in written}
    stale = sorted(
        path.name
        for path in out_dir.glob(f"{name}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")
        if path.name not in written_names
    )
    if stale:
        warnings.warn(
            f"{out_dir} still holds {len(stale)} shard(s) from an earlier run that "
            f"{MANIFEST_NAME} does not list (first: {stale[0]}); they were left in place",
            stacklevel=3,
        )
