"""Which shards a run reads: resolve a shard spec, attach the manifest's facts, verify them.

A spec is what a user writes in ``data.shards``. It resolves to a :class:`ShardSet`: the
shard URLs in a fixed order, each with its sample count, size and sha256 when a manifest
(written by ``introvae-dist shards``) knows them. The loader needs the counts for epoch mode
(equal batch counts on every rank); the trainer verifies sizes and checksums before training.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import braceexpand
from PIL import Image

from introvae_dist.data.decode import IMAGE_EXTENSIONS
from introvae_dist.data.shard_writer import MANIFEST_NAME, read_manifest, sha256_of_file

# Prefixes that name remote or piped shards: they cannot be checked for existence here.
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")

Verify = Literal["sha256", "size", "none"]


class DataError(ValueError):
    """Bad data input: a spec that matches nothing, a missing or damaged shard, a broken stream."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard: where to read it and what its manifest says (None where unknown)."""

    url: str
    num_samples: int | None = None
    num_bytes: int | None = None
    sha256: str | None = None

    @property
    def is_remote(self) -> bool:
        return self.url.startswith(REMOTE_PREFIXES)


@dataclass(frozen=True)
class ShardSet:
    """The shards of a run, in a fixed order, and the stored image side if the manifest says."""

    spec: str
    shards: tuple[ShardInfo, ...]
    resolution_px: int | None = None
    manifest_path: Path | None = None

    @property
    def urls(self) -> list[str]:
        return [shard.url for shard in self.shards]

    @property
    def num_samples(self) -> int | None:
        """Total images, or None if any shard's count is unknown."""
        counts = [shard.num_samples for shard in self.shards]
        return None if None in counts else sum(counts)  # type: ignore[arg-type]


def resolve_shard_set(spec: str, manifest: str | None = None) -> ShardSet:
    """Turn ``data.shards`` (and optionally ``data.manifest``) into a :class:`ShardSet`.

    ``spec`` may be:

    * a directory: the shards its ``manifest.json`` lists (each must exist), else every
      ``*.tar`` inside, sorted;
    * a ``manifest.json`` file: the shards it lists, relative to its folder;
    * a brace pattern (``shards/x-{000000..000007}.tar``), a glob (``shards/*.tar``) or a file;
    * a ``pipe:`` or ``http(s)://`` (``s3://``, ``gs://``) URL, brace-expanded as WebDataset
      does and not checked here;
    * several of these joined by ``::``, WebDataset's separator.

    ``manifest``: a local copy of the manifest of remote shards, so their counts and checksums
    are known; a shard URL takes the entry whose file name appears in it.

    Raises:
        DataError: naming the spec or path, when it matches nothing, a folder holds no tars,
            a local shard is missing or empty, or the manifest is unreadable.
    """
    manifest_path = Path(manifest).expanduser() if manifest else None
    resolution_px = None
    if manifest_path is not None:
        entries, resolution_px = _manifest_entries(manifest_path)
        shards = [_with_manifest_entry(url, entries, manifest_path) for url in _resolve_urls(spec)]
        return ShardSet(spec, tuple(shards), resolution_px, manifest_path)
    if "::" not in spec:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".json":
            manifest_path = path
        elif path.is_dir() and (path / MANIFEST_NAME).is_file():
            manifest_path = path / MANIFEST_NAME
    if manifest_path is not None:
        shards, resolution_px = _shards_from_manifest(manifest_path)
        return ShardSet(spec, tuple(shards), resolution_px, manifest_path)
    return ShardSet(spec, tuple(ShardInfo(url) for url in _resolve_urls(spec)))


def with_sample_counts(shard_set: ShardSet) -> ShardSet:
    """Fill in unknown sample counts of local shards by reading their tar headers.

    Epoch mode needs every shard's count; a manifest has them, a bare folder of tars does not.
    Reading headers skips the image bytes, so this costs one pass over the tar index.

    Raises:
        DataError: a remote shard without a manifest entry, or an unreadable tar.
    """
    counted = []
    for shard in shard_set.shards:
        if shard.num_samples is None:
            if shard.is_remote:
                raise DataError(
                    f"shard {shard.url!r} has no sample count: epoch mode needs the counts of remote "
                    "shards from their manifest (set data.manifest to a local copy of manifest.json) "
                    "or use data.mode=resampled"
                )
            shard = replace(shard, num_samples=count_tar_samples(shard.url))
        counted.append(shard)
    return replace(shard_set, shards=tuple(counted))


def count_tar_samples(path: str) -> int:
    """Samples in a local tar: distinct keys (member path up to the first dot of the basename)."""
    keys = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isreg():
                    directory, _, base = member.name.rpartition("/")
                    keys.add((directory, base.split(".", 1)[0]))
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"shard {path!r} is not a readable tar file: {exc}") from exc
    return len(keys)


