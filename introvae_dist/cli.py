"""The ``introvae-dist`` command: one entry point, one subcommand per user task.

    introvae-dist shards folder   SRC --out DIR [options]   # any folder of jpg/png/webp
    introvae-dist shards lmdb     SRC --out DIR [options]   # LSUN's lmdb export
    introvae-dist shards celebahq SRC --out DIR [options]   # the 30,000 CelebA-HQ images
    introvae-dist export CHECKPOINT --out FILE.safetensors   # fp32 weights of E and G for inference

Also runnable as ``python -m introvae_dist.cli``. Later commands (``sample``, ``evaluate``)
are siblings of ``shards`` and ``export``: an ``_add_<name>_command(commands)`` that registers
a parser whose ``run`` default takes the parsed arguments and returns the exit status.
Commands that need torch import it inside their ``run``, so ``shards`` starts without it.

Exit status: 0 done; 1 writing failed (finished shards are kept; export leaves no file);
2 bad input, reported in one line on stderr naming the path or option; 130 interrupted by
Ctrl-C (this run's ``.tmp`` files removed, finished shards kept).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from introvae_dist.data.image_prep import DEFAULT_JPEG_QUALITY, OUTPUT_FORMATS, ImagePrep
from introvae_dist.data.shard_job import ShardJob, ShardJobSummary, ShardWriteError, run_shard_job
from introvae_dist.data.shard_writer import MANIFEST_NAME, SHARD_NAME_PATTERN, ShardInputError
from introvae_dist.data.sources import FOLDER_EXTENSIONS, SourceKind, open_source

PROG = "introvae-dist"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
# One process per core up to 8: beyond that the source disk, not the CPU, is usually the limit.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class _SourceCommand:
    """One ``shards`` subcommand: a source kind and its defaults."""

    kind: SourceKind
    summary: str
    src_help: str
    default_name: str
    # Chosen for shards of roughly 100-300 MB at the usual settings, and for enough shards
    # that every loader stream (ranks x workers) gets several; see docs/DATA.md.
    default_samples_per_shard: int
    expected_count: int | None = None
    expected_size_px: tuple[int, int] | None = None


_SOURCE_COMMANDS = (
    _SourceCommand(
        "folder", "a folder of images, searched recursively",
        f"folder of {'/'.join(ext[1:] for ext in FOLDER_EXTENSIONS)} images (any letter case), searched "
        "recursively; order: sorted relative paths",
        default_name="images", default_samples_per_shard=1000,
    ),
    _SourceCommand(
        "lmdb", "an LSUN lmdb export (keys: image ids, values: webp/jpeg bytes)",
        "lmdb environment folder holding data.mdb (e.g. bedroom_train_lmdb), or the data.mdb file; "
        "order: lmdb key order",
        default_name="lsun", default_samples_per_shard=5000,
    ),
    _SourceCommand(
        "celebahq", "the 30,000 CelebA-HQ 1024x1024 images",
        "folder of the CelebA-HQ images (00000.jpg ... 29999.jpg, or png); order: natural "
        "(2.jpg before 10.jpg); warns if there are not 30,000 or some are not 1024x1024",
        default_name="celebahq", default_samples_per_shard=300,
        expected_count=30_000, expected_size_px=(1024, 1024),
    ),
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2), not two."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="IntroVAE trainer tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_shards_command(commands)
    _add_export_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except ShardInputError as exc:
        _say("error", str(exc))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _say("interrupted", _resume_hint(args))
        return EXIT_INTERRUPTED


# --- introvae-dist shards --------------------------------------------------------------------

def _add_shards_command(commands: argparse._SubParsersAction) -> None:
    shards = commands.add_parser(
        "shards", help="write an image source into WebDataset tar shards + manifest.json",
        description="Write an image source into WebDataset tar shards NAME-%06d.tar and a "
        "manifest.json, in parallel and resumably (re-run the same command after an interruption).",
    )
    sources = shards.add_subparsers(dest="source", metavar="SOURCE", required=True)
    for command in _SOURCE_COMMANDS:
        _add_source_command(sources, command)


def _add_source_command(sources: argparse._SubParsersAction, command: _SourceCommand) -> None:
    parser = sources.add_parser(
        command.kind, help=command.summary,
        description=f"Write {command.summary} into WebDataset tar shards. Without --center-crop, "
        "--resize-px and --format the source bytes are stored as they are (--keep-original); "
        "with any of them every image is decoded and re-encoded.",
    )
    parser.set_defaults(run=_run_shards, command_spec=command)
    parser.add_argument("src", type=Path, metavar="SRC", help=command.src_help)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder for the shards and manifest.json (created if missing)")
    parser.add_argument("--name", default=command.default_name,
                        help="shard file prefix: shards are NAME-%%06d.tar (default: %(default)s)")
    parser.add_argument("--samples-per-shard", type=_positive_int, metavar="N",
                        default=command.default_samples_per_shard,
                        help="source images per shard: shard i holds images [i*N, (i+1)*N) of the "
                        "source order, minus unreadable ones (default: %(default)s)")
    crop_resize = parser.add_argument_group("re-encoding (decode, transform, encode again)")
    crop_resize.add_argument("--center-crop", action="store_true",
                             help="crop the centred square of side min(width, height)")
    crop_resize.add_argument("--resize-px", type=_positive_int, metavar="N",
                             help="resize with Lanczos so the shorter side is N (NxN after --center-crop; "
                             "aspect ratio kept without it)")
    crop_resize.add_argument("--format", choices=OUTPUT_FORMATS,
                             help="encoding of re-encoded images (default: jpeg)")
    crop_resize.add_argument("--jpeg-quality", type=_int_in(1, 100), metavar="Q",
                             help=f"JPEG quality 1-100 (default: {DEFAULT_JPEG_QUALITY})")
    crop_resize.add_argument("--keep-original", action="store_true",
                             help="store the source bytes untouched (the default when none of the options "
                             "above is given; an error together with them)")
    run = parser.add_argument_group("running")
    run.add_argument("--workers", type=_positive_int, default=DEFAULT_WORKERS, metavar="N",
                     help="processes writing shards in parallel; the output does not depend on it "
                     "(default: min(8, CPUs) = %(default)s)")
    run.add_argument("--limit", type=_positive_int, metavar="N",
                     help="use only the first N source images (for a quick try)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_shards(args: argparse.Namespace) -> int:
    command: _SourceCommand = args.command_spec
    if not SHARD_NAME_PATTERN.match(args.name):
        raise ShardInputError(f"--name must match {SHARD_NAME_PATTERN.pattern}, got {args.name!r}")
    prep = _image_prep(args)
    source = open_source(command.kind, args.src)
    if command.expected_count is not None and source.num_items != command.expected_count:
        _say("warning", f"{source.root} holds {source.num_items} images; {command.kind} has "
                        f"{command.expected_count:,} (writing them anyway)")
    job = ShardJob(
        source=source,
        out_dir=args.out,
        name=args.name,
        samples_per_shard=args.samples_per_shard,
        prep=prep,
        limit=args.limit,
        workers=args.workers,
        show_progress=not args.no_progress,
        expected_size_px=command.expected_size_px,
    )
    try:
        summary = run_shard_job(job)
    except ShardWriteError as exc:
        _say("error", f"{str(exc).rstrip('.')}; {_resume_hint(args)}")
        return EXIT_FAILED
    for warning in summary.warnings:
        _say("warning", warning)
    print(_summary_line(summary))
    return EXIT_OK


def _image_prep(args: argparse.Namespace) -> ImagePrep:
    """The rule: --keep-original unless --center-crop, --resize-px or --format asks to re-encode."""
    reencode_options = [
        option for option, given in (
            ("--center-crop", args.center_crop),
            ("--resize-px", args.resize_px is not None),
            ("--format", args.format is not None),
        ) if given
    ]
    if args.keep_original and (reencode_options or args.jpeg_quality is not None):
        given = reencode_options + (["--jpeg-quality"] if args.jpeg_quality is not None else [])
        raise ShardInputError(f"--keep-original stores the source bytes untouched; it cannot be combined "
                              f"with {', '.join(given)}")
    if not reencode_options:
        if args.jpeg_quality is not None:
            raise ShardInputError("--jpeg-quality applies only when re-encoding (with --center-crop, "
                                  "--resize-px or --format jpeg); without them the source bytes are kept")
        return ImagePrep(keep_original=True)
    output_format = args.format or "jpeg"
    if output_format == "png" and args.jpeg_quality is not None:
        raise ShardInputError("--jpeg-quality does not apply to --format png")
    return ImagePrep(
        keep_original=False,
        center_crop=args.center_crop,
        resize_px=args.resize_px,
        format=output_format,
        jpeg_quality=args.jpeg_quality if args.jpeg_quality is not None else DEFAULT_JPEG_QUALITY,
    )


def _summary_line(summary: ShardJobSummary) -> str:
    counts = f"{summary.num_samples} images in {summary.num_shards} shards"
    if summary.already_complete:
        return f"{summary.out_dir}: already complete ({counts}); nothing to do"
    kept = f", {summary.num_shards_kept} kept from an earlier run" if summary.num_shards_kept else ""
    return (f"{summary.out_dir}: {counts} ({summary.num_shards_written} written now{kept}; "
            f"{summary.num_skipped} skipped) and {MANIFEST_NAME} in {summary.elapsed_s:.1f} s")


def _resume_hint(args: argparse.Namespace) -> str:
    out = getattr(args, "out", None)
    if out is None or args.command != "shards":
        return "nothing was written"
    return f"finished shards are kept in {out}: re-run the same command to resume"


# --- introvae-dist export --------------------------------------------------------------------

def _add_export_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export", help="write a checkpoint's fp32 weights of E and G into one safetensors file",
        description="Consolidate a training checkpoint (any ZeRO stage, any number of ranks, bf16 or "
        "fp32) into one safetensors file for inference: the fp32 weights and BatchNorm statistics of "
        "the encoder and the generator, and the model config in the file's metadata. Load it with "
        "introvae_dist.weights.load_exported (needs torch and safetensors only).",
    )
    parser.set_defaults(run=_run_export)
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                        help="a checkpoint folder RUN/checkpoints/step_NNNNNNNN/ (complete: with MANIFEST.json "
                        "or COMPLETE)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="the .safetensors file to write (its folder is created if missing)")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")


def _run_export(args: argparse.Namespace) -> int:
    from introvae_dist.export import ExportError, export_checkpoint  # imports torch
    from introvae_dist.weights import build_models, read_info

    try:
        out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    except ExportError as exc:
        _say("error", str(exc))
        return EXIT_BAD_INPUT
    except OSError as exc:
        _say("error", f"writing {args.out} failed ({exc.strerror or exc}); nothing was written")
        return EXIT_FAILED
    info = read_info(out)
    encoder, generator = build_models(info.model, "meta")
    counts = [sum(p.numel() for p in net.parameters()) for net in (encoder, generator)]
    m = info.model
    print(f"{out}: {_size(out.stat().st_size)}, encoder {counts[0]:,} + generator {counts[1]:,} parameters "
          f"(fp32, {m.resolution_px} px, latent {m.latent_dim}) from step {info.step:,} "
          f"({info.images_seen:,} images seen)")
    return EXIT_OK


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"


# --- shared helpers --------------------------------------------------------------------------

def _say(kind: str, message: str) -> None:
    print(f"{PROG}: {kind}: {message}", file=sys.stderr, flush=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {text!r}")
        return value
    return parse


if __name__ == "__main__":
    sys.exit(main())
