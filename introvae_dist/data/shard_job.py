"""Write a whole image source into tar shards, in parallel, resumably: ``introvae-dist shards``.

Shard ``i`` holds source items ``[i*S, (i+1)*S)`` of the source's fixed order (S =
``samples_per_shard``) minus the unreadable ones, under keys ``%08d`` of the item index, so
its bytes depend only on the source and the parameters, never on the number of workers or on
which run (first or resumed) wrote it. Every sample is ``KEY.<jpg|png|webp>`` (the image) plus
``KEY.src.txt`` (the relative path or lmdb key it came from).

Each worker process writes whole shards through ``.tmp`` + fsync + ``os.replace``; the main
process lists the source, hands out :class:`ShardTask` s, records each finished shard in
``NAME.progress.json`` (see :mod:`introvae_dist.data.shard_progress`), drives one progress bar
over images, and writes ``manifest.json`` last.

Worker processes are started with ``spawn`` (no forked locks or lmdb handles), ignore Ctrl-C
between shards, abort their shard (deleting its ``.tmp``) when interrupted, when the main
process asks them to stop, or when they notice the main process is gone (``kill -9``).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from introvae_dist.data.image_prep import ImagePrep, PreparedImage, UnreadableImage, prepare_image
from introvae_dist.data.shard_progress import JobRecord, lock_output_dir, remove_stale_tmp_files
from introvae_dist.data.shard_writer import MANIFEST_NAME, ShardInProgress, ShardInputError, write_json_atomic
from introvae_dist.data.sources import READ_ERRORS, FolderSource, ItemRange, LmdbSource, read_items

# Bump when the bytes written for the same source and options change (keys, tar members,
# encoding): resuming then refuses to mix old and new shards.
WRITER_VERSION = 1
KEY_FORMAT = "{:08d}"
SOURCE_ENTRY_EXT = "src.txt"
# Images tried in the main process before anything is written: if none of them can be read,
# the source is not what the subcommand expects (exit 2 instead of a folder of empty shards).
HEAD_CHECK_IMAGES = 8
# How often the main process refreshes the progress bar from the workers' counter.
_POLL_S = 0.2
_MAX_SIZE_EXAMPLES = 3
# Failures of the disk, the source or a worker process: reported in one line with the shard
# that failed. Anything else is a bug and keeps its traceback.
_WRITE_ERRORS = (*READ_ERRORS, BrokenProcessPool)


class ShardWriteError(RuntimeError):
    """Writing failed for a reason that is not bad input (disk full, a worker died)."""


@dataclass(frozen=True)
class ShardJob:
    """One ``introvae-dist shards`` request, validated by the caller."""

    source: FolderSource | LmdbSource
    out_dir: Path
    name: str
    samples_per_shard: int
    prep: ImagePrep
    limit: int | None = None
    workers: int = 1
    show_progress: bool = True
    # CelebA-HQ: the (width, height) every source image should have; others are reported.
    expected_size_px: tuple[int, int] | None = None

    def params(self) -> dict[str, Any]:
        """Everything that determines the shard bytes (``workers`` and the bar do not)."""
        return {
            "writer_version": WRITER_VERSION,
            "samples_per_shard": self.samples_per_shard,
            "limit": self.limit,
            **self.prep.params(),
        }


@dataclass
class ShardJobSummary:
    out_dir: Path
    num_shards: int
    num_shards_written: int
    num_shards_kept: int
    num_samples: int
    num_skipped: int
    elapsed_s: float
    already_complete: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ShardTask:
    """What a worker needs for one shard; small and picklable."""

    index: int
    final_path: str
    items: ItemRange
    prep: ImagePrep
    expected_size_px: tuple[int, int] | None


def run_shard_job(job: ShardJob) -> ShardJobSummary:
    """Write (or finish writing) every shard of ``job`` and then ``manifest.json``.

    Raises:
        ShardInputError: bad input found before anything was written (unreadable source,
            ``--out`` unusable or holding other shards).
        ShardWriteError: a shard could not be written; finished shards are kept.
        KeyboardInterrupt: after this run's own ``.tmp`` files were removed.
    """
    start_s = time.perf_counter()
    out_dir = Path(os.path.abspath(job.out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardInputError(f"--out {out_dir} is a file; expected a folder (created if missing)")
    _check_first_images(job)
    _create_out_dir(out_dir)
    num_items = min(job.source.num_items, job.limit or job.source.num_items)
    record = JobRecord(
        out_dir=out_dir,
        name=job.name,
        source={"kind": job.source.kind, "path": str(job.source.root), "num_items": job.source.num_items},
        params=job.params(),
        num_shards=-(-num_items // job.samples_per_shard),
    )
    lock_fd = lock_output_dir(out_dir)
    try:
        record.load_existing()
        kept = len(record.done)
        if kept == record.num_shards and record.manifest_is_current():
            return _summary(record, job, 0, kept, start_s, already_complete=True)
        remove_stale_tmp_files(out_dir, job.name)
        record.save_progress()  # marks the folder as this job's before any shard lands in it
        ranges = job.source.shard_ranges(job.samples_per_shard, num_items)
        tasks = [
            ShardTask(index, str(record.shard_path(index)), ranges[index], job.prep, job.expected_size_px)
            for index in range(record.num_shards) if index not in record.done
        ]
        _write_tasks(job, record, tasks, done_items=sum(ranges[index].count for index in record.done))
        write_json_atomic(out_dir / MANIFEST_NAME, record.manifest())
        # The manifest now says everything the progress file did (see shard_progress).
        record.progress_path.unlink(missing_ok=True)
        return _summary(record, job, len(tasks), kept, start_s)
    except READ_ERRORS as exc:  # the progress file, the manifest or the key scan
        raise ShardWriteError(f"writing into {out_dir} failed: {exc}") from exc
    finally:
        os.close(lock_fd)


def write_one_shard(task: ShardTask, on_image: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write shard ``task.index``; return its progress entry. Runs in a worker process.

    Unreadable images are skipped and listed; any other error aborts the shard (its ``.tmp``
    is deleted) and propagates.
    """
    global _IN_TASK
    count_image = on_image or _count_image_in_worker
    _check_worker_may_continue()
    _IN_TASK = True
    writer = ShardInProgress(Path(task.final_path))
    stats = _ShardStats(task.expected_size_px)
    try:
        for item in read_items(task.items):
            _check_worker_may_continue()
            try:
                if item.error is not None:
                    raise UnreadableImage(item.error)
                prepared = prepare_image(item.data or b"", task.prep)
            except UnreadableImage as exc:
                stats.skipped.append({"index": item.index, "source": item.label, "reason": str(exc)})
            else:
                label_bytes = item.label.encode("utf-8", "surrogateescape")
                writer.write(KEY_FORMAT.format(item.index), prepared.data, prepared.ext,
                             extras={SOURCE_ENTRY_EXT: label_bytes})
                stats.add_written(item.label, prepared)
            count_image()
        entry = writer.finish()
    except BaseException as exc:
        writer.abort()
        if isinstance(exc, _ParentGone):
            os._exit(1)  # nobody is left to report to; the .tmp is already gone
        raise
    finally:
        _IN_TASK = False
    return {**entry, **stats.entry_fields()}