def verify_shards(shards: list[ShardInfo], check: Verify) -> list[str]:
    """Check local shards against their manifest entries; return one line per problem.

    ``check="size"`` compares file sizes (a stat per shard); ``"sha256"`` also hashes every
    byte, which catches a shard overwritten in place or corrupted on disk. The trainer splits
    the list over ranks so each hashes only its share.
    """
    problems = []
    for shard in shards:
        if check == "none" or shard.is_remote:
            continue
        if shard.num_bytes is not None and (size := os.path.getsize(shard.url)) != shard.num_bytes:
            problems.append(f"{shard.url}: {size} bytes, the manifest says {shard.num_bytes}")
        elif check == "sha256" and shard.sha256 is not None and (digest := sha256_of_file(Path(shard.url))) != shard.sha256:
            problems.append(f"{shard.url}: sha256 {digest[:16]}..., the manifest says {shard.sha256[:16]}...")
    return problems


def stored_image_size_px(shard_set: ShardSet) -> int | None:
    """Side of the stored images' square centre crop, for a startup check against the model.

    The manifest's ``resolution_px`` when it has one; else the first readable image's header
    in the first local shard (assuming one size throughout, true of CelebA-HQ and resized
    exports). None when unknown: remote shards, or originals of mixed sizes (LSUN).

    Raises:
        DataError: the first shard is not a readable tar or holds no decodable image.
    """
    if shard_set.manifest_path is not None:
        return shard_set.resolution_px
    shard = shard_set.shards[0]
    if shard.is_remote:
        return None
    try:
        with tarfile.open(shard.url) as tar:
            for member in tar:
                extension = member.name.rsplit(".", 1)[-1].lower()
                if not member.isfile() or extension not in IMAGE_EXTENSIONS:
                    continue
                stream = tar.extractfile(member)
                try:
                    # Image.open reads the header only; the pixels stay undecoded.
                    with Image.open(io.BytesIO(stream.read())) as image:
                        return min(image.size)
                except (OSError, Image.DecompressionBombError):
                    continue  # a corrupt first sample is skipped here as in the stream
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"shard {shard.url!r} is not a readable tar file: {exc}") from exc
    raise DataError(f"shard {shard.url!r} holds no decodable image (expected one of {IMAGE_EXTENSIONS})")


def _resolve_urls(spec: str) -> list[str]:
    if "::" in spec:
        return [url for part in spec.split("::") if part for url in _resolve_urls(part)]
    if spec.startswith(REMOTE_PREFIXES):
        return list(braceexpand.braceexpand(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise DataError(f"shard directory {str(path)!r} holds no *.tar files and no {MANIFEST_NAME}")
        for shard in shards:
            _check_local_shard(shard, f"directory {str(path)!r}")
        return shards
    if "{" in spec:
        paths = [os.path.expanduser(p) for p in braceexpand.braceexpand(spec)]
        for shard in paths:
            _check_local_shard(shard, f"brace pattern {spec!r}")
        return paths
    if glob.has_magic(spec):
        paths = sorted(glob.glob(os.path.expanduser(spec)))
        if not paths:
            raise DataError(f"shard glob {spec!r} matches no files")
        for shard in paths:
            _check_local_shard(shard, f"glob {spec!r}")
        return paths
    if not path.exists():
        raise DataError(f"shard path {spec!r} does not exist (expected a directory, a .tar file, a "
                        "manifest.json, a brace pattern like x-{000000..000007}.tar or a glob)")
    _check_local_shard(str(path), f"shard path {spec!r}")
    return [str(path)]


def _manifest_entries(manifest_path: Path) -> tuple[list[dict], int | None]:
    try:
        manifest = read_manifest(manifest_path)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    if not manifest["shards"]:
        raise DataError(f"shard manifest {manifest_path} lists no shards")
    resolution_px = manifest.get("resolution_px")
    return manifest["shards"], resolution_px if isinstance(resolution_px, int) else None


def _shard_info(url: str, entry: dict) -> ShardInfo:
    return ShardInfo(url, entry.get("num_samples"), entry.get("num_bytes"), entry.get("sha256"))


def _shards_from_manifest(manifest_path: Path) -> tuple[list[ShardInfo], int | None]:
    entries, resolution_px = _manifest_entries(manifest_path)
    shards = [_shard_info(str(manifest_path.parent / entry["file"]), entry) for entry in entries]
    for shard in shards:
        _check_local_shard(shard.url, f"manifest {manifest_path}")
    return shards, resolution_px


def _with_manifest_entry(url: str, entries: list[dict], manifest_path: Path) -> ShardInfo:
    matches = [entry for entry in entries if entry["file"] in url]
    if not matches:
        raise DataError(f"shard {url!r} matches no file listed in manifest {manifest_path}")
    # The longest name wins, so x-000001.tar never takes the entry of a shorter name inside it.
    return _shard_info(url, max(matches, key=lambda entry: len(entry["file"])))


def _check_local_shard(path: str, source: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"shard {path!r} from {source} does not exist")
    if os.path.getsize(path) == 0:
        raise DataError(f"shard {path!r} from {source} is empty (0 bytes)")
