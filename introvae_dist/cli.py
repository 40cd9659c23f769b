"""The ``introvae-dist`` command: one entry point, one subcommand per user task.

    introvae-dist shards folder   SRC --out DIR [options]   # any folder of jpg/png/webp
    introvae-dist shards lmdb     SRC --out DIR [options]   # LSUN's lmdb export
    introvae-dist shards celebahq SRC --out DIR [options]   # the 30,000 CelebA-HQ images
    introvae-dist export CHECKPOINT --out FILE.safetensors   # fp32 weights of E and G for inference
    introvae-dist sample SOURCE --grid FILE.png               # seeded samples: PNGs, a grid or shards
    introvae-dist reconstruct SOURCE IMAGES... --out FILE.png # input | reconstruction pairs
    introvae-dist interpolate SOURCE A B [C...] --out FILE.png  # latent strips as the paper's Fig. 6
    introvae-dist evaluate SOURCE --real SHARDS [--heldout SHARDS]  # FID, MS-SSIM, RMSE/PSNR, sharpness -> eval.jsonl
    introvae-dist plot RUN [--out FILE.png]                   # training curves as the paper's Fig. 5

SOURCE is an exported weights file, a checkpoint step folder or a run folder (its newest
complete checkpoint); docs/EVALUATION.md has the protocols. ``sample`` and ``evaluate`` split
their work over all ranks when started by a launcher (``torchrun ... -m introvae_dist.cli``).

Also runnable as ``python -m introvae_dist.cli``. Each command is an
``_add_<name>_command(commands)`` that registers a parser whose ``run`` default takes the
parsed arguments and returns the exit status. Commands that need torch import it inside their
``run``, so ``shards`` starts without it.

Exit status: 0 done; 1 writing failed (finished shards are kept; export leaves no file);
2 bad input, reported in one line on stderr naming the path or option; 130 interrupted by
Ctrl-C (this run's ``.tmp`` files removed, finished shards kept).
"""

from __future__ import annotations

import argparse
import math
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
from introvae_dist.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK

PROG = "introvae-dist"
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
    # The deepspeed launcher passes --local_rank=N before the command; the rank comes from the
    # environment (introvae_dist.distributed), so the option is accepted and ignored.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_shards_command(commands)
    _add_export_command(commands)
    _add_sample_command(commands)
    _add_reconstruct_command(commands)
    _add_interpolate_command(commands)
    _add_evaluate_command(commands)
    _add_plot_command(commands)
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
        "the encoder and the generator, their moving average where the run kept one (ema.*; loaded by "
        "default, --raw-weights for the others), and the model config in the file's metadata. Load it with "
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
    from introvae_dist.models import build_networks
    from introvae_dist.weights import read_info

    try:
        out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    except ExportError as exc:
        _say("error", str(exc))
        return EXIT_BAD_INPUT
    except OSError as exc:
        _say("error", f"writing {args.out} failed ({exc.strerror or exc}); nothing was written")
        return EXIT_FAILED
    info = read_info(out)
    encoder, generator = build_networks(info.model, "meta")
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


# --- using a trained model: sample, reconstruct, interpolate, evaluate -----------------------

_SOURCE_HELP = ("an exported weights file (introvae-dist export), a checkpoint folder RUN/checkpoints/step_NNNNNNNN, "
                "or a run folder (its newest complete checkpoint)")


def _add_model_arguments(parser: argparse.ArgumentParser, batch: int) -> None:
    parser.add_argument("source", type=Path, metavar="SOURCE", help=_SOURCE_HELP)
    run = parser.add_argument_group("running")
    run.add_argument("--batch", type=_positive_int, default=batch, metavar="N",
                     help="images per forward pass on each rank (default: %(default)s)")
    run.add_argument("--device", metavar="DEVICE",
                     help="torch device, e.g. cpu or cuda:1 (default: this rank's GPU if there is one, else cpu)")
    parser.add_argument("--raw-weights", action="store_true",
                        help="use the networks' own weights, not their moving average (ema.*), which is the "
                             "default where the source has one")


def _weights_choice(args: argparse.Namespace) -> str:
    return "raw" if args.raw_weights else "ema"


