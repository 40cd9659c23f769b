"""The training loader: WebDataset tar shards -> an endless stream of uint8 (B, 3, R, R) batches.

Every rank runs ``max(1, num_workers)`` *streams* (one per DataLoader worker), so a world of
``S = ranks x workers`` streams in all, each reading data no other stream reads. Each epoch
the shards are permuted with ``(seed, epoch)`` (see :func:`slices_of_stream`):

* epoch mode: the permuted shards' N samples are laid end to end and stream ``s`` reads the
  contiguous range ``[s N / S, (s + 1) N / S)``: floor or ceil of N / S images each, whatever
  the shard sizes; a shard on a boundary is read in part by two neighbouring streams;
* resampled mode: shards are dealt round-robin, and each stream draws from its own with
  replacement, endlessly.

Inside a stream:

1. samples: :func:`~introvae_dist.data.tar_reader.shard_samples`, counting damaged shards;
2. shuffle: a buffer of still-encoded samples seeded by ``(seed, epoch, rank, worker)``;
3. decode: centre crop, resize (JPEG draft decoding when stored images are larger), flip;
4. batch: ``B`` images, and exactly ``n_e`` batches per stream in epoch ``e``.

``n_e = floor(floor(N / S) / B)`` is the same for every stream, so every rank yields the same
number of batches per epoch and the DataLoader's round-robin over workers never mixes two
epochs. Every image is seen at most once per epoch; a stream leaves out fewer than B + 1 of
its images (none when N divides by S x B). A stream that comes up short (corrupt samples, a
truncated tar) tops up from its own shards rather than end early, so no rank ever waits on
another. Resampled mode uses the same ``n_e`` for its nominal epochs, which only re-seed.

Determinism: everything is a function of ``(seed, epoch, rank, worker)``, never of the pid,
clock or environment; the same arguments give the same batches.

Resume: a rank's position is one number, the batches it has consumed. The DataLoader takes
batches from its workers strictly in turn, so after ``k`` batches worker ``w`` has delivered
``k // W + (w < k % W)`` of them and worker ``k % W`` is next. A stream started at ``k``
(:class:`ShardStream` ``consumed=k``) lets its first DataLoader worker play stream worker
``k % W``, and each stream worker fast-forwards through the samples of its current epoch it
had already delivered without decoding them (reading is cheap, decoding is not), drawing the
flip decisions it drew then. The batches that follow are the ones an uninterrupted run would
have seen, provided no skipped sample was undecodable.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import signal
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds

from introvae_dist.data.decode import decode_and_resize, first_image_entry, to_unit_float
from introvae_dist.data.shard_set import DataError, ShardInfo
from introvae_dist.data.tar_reader import ReadStats, shard_samples

Mode = Literal["epoch", "resampled"]

#: A stream in which this many samples in a row fail to decode is broken, not noisy: raise
#: instead of spinning forever over resampled bad shards.
MAX_CONSECUTIVE_DECODE_FAILURES = 100
#: Nominal epoch length (batches per stream) of resampled mode when shard counts are unknown.
RESAMPLED_EPOCH_BATCHES = 1000

# Distinct tags so the shard order, shard draws, shuffle buffer and augmentation of one
# (seed, epoch, rank, worker) never share a random stream.
_SHARD_ORDER, _SHARD_DRAW, _SHUFFLE, _AUGMENT = 0, 1, 2, 3


@dataclass(frozen=True)
class StreamSpec:
    """Everything that determines one rank's stream of batches."""

    shards: tuple[ShardInfo, ...]
    resolution_px: int
    batch_per_rank: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    mode: Mode = "epoch"
    shuffle_buffer: int = 256
    hflip: bool = True

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_streams(self) -> int:
        return self.world_size * self.streams_per_rank

    def validate(self) -> None:
        """Raise ValueError/DataError for arguments no stream can be built from."""
        for name in ("resolution_px", "batch_per_rank", "world_size", "shuffle_buffer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.num_workers < 0 or self.seed < 0:
            raise ValueError(f"num_workers and seed must be >= 0, got {self.num_workers} and {self.seed}")
        if self.mode not in ("epoch", "resampled"):
            raise ValueError(f"mode must be 'epoch' or 'resampled', got {self.mode!r}")
        check_stream_coverage(len(self.shards), self.world_size, self.num_workers)
        if self.mode == "epoch":
            if any(shard.num_samples is None for shard in self.shards):
                raise DataError("epoch mode needs every shard's sample count (a manifest, or "
                                "shard_set.with_sample_counts for local tars)")
            if batches_per_stream(self, epoch=0) == 0:
                raise DataError(
                    f"{sum(s.num_samples for s in self.shards)} images over {self.num_streams} streams "
                    f"({self.world_size} ranks x {self.streams_per_rank} workers) leave some stream fewer "
                    f"than batch_per_rank={self.batch_per_rank} images per epoch; use fewer workers, "
                    f"a smaller batch or more images"
                )


def check_stream_coverage(num_shards: int, world_size: int, num_workers: int) -> None:
    """Every stream needs a shard of its own: at least ranks x workers shards.

    Raises:
        DataError: saying how many shards to write (or how few workers to use).
    """
    streams = world_size * max(1, num_workers)
    if num_shards < streams:
        fewer_workers = num_shards // world_size
        hint = f" or set data.num_workers <= {fewer_workers}" if fewer_workers >= 1 else ""
        raise DataError(
            f"{num_shards} shard(s) for {world_size} rank(s) x {max(1, num_workers)} loader worker(s) = "
            f"{streams} streams, each of which reads shards of its own: write at least {streams} shards "
            f"(introvae-dist shards ... --samples-per-shard <= images / {streams}){hint}"
        )


@dataclass(frozen=True)
class ShardSlice:
    """Samples ``[skip, skip + take)`` of one shard (``take=None``: to its end)."""

    shard: ShardInfo
    skip: int = 0
    take: int | None = None


def slices_of_stream(spec: StreamSpec, epoch: int, stream: int) -> list[ShardSlice]:
    """What stream ``stream`` reads in ``epoch``.

    The shards are permuted with ``(seed, epoch)``. Epoch mode lays their samples end to end
    in that order and gives stream ``s`` of ``S`` the contiguous range
    ``[s N / S, (s + 1) N / S)``: every stream gets floor or ceil of N / S images whatever the
    shard sizes, and a shard on a range boundary is read in part by two neighbouring streams.
    Resampled mode (or unknown counts) deals whole shards round-robin instead, so streams
    draw from disjoint shard sets.
    """
    order = _shard_order(spec, epoch)
    counts = [spec.shards[i].num_samples for i in order]
    if spec.mode == "resampled" or None in counts:
        return [ShardSlice(spec.shards[i]) for i in order[stream::spec.num_streams]]
    total = sum(counts)  # type: ignore[arg-type]
    low, high = stream * total // spec.num_streams, (stream + 1) * total // spec.num_streams
    slices, start = [], 0
    for i, count in zip(order, counts):
        end = start + count  # type: ignore[operator]
        if start < high and end > low and count:
            skip = max(low, start) - start
            slices.append(ShardSlice(spec.shards[i], skip, min(high, end) - start - skip))
        start = end
    return slices


def _shard_order(spec: StreamSpec, epoch: int) -> np.ndarray:
    return np.random.default_rng(derive_seed(spec.seed, epoch, _SHARD_ORDER)).permutation(len(spec.shards))


def batches_per_stream(spec: StreamSpec, epoch: int) -> int:
    """``n_e``: batches every stream yields in ``epoch`` (the same for all, see module doc).

    Epoch mode: the shortest stream range, floor(N / S) images, in whole batches.
    """
    if any(shard.num_samples is None for shard in spec.shards):
        return RESAMPLED_EPOCH_BATCHES
    per_stream = sum(shard.num_samples for shard in spec.shards) // spec.num_streams  # type: ignore[misc]
    if spec.mode == "resampled":
        return max(1, per_stream // spec.batch_per_rank)
    return per_stream // spec.batch_per_rank


def describe_epoch(spec: StreamSpec, epoch: int = 0) -> str:
    """One line for the run log: streams, batches per stream, and the share of images an epoch uses."""
    streams = f"{len(spec.shards)} shards over {spec.num_streams} streams ({spec.world_size} ranks x {spec.streams_per_rank} workers)"
    total = sum(s.num_samples for s in spec.shards) if all(s.num_samples is not None for s in spec.shards) else None
    n = batches_per_stream(spec, epoch)
    if spec.mode == "resampled" or total is None:
        return f"data: {streams}, resampled, nominal epochs of {n} batches per stream"
    used = n * spec.batch_per_rank * spec.num_streams
    line = f"data: {streams}, epoch {epoch}: {n} batches per stream, {used} of {total} images ({used / total:.0%})"
    if used < 0.95 * total:
        line += ("; each stream leaves out its last partial batch: fewer streams (data.num_workers) "
                 "or a smaller batch use more of a dataset this small")
    return line


def derive_seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from integers (a plain sum would make (1, 0) == (0, 1))."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0]) & 0x7FFFFFFF


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's streams; each DataLoader worker runs the stream of its index.

    Yields ``(images, info)``: images uint8 (B, 3, R, R); info holds the worker,
    epoch, batch index in the epoch and the worker's cumulative :class:`ReadStats`.
    """

    def __init__(self, spec: StreamSpec, consumed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.consumed = consumed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        workers = self.spec.streams_per_rank
        # The DataLoader starts at its worker 0; rotate so it plays the worker that is next.
        worker = (_worker_index() + self.consumed) % workers
        stream = self.spec.rank * workers + worker
        delivered = self.consumed // workers + (1 if worker < self.consumed % workers else 0)
        n_batches = batches_per_stream(self.spec, 0)  # the same every epoch
        start_epoch, skip = divmod(delivered, n_batches)
        stats = ReadStats()
        for epoch in itertools.count(start_epoch):
            first = skip if epoch == start_epoch else 0
            batches = self._batches(epoch, worker, stream, stats, skip_batches=first)
            for index in range(first, n_batches):
                images = next(batches)
                yield images, {"worker": worker, "epoch": epoch, "batch": index, "stats": stats.as_dict()}
            batches.close()  # closes the open shard (and its pipe: process) before the next epoch

    def _batches(self, epoch: int, worker: int, stream: int, stats: ReadStats,
                 skip_batches: int = 0) -> Iterator[torch.Tensor]:
        spec = self.spec
        own = slices_of_stream(spec, epoch, stream)
        shuffle_seed = derive_seed(spec.seed, epoch, spec.rank, worker, _SHUFFLE)
        draw = random.Random(derive_seed(spec.seed, epoch, spec.rank, worker, _SHARD_DRAW))
        rng = random.Random(derive_seed(spec.seed, epoch, spec.rank, worker, _AUGMENT))
        resampled = _resampled([piece.shard for piece in own], draw, stats)
        if spec.mode == "epoch":
            # The epoch's own shards, shuffled and drained; the resampled continuation is
            # reached only when damaged data left this stream short of n_e batches, and tops
            # it up from its own shards so the rank still yields exactly n_e. Chained after the
            # shuffle, not before, so the buffer never mixes top-up samples into a clean epoch.
            epoch_samples = (sample for piece in own for sample in shard_samples(piece.shard, stats, piece.skip, piece.take))
            samples = itertools.chain(wds.shuffle(spec.shuffle_buffer, seed=shuffle_seed)(epoch_samples),
                                      wds.shuffle(spec.shuffle_buffer, seed=shuffle_seed + 1)(resampled))
        else:
            samples = wds.shuffle(spec.shuffle_buffer, seed=shuffle_seed)(resampled)
        if skip_batches:
            # Resume: pass over the samples this stream already delivered, undecoded, drawing
            # the flips decoding drew, then count afresh (the checkpoint holds the counts so far).
            for _ in range(skip_batches * spec.batch_per_rank):
                next(samples)
                if spec.hflip:
                    rng.random()
            for name in vars(stats):
                setattr(stats, name, 0)
        images = _decoded(samples, spec.resolution_px, spec.hflip, rng, stats)
        while True:
            yield torch.from_numpy(np.stack([next(images) for _ in range(spec.batch_per_rank)]))


def _resampled(shards: list[ShardInfo], draw: random.Random, stats: ReadStats) -> Iterator[dict[str, Any]]:
    empty_in_a_row = 0
    while True:
        shard = draw.choice(shards)
        before = stats.samples_read
        yield from shard_samples(shard, stats)
        empty_in_a_row = empty_in_a_row + 1 if stats.samples_read == before else 0
        if empty_in_a_row >= max(10, 2 * len(shards)):
            raise DataError(f"{empty_in_a_row} shards in a row yielded no samples (last: {shard.url}); "
                            "the shards of this stream look unreadable")


def _decoded(samples: Iterator[dict[str, Any]], resolution_px: int, hflip: bool, rng: random.Random,
             stats: ReadStats) -> Iterator[np.ndarray]:
    """Decode each sample's image; skip and count the undecodable ones."""
    failures_in_a_row = 0
    for sample in samples:
        try:
            pixels = decode_and_resize(first_image_entry(sample), resolution_px, hflip, rng)
        except Exception as exc:  # any bad sample is skipped, whatever the decoder raised
            stats.samples_skipped += 1
            failures_in_a_row += 1
            where = f"{sample.get('__url__', '?')} key {sample.get('__key__', '?')}"
            if failures_in_a_row >= MAX_CONSECUTIVE_DECODE_FAILURES:
                raise DataError(f"{failures_in_a_row} samples in a row failed to decode; last: {where}: {exc!r}") from exc
            warnings.warn(f"skipping undecodable sample {where}: {exc!r}", stacklevel=2)
            continue
        failures_in_a_row = 0
        yield pixels  # (3, R, R)


class TrainStream:
    """The rank's iterator of batches, with its position and the summed read counts.

    Wraps the DataLoader so the trainer sees plain tensors while the per-worker counts that
    ride along with each batch are kept for the training log.
    """

    def __init__(self, spec: StreamSpec, consumed: int = 0, counts_so_far: dict[str, int] | None = None) -> None:
        spec.validate()
        self.spec = spec
        self._batches: Iterator[tuple[torch.Tensor, dict[str, Any]]] | None = None
        self._stats_by_worker: dict[int, dict[str, int]] = {}
        self._start_at(consumed, counts_so_far)

    def _start_at(self, consumed: int, counts_so_far: dict[str, int] | None) -> None:
        self.loader = torch.utils.data.DataLoader(
            ShardStream(self.spec, consumed),
            batch_size=None,  # the streams batch themselves
            num_workers=self.spec.num_workers,
            persistent_workers=self.spec.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_ignore_stop_signals,
        )
        self._counts_so_far = dict(counts_so_far or {})
        #: Batches this rank has taken from the stream since the run began: its resume position.
        self.consumed = consumed
        self.epoch = consumed // batches_per_rank_epoch(self.spec)
        self.batch_in_epoch = -1

    # -- resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's position, versioned, with the layout it means something in."""
        return {"version": STREAM_STATE_VERSION, "consumed": self.consumed, "counts": self.stats(),
                "layout": layout_key(self.spec), "batches_per_rank_epoch": batches_per_rank_epoch(self.spec)}

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """Go on from a saved position (before the first batch is taken).

        The same layout (ranks, workers, batch, shards, seed: :func:`layout_key`) continues
        exactly where the save stopped, with its read counts. Another layout has no such
        position: the stream goes on in the same epoch at the same share of it
        (:func:`position_after_layout_change`) and the line returned says so; None otherwise.
        A state written before the format had a version (introvae-dist <= 0.1, issue 15) has
        the same fields and is read as version 1.

        Raises:
            DataError: the state is of another version or lacks a field.
        """
        if self._batches is not None:
            raise RuntimeError("TrainStream.load_state_dict: the stream has already yielded batches")
        version = state.get("version", 1)
        missing = {"consumed", "layout", "batches_per_rank_epoch"} - set(state)
        if version != STREAM_STATE_VERSION or missing:
            raise DataError(f"data stream state of version {version!r} with fields {sorted(state)}: expected version "
                            f"{STREAM_STATE_VERSION} with consumed, counts, layout and batches_per_rank_epoch "
                            "(written by another introvae-dist?)")
        if state["layout"] == layout_key(self.spec):
            self._start_at(state["consumed"], state.get("counts"))
            return None
        consumed = position_after_layout_change(state["consumed"], state["batches_per_rank_epoch"], self.spec)
        self._start_at(consumed, None)
        return (f"data: the stream's layout changed since the save (ranks, workers, batch or shards); "
                f"going on in epoch {self.epoch} at the same share of it")

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self._batches is None:
            self._batches = iter(self.loader)
        images, info = next(self._batches)
        self.consumed += 1
        self._stats_by_worker[info["worker"]] = info["stats"]
        self.epoch, self.batch_in_epoch = info["epoch"], info["batch"]
        return images

    def close(self) -> None:
        """Stop the worker processes now (idempotent).

        Needed on every exit path: the workers ignore SIGTERM (see :func:`_ignore_stop_signals`),
        so the interpreter's exit handler, which terminates its children with SIGTERM and then
        joins them, would wait forever. Dropping the iterator is not enough: when a worker's
        error is what ends the run, that error's traceback still holds the iterator, so the
        DataLoader never shuts its workers down (seen: a DataError in a worker hung the job for
        good). So the workers are shut down here through their queues, as the DataLoader
        does, and any still alive after that are killed; they hold nothing worth keeping.
        """
        batches, self._batches = self._batches, None
        self.loader = None  # type: ignore[assignment]  # also drops its persistent-workers iterator
        # `_workers` and `_shutdown_workers` are the DataLoader iterator's own (private) names;
        # a torch without them leaves only the kill below undone.
        workers = list(getattr(batches, "_workers", ()))
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)

    def stats(self) -> dict[str, int]:
        """Read counts summed over this rank's workers, cumulative since the run began."""
        total = {**ReadStats().as_dict(), **self._counts_so_far}
        for counts in self._stats_by_worker.values():
            for name, value in counts.items():
                total[name] += value
        return total


def build_train_stream(
    shards: list[ShardInfo] | tuple[ShardInfo, ...],
    resolution_px: int,
    batch_per_rank: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    mode: Mode = "epoch",
    shuffle_buffer: int = 256,
    hflip: bool = True,
) -> TrainStream:
    """An endless, deterministic stream of uint8 image batches (B, 3, R, R).

    uint8 keeps the worker-to-trainer and host-to-device copies at a quarter of float32's
    bytes; convert on the device with :func:`~introvae_dist.data.decode.to_unit_float`.

    ``rank`` and ``world_size`` are arguments, not read from the environment, so the caller's
    notion of rank is the one used. Raises DataError/ValueError before any worker starts.
    """
    spec = StreamSpec(tuple(shards), resolution_px, batch_per_rank, rank, world_size, num_workers, seed,
                      mode, shuffle_buffer, hflip)
    return TrainStream(spec)


def read_fixed_images(shards: list[ShardInfo] | tuple[ShardInfo, ...], count: int, resolution_px: int) -> torch.Tensor:
    """The first ``count`` decodable images of the shards in order, unflipped, as float32
    (count, 3, R, R) in [0, 1].

    For the sample grids: the same inputs in every grid of a run, taken outside the training
    stream so they cost it nothing and do not depend on its position.

    Raises:
        DataError: the shards hold fewer than ``count`` decodable images.
    """
    stats = ReadStats()
    samples = itertools.chain.from_iterable(shard_samples(shard, stats) for shard in shards)
    images = list(itertools.islice(_decoded(samples, resolution_px, False, random.Random(0), stats), count))
    if len(images) < count:
        raise DataError(f"the shards hold {len(images)} decodable images, fewer than the {count} asked for")
    return to_unit_float(torch.from_numpy(np.stack(images)))


def read_image_range(shards: list[ShardInfo] | tuple[ShardInfo, ...], start: int, stop: int, resolution_px: int,
                     batch: int, stats: ReadStats) -> Iterator[torch.Tensor]:
    """Images ``[start, stop)`` of the shards laid end to end in order, decoded unflipped, as
    uint8 batches (up to ``batch``, 3, R, R).

    For evaluation: each rank reads its own contiguous range, touching only the shards that
    hold it. Needs every shard's sample count (a manifest, or
    :func:`~introvae_dist.data.shard_set.with_sample_counts`). Undecodable images are left
    out and counted in ``stats``, so a range may yield fewer images than it spans.
    """
    pieces, offset = [], 0
    for shard in shards:
        if shard.num_samples is None:
            raise DataError(f"shard {shard.url!r} has no sample count (needed to read images by index)")
        end = offset + shard.num_samples
        if offset < stop and end > start:
            skip = max(start, offset) - offset
            pieces.append(ShardSlice(shard, skip, min(stop, end) - offset - skip))
        offset = end
    samples = (sample for piece in pieces for sample in shard_samples(piece.shard, stats, piece.skip, piece.take))
    images = _decoded(samples, resolution_px, False, random.Random(0), stats)
    while chunk := list(itertools.islice(images, batch)):
        yield torch.from_numpy(np.stack(chunk))


#: Version of :meth:`TrainStream.state_dict`'s format.
STREAM_STATE_VERSION = 1


def batches_per_rank_epoch(spec: StreamSpec) -> int:
    """Batches one rank takes per epoch: ``n_e`` from each of its streams."""
    return spec.streams_per_rank * batches_per_stream(spec, 0)


def layout_key(spec: StreamSpec) -> dict[str, Any]:
    """What must match for a saved stream position to mean the same batches after a resume."""
    shards = [[s.url, s.num_samples] for s in spec.shards]
    return {"rank": spec.rank, "world_size": spec.world_size, "streams_per_rank": spec.streams_per_rank,
            "batch_per_rank": spec.batch_per_rank, "seed": spec.seed, "mode": spec.mode,
            "resolution_px": spec.resolution_px, "shuffle_buffer": spec.shuffle_buffer, "hflip": spec.hflip,
            "shards": hashlib.sha256(repr(shards).encode()).hexdigest()}


def position_after_layout_change(consumed: int, old_batches_per_epoch: int, new: StreamSpec) -> int:
    """The position in ``new`` at the same epoch and the same share of it as ``consumed`` was
    in a stream of ``old_batches_per_epoch`` batches per rank and epoch.

    Used when the world size, workers, batch or shards changed between a save and a resume:
    the exact position no longer exists, so the stream goes on in the same epoch at the same
    fraction of it (each image still about once per epoch).
    """
    old_per_epoch = old_batches_per_epoch
    epoch, within = divmod(consumed, old_per_epoch)
    new_n = batches_per_stream(new, 0)
    return new.streams_per_rank * (epoch * new_n + round(within / old_per_epoch * new_n))


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the trainer, which saves before stopping them.

    Launchers signal the whole process tree (deepspeed's, srun); a worker killed by it would
    make the DataLoader raise in the middle of the step the trainer is finishing.
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _worker_index() -> int:
    """This DataLoader worker's index, 0 in the main process (module-level so it pickles)."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id
