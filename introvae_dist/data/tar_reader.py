"""Read one WebDataset shard into samples, counting what is damaged instead of dying on it.

WebDataset's own ``tarfile_to_samples`` skips a broken tar through its handler but cannot
say how many shards were damaged, and it accepts a tar cut off at a member boundary as a
short shard without complaint. This reader opens the shard with WebDataset's ``gopen``
(local paths, ``pipe:`` commands, http), groups members into samples the way WebDataset does
(key = path up to the first dot of the basename), and counts a shard as damaged when reading
it raises or when it yields fewer samples than its manifest promises.
"""

from __future__ import annotations

import contextlib
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds

from introvae_dist.data.shard_set import ShardInfo


@dataclass
class ReadStats:
    """Cumulative counts of one loader worker; summed over workers and ranks for the log."""

    samples_read: int = 0
    #: Samples whose image could not be decoded (counted by the decoder).
    samples_skipped: int = 0
    shards_read: int = 0
    #: Shards that raised while reading or held fewer samples than their manifest entry.
    shards_damaged: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def shard_samples(shard: ShardInfo, stats: ReadStats, skip: int = 0, take: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield ``{"__key__", "__url__", ext: bytes, ...}`` for samples ``[skip, skip + take)`` of ``shard``.

    Skipped samples are read past (a tar stream cannot seek) but not returned; reading stops
    after ``take`` samples without touching the rest. A read error ends this shard (the
    sample being read is dropped) and counts it damaged; the caller goes on with the next.
    """
    stats.shards_read += 1
    end = None if take is None else skip + take
    num_read = 0  # samples seen in the shard, returned or skipped
    try:
        with contextlib.closing(wds.gopen(shard.url)) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            key, sample = None, {}
            for member in tar:
                if not member.isreg():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or stem.startswith("__"):
                    continue
                data = tar.extractfile(member).read()  # raises ReadError on a truncated member
                member_key = f"{directory}/{stem}" if directory else stem
                if member_key != key:
                    if sample:
                        num_read += 1
                        if num_read > skip:
                            stats.samples_read += 1
                            yield sample
                        if num_read == end:
                            return
                    key, sample = member_key, {"__key__": member_key, "__url__": shard.url}
                sample[ext.lower()] = data
            if sample:
                num_read += 1
                if num_read > skip:
                    stats.samples_read += 1
                    yield sample
    except (OSError, EOFError, tarfile.TarError) as exc:
        stats.shards_damaged += 1
        warnings.warn(f"shard {shard.url} is damaged after {num_read} samples, going on with the "
                      f"next shard: {exc!r}", stacklevel=2)
        return
    if shard.num_samples is not None and num_read < min(shard.num_samples, end or shard.num_samples):
        stats.shards_damaged += 1
        warnings.warn(f"shard {shard.url} ended after {num_read} of the {shard.num_samples} samples "
                      "its manifest lists (truncated?)", stacklevel=2)
