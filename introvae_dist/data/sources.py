"""Where the images of a shard job come from: a folder of image files or an LSUN lmdb.

A source lists its items once, in a fixed order, in the main process; it then describes the
items of each shard as a small picklable :class:`ItemRange` that a worker process turns back
into ``(index, label, bytes)`` with :func:`read_items`. Keeping the listing in one place and
the reading in the workers is what makes the output independent of the number of workers.

Orders:
  * ``folder``: files with a :data:`FOLDER_EXTENSIONS` suffix (any letter case) found
    recursively, sorted by relative POSIX path (code-point order). Symlinked files are read;
    symlinked folders are not descended into (they can form cycles).
  * ``celebahq``: the same files in natural order, so ``2.jpg`` comes before ``10.jpg``.
  * ``lmdb``: lmdb key order (bytewise sorted), as in LSUN's ``data.py export``.

Torch-free on purpose: worker processes import this module and should start in milliseconds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lmdb

from introvae_dist.data.shard_writer import ShardInputError

SourceKind = Literal["folder", "celebahq", "lmdb"]
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Readers per lmdb environment. With lock=False lmdb keeps no reader table, so this is only
# an upper bound that must not get in the way of many workers each opening the environment.
_LMDB_MAX_READERS = 1024
_DIGITS = re.compile(r"(\d+)")
# What reading a source can raise when the source itself (not one image) fails.
READ_ERRORS: tuple[type[Exception], ...] = (OSError, lmdb.Error)


@dataclass(frozen=True)
class ItemRange:
    """The items of one shard: ``count`` consecutive items from global index ``start_index``.

    A folder range names its files (relative POSIX paths); an lmdb range holds only its
    first key, because LSUN's lmdbs have millions of keys and the worker walks a cursor.
    """

    kind: SourceKind
    root: str
    start_index: int
    count: int
    names: tuple[str, ...] = ()
    first_key: bytes = b""


@dataclass(frozen=True)
class SourceItem:
    """One source image: its global index, a human label (path or key), its bytes or the
    reason it could not be read."""

    index: int
    label: str
    data: bytes | None
    error: str | None = None


class FolderSource:
    """Image files under ``root``, listed once at construction.

    Raises:
        ShardInputError: ``root`` is missing, not a folder, or holds no image files.
    """

    def __init__(self, root: Path, kind: SourceKind = "folder") -> None:
        self.kind: SourceKind = kind
        self.root = Path(os.path.abspath(root))
        if not self.root.exists():
            raise ShardInputError(f"source folder {self.root} does not exist")
        if not self.root.is_dir():
            raise ShardInputError(f"source {self.root} is not a folder (expected a folder of images)")
        names = _list_images(self.root)
        if not names:
            wanted = ", ".join(f"*{ext}" for ext in FOLDER_EXTENSIONS)
            raise ShardInputError(
                f"source folder {self.root} holds no images "
                f"(looked recursively for {wanted}, any letter case)"
            )
        self.names = sorted(names, key=_natural_key) if kind == "celebahq" else sorted(names)

    @property
    def num_items(self) -> int:
        return len(self.names)

    def head_range(self, count: int) -> ItemRange:
        """The first ``count`` items (for the up-front readability check)."""
        return self._range(0, min(count, self.num_items))

    def shard_ranges(self, samples_per_shard: int, num_items: int) -> list[ItemRange]:
        """The first ``num_items`` items cut into shards of ``samples_per_shard``."""
        return [
            self._range(start, min(samples_per_shard, num_items - start))
            for start in range(0, num_items, samples_per_shard)
        ]

    def _range(self, start: int, count: int) -> ItemRange:
        names = tuple(self.names[start:start + count])
        return ItemRange(self.kind, str(self.root), start, count, names=names)


class LmdbSource:
    """An lmdb environment of encoded images, as LSUN's ``data.py export`` writes it.

    ``path`` is the environment folder (holding ``data.mdb``) or the ``data.mdb`` file itself.
    Keys are image ids (ASCII bytes), values the encoded webp/jpeg bytes.

    Raises:
        ShardInputError: ``path`` is missing, is not an lmdb environment, or is empty.
    """

    kind: SourceKind = "lmdb"

    def __init__(self, path: Path) -> None:
        self.root = Path(os.path.abspath(path))
        if not self.root.exists():
            raise ShardInputError(f"source lmdb {self.root} does not exist")
        try:
            with open_lmdb(str(self.root)) as env:
                self.num_items = int(env.stat()["entries"])
        except lmdb.Error as exc:
            raise ShardInputError(
                f"cannot open {self.root} as an lmdb database (expected LSUN's layout: a folder "
                f"holding data.mdb): {exc}"
            ) from exc
        if self.num_items == 0:
            raise ShardInputError(f"source lmdb {self.root} is empty (0 entries)")

    def head_range(self, count: int) -> ItemRange:
        """The first ``count`` items (for the up-front readability check)."""
        with open_lmdb(str(self.root)) as env, env.begin() as txn:
            cursor = txn.cursor()
            cursor.first()
            first_key = bytes(cursor.key())
        return ItemRange("lmdb", str(self.root), 0, min(count, self.num_items), first_key=first_key)

    def shard_ranges(self, samples_per_shard: int, num_items: int) -> list[ItemRange]:
        """The first ``num_items`` keys cut into shards: one pass over the keys, no values.

        Only every ``samples_per_shard``-th key is kept, so memory stays small even for
        LSUN's three million bedrooms.
        """
        ranges: list[ItemRange] = []
        with open_lmdb(str(self.root)) as env, env.begin() as txn:
            for index, key in enumerate(txn.cursor().iternext(keys=True, values=False)):
                if index >= num_items:
                    break
                if index % samples_per_shard == 0:
                    count = min(samples_per_shard, num_items - index)
                    ranges.append(ItemRange("lmdb", str(self.root), index, count, first_key=bytes(key)))
        return ranges


def open_source(kind: SourceKind, path: Path) -> FolderSource | LmdbSource:
    """The source of subcommand ``kind`` at ``path``; raises :class:`ShardInputError`."""
    if kind == "lmdb":
        return LmdbSource(path)
    return FolderSource(path, kind=kind)


def open_lmdb(path: str) -> lmdb.Environment:
    """Open an lmdb environment read-only for many concurrent reader processes.

    lock=False because nothing writes it while shards are made (and the lock file may sit on
    a read-only mount); readahead=False because workers read scattered values and OS
    readahead would only pollute the page cache.
    """
    return lmdb.open(
        path,
        subdir=os.path.isdir(path),
        readonly=True,
        lock=False,
        readahead=False,
        meminit=False,
        max_readers=_LMDB_MAX_READERS,
    )


def read_items(item_range: ItemRange) -> Iterator[SourceItem]:
    """The items of ``item_range`` in order; an item that cannot be read carries its error.

    Raises:
        OSError, lmdb.Error: the source itself became unreadable (not one image).
    """
    if item_range.kind == "lmdb":
        yield from _read_lmdb(item_range)
        return
    root = Path(item_range.root)
    for offset, name in enumerate(item_range.names):
        index = item_range.start_index + offset
        try:
            yield SourceItem(index, name, (root / name).read_bytes())
        except OSError as exc:
            yield SourceItem(index, name, None, f"cannot read file: {exc}")


def _read_lmdb(item_range: ItemRange) -> Iterator[SourceItem]:
    with open_lmdb(item_range.root) as env, env.begin() as txn:
        cursor = txn.cursor()
        if not cursor.set_key(item_range.first_key):
            raise OSError(f"lmdb {item_range.root} lost key {item_range.first_key!r} since it was listed")
        entries = cursor.iternext(keys=True, values=True)
        for offset in range(item_range.count):
            try:
                key, value = next(entries)
            except StopIteration:
                raise OSError(f"lmdb {item_range.root} has fewer entries than when it was listed") from None
            yield SourceItem(item_range.start_index + offset, lmdb_key_label(bytes(key)), bytes(value))


def lmdb_key_label(key: bytes) -> str:
    """An lmdb key as text: LSUN keys are ASCII; anything else is escaped, never dropped."""
    return key.decode("ascii", errors="backslashreplace")


def _list_images(root: Path) -> list[str]:
    names = []
    for folder, _subfolders, files in os.walk(root):
        for file_name in files:
            if file_name.lower().endswith(FOLDER_EXTENSIONS):
                names.append(Path(folder, file_name).relative_to(root).as_posix())
    return names


def _natural_key(name: str) -> tuple[tuple[str | int, ...], str]:
    """Sort key that compares digit runs as numbers (``2.jpg`` < ``10.jpg``).

    ``re.split`` with a capture group puts text at even and digits at odd positions, so
    tuples never compare a str with an int; the name itself breaks ties like ``02`` vs ``2``.
    """
    parts = _DIGITS.split(name)
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts)), name
