"""Durable file writes and checksums, shared by the shard writer and the checkpoints.

A rename is atomic but not durable on its own: without an fsync of the file before it, a
power loss can leave the new name pointing at an empty file, and without an fsync of the
folder after it, at the old file. Both are done here, once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def sha256_of_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large files do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make renames and new entries in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse fsync on a folder; the rename still happened
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], object], tmp: Path | None = None) -> None:
    """Replace ``path`` with what ``write(stream)`` writes to a binary stream, via a temporary
    file in the same folder + fsync + ``os.replace`` + folder fsync: a reader sees the old
    content or the new, never a partial file, and a failure leaves no temporary file behind.

    ``tmp`` defaults to ``<path>.tmp``; pass one when several processes may write ``path`` at
    once (each its own name), or when the caller reserved it earlier.
    """
    tmp_path = path.with_name(path.name + ".tmp") if tmp is None else tmp
    try:
        with open(tmp_path, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically and durably (see :func:`write_atomic`)."""
    write_atomic(path, lambda stream: stream.write(text.encode()))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