def _run_with_models(args: argparse.Namespace, body: Callable[[argparse.Namespace], int]) -> int:
    """Run ``body``, turning bad input (paths, images, shards, weights) into exit status 2."""
    from introvae_dist.data.image_inputs import ImageInputError
    from introvae_dist.data.shard_set import DataError
    from introvae_dist.evaluation import EvaluationInputError
    from introvae_dist.inference import ModelSourceError
    from introvae_dist.rank_work import DeviceError

    try:
        return body(args)
    except (ModelSourceError, ImageInputError, EvaluationInputError, DataError, DeviceError) as exc:
        _say("error", str(exc))
        return EXIT_BAD_INPUT


def _check_output_file(path: Path, option: str) -> None:
    if path.is_dir():
        raise ShardInputError(f"{option} {path}: is a folder; give a file path such as {path / 'out.png'}")


def _check_output_folder(path: Path, option: str) -> None:
    if path.exists() and not path.is_dir():
        raise ShardInputError(f"{option} {path}: exists and is not a folder")


def _add_sample_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sample", help="draw seeded samples: PNG files, one grid, or WebDataset shards",
        description="Decode N latents z_i ~ N(0, I) with the generator. Image i uses a latent seeded by "
        "(--seed, i), and is computed in the batch [kB, (k+1)B) that holds it, so the same seed, --batch and "
        "thread count give the same images bit for bit on any number of ranks. Under a launcher (torchrun, "
        "deepspeed --module) every rank draws a contiguous share.",
    )
    parser.set_defaults(run=lambda args: _run_with_models(args, _run_sample))
    _add_model_arguments(parser, batch=32)
    parser.add_argument("-n", "--num-images", type=_positive_int, default=64, metavar="N",
                        help="images 0..N-1 of the seed (default: %(default)s)")
    parser.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=0, help="(default: %(default)s)")
    parser.add_argument("--temperature", type=_positive_float, default=1.0, metavar="T",
                        help="decode z ~ N(0, T^2 I): below 1, more typical and less varied samples (default: %(default)s)")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, metavar="DIR", help="write DIR/sample_NNNNNNNN.png, one PNG per image")
    out.add_argument("--grid", type=Path, metavar="FILE", help="write one PNG grid of all N images")
    out.add_argument("--shards", type=Path, metavar="DIR",
                     help="write WebDataset shards NAME-%%06d.tar of PNGs (keys: image index) and manifest.json, "
                     "readable by training and by evaluate --real")
    parser.add_argument("--grid-columns", type=_positive_int, metavar="C", help="images per grid row (default: ~sqrt(N))")
    parser.add_argument("--samples-per-shard", type=_positive_int, default=1000, metavar="N",
                        help="with --shards (default: %(default)s)")
    parser.add_argument("--name", default="samples", help="with --shards: shard file prefix (default: %(default)s)")


def _run_sample(args: argparse.Namespace) -> int:
    import math

    from introvae_dist.data.shard_writer import SHARD_NAME_PATTERN
    from introvae_dist.inference import find_source, load_models
    from introvae_dist.rank_work import Workers
    from introvae_dist import sampling

    source = find_source(args.source)
    if args.grid is not None:
        _check_output_file(args.grid, "--grid")
    for option, folder in (("--out", args.out), ("--shards", args.shards)):
        if folder is not None:
            _check_output_folder(folder, option)
    if args.shards is not None and not SHARD_NAME_PATTERN.match(args.name):
        raise ShardInputError(f"--name must match {SHARD_NAME_PATTERN.pattern}, got {args.name!r}")
    workers = Workers.from_env(args.device)
    try:
        models = load_models(source, workers.device, _weights_choice(args))
        job = sampling.SampleJob(models.generator, args.num_images, args.seed, args.batch, workers, args.temperature)
        if args.grid is not None:
            columns = args.grid_columns or math.ceil(math.sqrt(args.num_images))
            sampling.write_grid(job, args.grid, columns)
            written = f"{args.grid}: a grid of {args.num_images} samples"
        elif args.out is not None:
            sampling.write_pngs(job, args.out)
            written = f"{args.out}: {args.num_images} PNGs sample_00000000.png ..."
        else:
            shards = sampling.write_shards(job, args.shards, args.name, args.samples_per_shard, source)
            written = f"{args.shards}: {args.num_images} samples in {shards} shard(s) and manifest.json"
        if workers.is_main:
            print(f"{written} (seed {args.seed}, {workers.world.world_size} rank(s)) from {source.describe()}, "
                  f"{models.weights()}" + (f", temperature {args.temperature:g}" if args.temperature != 1 else ""))
    finally:
        workers.close()
    return EXIT_OK