@dataclass
class _ShardStats:
    """What one shard records besides its file: skipped images, resolution, size surprises."""

    expected_size_px: tuple[int, int] | None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    # Side of each stored image if square, None if not: one value means a uniform shard.
    sides_px: set[int | None] = field(default_factory=set)
    size_mismatches: list[str] = field(default_factory=list)

    def add_written(self, label: str, prepared: PreparedImage) -> None:
        width, height = prepared.size_px
        self.sides_px.add(width if width == height else None)
        if self.expected_size_px and prepared.source_size_px != self.expected_size_px:
            source_width, source_height = prepared.source_size_px
            self.size_mismatches.append(f"{label} is {source_width}x{source_height}")

    def entry_fields(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "resolution_px": next(iter(self.sides_px)) if len(self.sides_px) == 1 else None,
            "num_size_mismatches": len(self.size_mismatches),
            "size_mismatch_examples": self.size_mismatches[:_MAX_SIZE_EXAMPLES],
        }


# --- main process --------------------------------------------------------------------------

def _create_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShardInputError(f"cannot create --out folder {out_dir}: {exc}") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ShardInputError(f"--out folder {out_dir} is not writable")


def _check_first_images(job: ShardJob) -> None:
    """Refuse a source none of whose first images can be read, before writing anything."""
    reasons = []
    for item in read_items(job.source.head_range(HEAD_CHECK_IMAGES)):
        if item.error is None:
            try:
                prepare_image(item.data or b"", job.prep)
                return
            except UnreadableImage as exc:
                reasons.append(f"{item.label}: {exc}")
        else:
            reasons.append(f"{item.label}: {item.error}")
    what = "an image database" if job.source.kind == "lmdb" else "a folder of images"
    raise ShardInputError(
        f"source {job.source.root} is not {what}: none of its first {len(reasons)} entries can be "
        f"read as an image (first: {reasons[0]})"
    )


