"""files.write_atomic: the new content or the old, never a partial file, and no temporary left."""

from __future__ import annotations

from pathlib import Path
from typing import IO

import pytest

from introvae_dist.files import write_atomic, write_text_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "grid.png"
    write_text_atomic(path, "old")

    def half_then_fail(stream: IO[bytes]) -> None:
        stream.write(b"new but not fin")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_the_given_temporary_name_is_used_and_removed(tmp_path: Path) -> None:
    path, tmp = tmp_path / "stats.npz", tmp_path / ".stats.npz.123.tmp"
    seen: list[bool] = []
    write_atomic(path, lambda stream: (seen.append(tmp.exists()), stream.write(b"\x00\x01")), tmp=tmp)
    assert seen == [True] and path.read_bytes() == b"\x00\x01" and not tmp.exists()