def _add_reconstruct_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "reconstruct", help="write input | reconstruction pairs of real images as one PNG grid",
        description="Encode real images and decode them again: G(mu) by default, or G(mu + sigma * eps) with "
        "--stochastic (eps of image i seeded by (--seed, i)). Images are centre-cropped and resized to the "
        "model's side as training decodes them; smaller images are refused. Runs in one process (under a "
        "launcher, rank 0 does the work).",
    )
    parser.set_defaults(run=lambda args: _run_with_models(args, _run_reconstruct))
    _add_model_arguments(parser, batch=32)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders of images (recursive, sorted), or shards (a .tar, a shard "
                        "folder or manifest.json, a brace pattern); read in the order given")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="the PNG grid to write")
    parser.add_argument("-n", "--num-images", type=_positive_int, default=16, metavar="N",
                        help="the first N images of the inputs (default: %(default)s)")
    parser.add_argument("--stochastic", action="store_true", help="decode a sampled z instead of mu")
    parser.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=0, help="with --stochastic (default: %(default)s)")
    parser.add_argument("--pairs-per-row", type=_positive_int, default=4, metavar="K", help="(default: %(default)s)")


def _run_reconstruct(args: argparse.Namespace) -> int:
    from introvae_dist.images import save_grid
    from introvae_dist.inference import reconstruct

    if not _is_main_rank():
        return EXIT_OK
    models, images, _, device = _models_and_images(args, args.num_images)
    rec = reconstruct(models, images, device, args.batch, stochastic=args.stochastic, seed=args.seed)
    pairs = _interleave(images, rec)
    k = 2 * args.pairs_per_row
    save_grid([pairs[i:i + k] for i in range(0, pairs.shape[0], k)], args.out)
    how = f"stochastic, seed {args.seed}" if args.stochastic else "from mu"
    print(f"{args.out}: {images.shape[0]} input | reconstruction ({how}) pairs from {models.source.describe()}, {models.weights()}")
    return EXIT_OK


def _is_main_rank() -> bool:
    """reconstruct and interpolate run in one process: under a launcher only rank 0 works."""
    from introvae_dist.distributed import world_from_env

    return world_from_env().is_main


def _models_and_images(args: argparse.Namespace, limit: int | None):  # -> (Models, images, labels, device)
    """Check --out, read SOURCE's model config, the input images at its side, then the weights."""
    from introvae_dist.data.image_inputs import read_image_inputs
    from introvae_dist.inference import find_source, load_models

    _check_output_file(args.out, "--out")
    source = find_source(args.source)
    images, labels = read_image_inputs(args.inputs, source.model.resolution_px, limit)
    device = args.device or _default_device()
    return load_models(source, device, _weights_choice(args)), images, labels, device


def _interleave(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":  # noqa: F821 (torch imported lazily)
    """(N, ...) and (N, ...) -> (2N, ...) as a0, b0, a1, b1, ..."""
    import torch

    return torch.stack([a, b], dim=1).flatten(0, 1)


def _add_interpolate_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "interpolate", help="latent interpolation strips between real images (the paper's Fig. 6)",
        description="For each consecutive pair of input images a, b: one row real a | G(mu_a) | "
        "interpolations | G(mu_b) | real b. The ends next to the real images are their reconstructions from "
        "mu, the images `reconstruct` draws. Runs in one process (under a launcher, rank 0 does the work).",
    )
    parser.set_defaults(run=lambda args: _run_with_models(args, _run_interpolate))
    _add_model_arguments(parser, batch=32)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE",
                        help="two or more images (files, folders or shards as for reconstruct), in order")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="the PNG to write")
    parser.add_argument("--steps", type=_int_in(2, 1000), default=8, metavar="K",
                        help="latent codes per strip from mu_a to mu_b, both included (default: %(default)s)")
    parser.add_argument("--mode", choices=("linear", "slerp"), default="linear",
                        help="linear as the paper, or spherical (default: %(default)s)")