def _write_tasks(job: ShardJob, record: JobRecord, tasks: list[ShardTask], done_items: int) -> None:
    total_items = sum(task.items.count for task in tasks) + done_items
    bar = tqdm(total=total_items, initial=done_items, unit="img", disable=not job.show_progress,
               desc=f"{job.name} shards", dynamic_ncols=True, smoothing=0.05)

    def on_done(task: ShardTask, entry: dict[str, Any]) -> None:
        record.done[task.index] = entry
        record.save_progress()
        bar.set_postfix_str(f"{len(record.done)}/{record.num_shards} shards", refresh=False)

    try:
        if job.workers == 1 or len(tasks) <= 1:
            for task in tasks:
                on_done(task, _run_in_process(task, lambda: bar.update(1)))
        else:
            _run_in_pool(tasks, min(job.workers, len(tasks)), bar, on_done)
    except BaseException:
        # Workers delete their own .tmp when they abort; this also covers one killed mid-write.
        for task in tasks:
            Path(task.final_path + ".tmp").unlink(missing_ok=True)
        raise
    finally:
        bar.close()


def _run_in_process(task: ShardTask, on_image: Callable[[], None]) -> dict[str, Any]:
    try:
        return write_one_shard(task, on_image)
    except _WRITE_ERRORS as exc:
        raise ShardWriteError(f"writing {task.final_path} failed: {exc}") from exc


def _run_in_pool(
    tasks: list[ShardTask],
    workers: int,
    bar: tqdm,
    on_done: Callable[[ShardTask, dict[str, Any]], None],
) -> None:
    context = multiprocessing.get_context("spawn")
    counter = context.Value("q", 0)
    stop = context.Event()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(counter, stop, os.getpid()))
    try:
        pending: dict[Future[dict[str, Any]], ShardTask] = {pool.submit(write_one_shard, t): t for t in tasks}
        shown = 0
        while pending:
            finished, _ = wait(pending, timeout=_POLL_S, return_when=FIRST_COMPLETED)
            images_done = counter.value
            bar.update(images_done - shown)
            shown = images_done
            for future in finished:
                task = pending.pop(future)
                try:
                    entry = future.result()
                except _WRITE_ERRORS as exc:
                    raise ShardWriteError(f"writing {task.final_path} failed: {exc}") from exc
                on_done(task, entry)
    except BaseException:
        stop.set()  # running shards abort at their next image; queued ones do not start
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _summary(
    record: JobRecord, job: ShardJob, written: int, kept: int, start_s: float, already_complete: bool = False
) -> ShardJobSummary:
    entries = [record.done[index] for index in range(record.num_shards)]
    warnings = []
    mismatches = sum(entry.get("num_size_mismatches", 0) for entry in entries)
    if job.expected_size_px and mismatches:
        examples = [ex for entry in entries for ex in entry.get("size_mismatch_examples", [])]
        examples = examples[:_MAX_SIZE_EXAMPLES]
        width, height = job.expected_size_px
        warnings.append(f"{mismatches} source image(s) are not {width}x{height} (e.g. {'; '.join(examples)})")
    num_skipped = sum(len(entry["skipped"]) for entry in entries)
    num_samples = sum(entry["num_samples"] for entry in entries)
    if num_samples == 0:
        warnings.append(f"none of the {num_skipped} source images could be read; the shards are empty")
    elif num_skipped:
        warnings.append(f"skipped {num_skipped} unreadable image(s); they are listed in "
                        f"{record.out_dir / MANIFEST_NAME} under 'skipped'")
    return ShardJobSummary(
        out_dir=record.out_dir,
        num_shards=record.num_shards,
        num_shards_written=written,
        num_shards_kept=kept,
        num_samples=num_samples,
        num_skipped=num_skipped,
        elapsed_s=time.perf_counter() - start_s,
        already_complete=already_complete,
        warnings=warnings,
    )


# --- worker processes ------------------------------------------------------------------------

class _Stopped(Exception):
    """The main process asked the workers to stop (it was interrupted or a shard failed)."""


class _ParentGone(Exception):
    """The main process died (kill -9); finishing the shard would serve nobody."""


_COUNTER: Any = None
_STOP: multiprocessing.synchronize.Event | None = None
_PARENT_PID: int | None = None
_IN_TASK = False


def _init_worker(counter: Any, stop: multiprocessing.synchronize.Event, parent_pid: int) -> None:
    global _COUNTER, _STOP, _PARENT_PID
    _COUNTER, _STOP, _PARENT_PID = counter, stop, parent_pid
    signal.signal(signal.SIGINT, _on_sigint)


def _on_sigint(signum: int, frame: Any) -> None:
    # Ctrl-C reaches every process of the terminal's group. Inside a shard it aborts that
    # shard; between shards it is ignored, so an idle worker does not die with a traceback
    # while the main process shuts the pool down cleanly.
    if _IN_TASK:
        raise KeyboardInterrupt


def _check_worker_may_continue() -> None:
    if _STOP is not None and _STOP.is_set():
        raise _Stopped("stopped by the main process")
    if _PARENT_PID is not None and os.getppid() != _PARENT_PID:
        raise _ParentGone


def _count_image_in_worker() -> None:
    if _COUNTER is not None:
        with _COUNTER.get_lock():
            _COUNTER.value += 1