def _run_interpolate(args: argparse.Namespace) -> int:
    from introvae_dist.data.image_inputs import ImageInputError
    from introvae_dist.images import save_grid
    from introvae_dist.inference import interpolation_strips

    if not _is_main_rank():
        return EXIT_OK
    models, images, labels, device = _models_and_images(args, None)
    if images.shape[0] < 2:
        raise ImageInputError(f"interpolate needs two or more images, got {images.shape[0]} ({', '.join(labels)})")
    strips = interpolation_strips(models, images, args.steps, args.mode, device, args.batch)
    save_grid(strips, args.out)
    print(f"{args.out}: {len(strips)} strip(s) of {args.steps} {args.mode} steps between {images.shape[0]} images "
          f"from {models.source.describe()}, {models.weights()}")
    return EXIT_OK


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_evaluate_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate", help="FID, MS-SSIM, reconstruction RMSE/PSNR and sharpness, appended as a JSON line",
        description="FID of --num-images samples against the first --num-real images of --real (statistics of "
        "the real set cached by content hash in --cache), MS-SSIM over --ms-ssim-pairs pairs of samples as PGGAN "
        "computes it, RMSE/PSNR of reconstructions of --heldout, and sharpness (variance of the Laplacian, share of "
        "spectral power above half Nyquist) of the --num-images samples and of the first --num-real images of --real. "
        "Under a launcher (torchrun, deepspeed --module) the work is split over all ranks. Results are appended to "
        "RUN/eval.jsonl (or --out). "
        "docs/EVALUATION.md has the protocols.",
    )
    parser.set_defaults(run=lambda args: _run_with_models(args, _run_evaluate))
    _add_model_arguments(parser, batch=32)
    parser.add_argument("--metrics", metavar="LIST",
                        help="comma-separated, of fid, ms_ssim, rmse, sharpness (default: fid,ms_ssim, and rmse with "
                        "--heldout)")
    data = parser.add_argument_group("data")
    data.add_argument("--real", metavar="SHARDS",
                      help="FID's and sharpness's real images: a shard folder, manifest.json, pattern")
    data.add_argument("--num-real", type=_positive_int, default=50_000, metavar="N",
                      help="use the first N real images, or all if fewer (default: %(default)s)")
    data.add_argument("--heldout", metavar="SHARDS", help="held-out real images for RMSE/PSNR")
    data.add_argument("--num-heldout", type=_positive_int, metavar="N", help="the first N held-out images (default: all)")
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--num-images", type=_positive_int, default=50_000, metavar="N",
                          help="generated images for FID and sharpness (default: %(default)s, the paper's for FID)")
    protocol.add_argument("--ms-ssim-pairs", type=_positive_int, default=10_000, metavar="N",
                          help="pairs of samples for MS-SSIM (default: %(default)s, the paper's)")
    protocol.add_argument("--ms-ssim-px", type=_positive_int, default=128, metavar="PX",
                          help="side at which MS-SSIM is measured; larger samples are box-downsampled "
                          "(default: %(default)s, the paper's)")
    protocol.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=0, help="samples of this seed (default: %(default)s)")
    files = parser.add_argument_group("files")
    files.add_argument("--inception", type=Path, metavar="PATH",
                       help="the FID Inception weights pt_inception-2015-12-05-6726825d.pth (default: "
                       "$INTROVAE_DIST_INCEPTION); see docs/EVALUATION.md")
    files.add_argument("--cache", type=Path, metavar="DIR",
                       help="cache of real-set statistics (default: $INTROVAE_DIST_CACHE/fid-stats or "
                       "~/.cache/introvae-dist/fid-stats)")
    files.add_argument("--out", type=Path, metavar="FILE",
                       help="JSON-lines file to append to (default: RUN/eval.jsonl; eval.jsonl next to a weights file)")


def _run_evaluate(args: argparse.Namespace) -> int:
    import time

    from introvae_dist import evaluation
    from introvae_dist.inference import find_source, load_models
    from introvae_dist.metrics.inception import STANDARD_ID
    from introvae_dist.rank_work import Workers

    source = find_source(args.source)
    metrics = (args.metrics.split(",") if args.metrics else ["fid", "ms_ssim"] + (["rmse"] if args.heldout else []))
    settings = {"num_generated": args.num_images, "ms_ssim_pairs": args.ms_ssim_pairs, "ms_ssim_px": args.ms_ssim_px,
                "num_real": args.num_real, "num_heldout": args.num_heldout, "seed": args.seed, "batch": args.batch}
    if args.cache is not None:
        settings["cache_dir"] = args.cache
    plan = evaluation.plan_evaluation([m.strip() for m in metrics], source.model.resolution_px, real=args.real,
                                      heldout=args.heldout, **settings)
    out = args.out or (source.run_dir or source.path.parent) / evaluation.EVAL_LOG_NAME
    _check_output_file(out, "--out")
    features = evaluation.load_inception(args.inception, "cpu") if "fid" in plan.metrics else None
    try:  # the last check, before hours of work rather than after them
        out.parent.mkdir(parents=True, exist_ok=True)
        out.open("a").close()
    except OSError as exc:
        raise ShardInputError(f"{out}: cannot append the results there ({exc.strerror or exc})") from None
    workers = Workers.from_env(args.device)
    try:
        if features is not None:
            features.extract.to(workers.device)  # type: ignore[attr-defined]
            if features.id != STANDARD_ID and workers.is_main:
                _say("warning", f"{features.id}: not the standard FID Inception weights; these FIDs are not "
                                "comparable with published ones")
        models = load_models(source, workers.device, _weights_choice(args))
        figures = evaluation.evaluate(models.encoder, models.generator, plan, workers, features)
        if workers.is_main and figures is not None:
            record = {"source": str(source.path), "step": source.step, "images_seen": source.images_seen,
                      "resolution_px": source.model.resolution_px, "weights": models.weights(), **figures,
                      "time": time.time()}
            evaluation.append_record(out, record)
            print(f"{evaluation.summary(record)} ({models.weights()}); appended to {out}")
    finally:
        workers.close()
    return EXIT_OK


# --- introvae-dist plot ----------------------------------------------------------------------

def _add_plot_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plot", help="draw a run's training curves as the paper's Fig. 5 (a PNG)",
        description="Draw RUN/metrics.jsonl as the paper's Fig. 5: the KL of real images, reconstructions and "
        "samples as E sees them (its update, Eq. 11) and as G sees them (Eq. 12) against the margin m, and L_AE, "
        "with the VAE warm-up shaded; each curve a moving average, its raw values faint behind. Healthy: KL real "
        "settles below m while the KL of reconstructions and samples hovers around it (Theorem 1). A Soft-IntroVAE "
        "run has no m: its panels show rec_err in place of L_AE and E's exp(-2 s ELBO) of x_r and x_p. The trainer "
        "keeps RUN/curves.png up to date at every sample grid; this draws it at any time, also for a finished run.",
    )
    parser.set_defaults(run=_run_plot)
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a run folder holding metrics.jsonl (runs/NAME)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="the PNG to write (default: RUN/curves.png)")
    parser.add_argument("--smoothing-steps", type=_positive_int, metavar="N",
                        help="moving-average window in steps; 1: raw values (default: about 1/50 of the run's "
                        "steps, at least 1)")


def _run_plot(args: argparse.Namespace) -> int:
    from introvae_dist.plot import CURVES_NAME, PlotError, render_curves  # imports matplotlib

    out = args.out or args.run_dir / CURVES_NAME
    try:
        render_curves(args.run_dir, out, args.smoothing_steps)
    except PlotError as exc:
        _say("error", str(exc))
        return EXIT_BAD_INPUT
    except OSError as exc:
        _say("error", f"writing {out} failed ({exc.strerror or exc}); nothing was written")
        return EXIT_FAILED
    print(f"{out}: training curves of {args.run_dir}")
    return EXIT_OK


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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
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
