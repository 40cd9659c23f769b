"""A plain VAE, IntroVAE and Soft-IntroVAE trained alike and measured alike: held-out
reconstruction, sharpness of samples against real images, sample diversity, FID where the
Inception file is at hand, and the step time of each objective.

    python bench/photo_shards.py --out shards/photos      # once: 32 px crops of real photographs
    python bench/objectives_side_by_side.py --steps 700 --warmup-steps 350 --tag photos

The three runs share the networks, data, steps, batch and seed of --config (the demo's,
configs/cpu_synthetic.yaml), on the photographs' training shards:

* **vae**: IntroVAE's objective with the warm-up (alpha = 0) over the whole run, so the loss is
  KL + beta L_AE throughout: the very run IntroVAE's is until its warm-up ends (both are
  seeded alike, and the table says whether their logs agree at that step).
* **introvae**: --alpha, --beta, --margin (default ``auto``: 1.5 x the warm-up's KL(real),
  what balanced Fig. 5 on the photographs in docs/TRAINING.md; the demo's 110 suits its
  synthetic shards, whose warm-up KL is higher), after --warmup-steps as a VAE.
* **soft**: Soft-IntroVAE with --beta-rec, --beta-kl, --beta-neg (the authors' values at 32 px),
  after the same warm-up, as Soft-IntroVAE's VAE (its ELBO without the adversarial terms).

The VAE parts of the two objectives weigh reconstruction differently, as their authors'
settings do: IntroVAE's KL + beta L_AE with beta 16 and L_AE's factor 0.5 puts 8 on the summed
squared error for 1 on KL; Soft-IntroVAE's beta_rec = beta_kl = 1 puts 1 on each. So the
table compares the objectives at their authors' weights, not at one weighting; --beta-rec 8
gives Soft-IntroVAE IntroVAE's, and ``--also-soft-beta-rec 8`` adds such a run beside the others.

Run from the repository root. Arguments after ``--`` are overrides for every run (on top of
--config and of the bench's own). Runs land in --root as TAG-vae, TAG-introvae, TAG-soft; an
existing run folder whose newest checkpoint is its last step is read, not retrained (delete it
to train again), so the table can be re-made; the evaluation is redone each time (about 20 s a
run at 32 px with the default sizes).

Each run is evaluated on the CPU in this process as ``introvae-dist evaluate`` would (its
newest checkpoint, the moving average where the run has one unless --raw-weights): RMSE and
PSNR of the held-out shards' reconstructions, the sharpness of --num-images samples and of the
first --num-real training images (introvae_dist/metrics/sharpness.py), MS-SSIM of
--ms-ssim-pairs pairs of samples (lower: more diverse), FID only with an Inception file
(--inception or $INTROVAE_DIST_INCEPTION). The step time is the median over each run's steps
after the warm-up, less its first --skip-steps (the same step numbers for the VAE, whose steps
are all warm-up), from metrics.jsonl; the runs train one after another, so a machine that is
busier for one of them moves its time: compare the ratios to IntroVAE, and re-run to check.

Writes ROOT/side_by_side.md (the table, also printed), ROOT/side_by_side.json (the figures,
the CPU model and its bf16 flags, the exact command) and ROOT/side_by_side.png: the three runs'
last sample grids stacked (each: real training images | reconstructions | samples, through the
networks the trainer draws grids with; the same images and latents in every run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from introvae_dist.config import load_config
from introvae_dist.distributed import free_port
from introvae_dist.evaluation import evaluate, inception_path, load_inception, plan_evaluation
from introvae_dist.inference import ModelSourceError, find_source, load_models
from introvae_dist.precision import CPU_BF16_FLAGS, cpu_model_and_flags
from introvae_dist.rank_work import Workers
from introvae_dist.run_log import METRICS_NAME

REFERENCE = "introvae"
OUT_NAME = "side_by_side"
NO_FID = "no Inception file"


@dataclass(frozen=True)
class RunSpec:
    objective: str
    name: str
    overrides: list[str]


def run_specs(args: argparse.Namespace, batch: int) -> list[RunSpec]:
    """The three runs' overrides: the shared ones first, the objective's, then the user's."""
    warmup_images, total_images = args.warmup_steps * batch, args.steps * batch
    shared = [f"run.root={args.root}", f"train.total_steps={args.steps}", f"data.shards={args.train_shards}"]
    introvae = ["loss.objective=introvae", f"loss.alpha={args.alpha}", f"loss.beta={args.beta}",
                f"loss.margin={args.margin}"]
    if args.margin == "auto":  # the window is the warm-up's last images: a short warm-up gets a short one
        introvae.append(f"loss.margin_window_images={min(4096, warmup_images)}")
    soft = ["loss.objective=soft_introvae", f"loss.beta_rec={args.beta_rec}", f"loss.beta_kl={args.beta_kl}",
            f"loss.beta_neg={args.beta_neg}"]
    own = {"vae": [*introvae, f"loss.warmup_images={total_images}"],  # the runs, in the table's order
           "introvae": [*introvae, f"loss.warmup_images={warmup_images}"],
           "soft": [*soft, f"loss.warmup_images={warmup_images}"]}
    for beta_rec in args.also_soft_beta_rec:  # Soft-IntroVAE again at another reconstruction weight
        own[f"soft-br{beta_rec:g}"] = [*soft, f"loss.beta_rec={beta_rec}", f"loss.warmup_images={warmup_images}"]
    return [RunSpec(o, f"{args.tag}-{o}", [*shared, f"run.name={args.tag}-{o}", *own[o], *args.overrides])
            for o in own]


def finished_step(run_dir: Path) -> int | None:
    """The step of the run's newest complete checkpoint, or None without one."""
    try:
        return find_source(run_dir).step
    except ModelSourceError:
        return None


def train(config: Path, spec: RunSpec, run_dir: Path, ranks: int) -> dict[str, Any]:
    """Train the run unless its folder holds a finished one. Returns how the training went: its
    wall time and its processes' CPU time, kept beside the run folder (NAME.training.json) for
    a re-made table, and whether it was trained now or read."""
    record = run_dir.with_name(f"{run_dir.name}.training.json")
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    if cfg is not None and finished_step(run_dir) == cfg.train.total_steps:
        return {**(json.loads(record.read_text()) if record.is_file() else {}), "how": "read"}
    if run_dir.exists():
        sys.exit(f"{run_dir}: a run folder without a finished run (no checkpoint of its last step); "
                 "delete it to train it again")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "launchers/train.py", "--config", str(config), *spec.overrides]
    print(f"# training {spec.name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall_s, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{spec.name}: training failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-3000:]}")
    # The launcher waits for the ranks, so their CPU time is counted here (start-up included).
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    done = {"train_command": shlex.join(cmd), "ranks": ranks, "train_wall_s": round(wall_s, 1),
            "train_cpu_s": round(cpu_s, 1), "cpu_share": round(cpu_s / (wall_s * (os.cpu_count() or 1)), 3)}
    record.write_text(json.dumps(done, indent=1) + "\n")
    return {**done, "how": "trained"}


def timing(records: list[dict[str, Any]], batch: int, first_step: int, last_step: int,
           skip_steps: int) -> dict[str, Any]:
    """Median ms/step over steps (first_step + skip, last_step] of one run's metrics.jsonl.

    ``images_per_s`` of a record is the batch over the wall time since the previous record, so
    it holds the whole step (its updates, the log, a grid or checkpoint when one falls on it);
    the median leaves the few steps with a grid or a save out."""
    skip = min(skip_steps, (last_step - first_step) // 2)
    window = [r for r in records if first_step + skip < r["step"] <= last_step]
    if not window:
        raise SystemExit(f"no steps to time in ({first_step + skip}, {last_step}]: give more --steps")
    times = [1000.0 * batch / r["images_per_s"] for r in window]
    ms = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [ms, ms, ms]
    return {"ms_per_step": ms, "ms_per_step_quartiles": [quartiles[0], quartiles[2]],
            "images_per_s": 1000.0 * batch / ms, "timed_steps": [window[0]["step"], window[-1]["step"]],
            "timed_count": len(window)}


def evaluate_run(run_dir: Path, args: argparse.Namespace, features: Any) -> dict[str, Any]:
    """``introvae-dist evaluate RUN`` in this process, one rank on the CPU: its figures."""
    source = find_source(run_dir)
    metrics = ["rmse", "ms_ssim", "sharpness"] + (["fid"] if features is not None else [])
    plan = plan_evaluation(metrics, source.model.resolution_px, real=args.real, heldout=args.heldout,
                           num_generated=args.num_images, ms_ssim_pairs=args.ms_ssim_pairs, num_real=args.num_real,
                           num_heldout=args.num_heldout, seed=args.eval_seed, batch=args.eval_batch,
                           **({"cache_dir": args.cache} if args.cache else {}))
    workers = Workers.from_env("cpu")
    try:
        models = load_models(source, "cpu", "raw" if args.raw_weights else "ema")
        figures = evaluate(models.encoder, models.generator, plan, workers, features, progress=False)
    finally:
        workers.close()
    assert figures is not None
    return {**figures, "source": str(source.path), "step": source.step, "weights": models.weights()}


def last_grid(run_dir: Path) -> Path:
    """The run's newest samples/step_*.png (the trainer always draws one at the last step)."""
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    if not grids:
        raise SystemExit(f"{run_dir / 'samples'}: no sample grid")
    return grids[-1]


def stack_grids(grids: dict[str, Path], out: Path) -> None:
    """The grids one above the other, each under a band naming its run and step."""
    images = {name: Image.open(path).convert("RGB") for name, path in grids.items()}
    band = 18
    width = max(im.width for im in images.values())
    canvas = Image.new("RGB", (width, sum(im.height + band for im in images.values())), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for name, im in images.items():
        step = int(grids[name].stem.split("_")[1])
        draw.text((4, y + 3), f"{name}, step {step}: real | reconstruction | sample", fill="black")
        canvas.paste(im, (0, y + band))
        y += band + im.height
    canvas.save(out)


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and the flags that decide native bf16 (introvae_dist/precision.py)."""
    model, flags = cpu_model_and_flags()
    return {"model_name": model if model != "unknown" else platform.processor() or "unknown",
            "bf16_flags": sorted(flags & set(CPU_BF16_FLAGS)), "cpus": os.cpu_count(), "torch": torch.__version__}


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: dict[str, dict[str, Any]], real: dict[str, Any], fid_note: str) -> str:
    """The markdown table: one row per run, then the real images' sharpness."""
    lines = ["| objective | steps | ms/step | vs IntroVAE | img/s | CPU share | held-out RMSE | PSNR (dB) | "
             "Laplacian var | HF share | MS-SSIM | FID |", "|---" * 12 + "|"]
    for name, r in rows.items():
        fid = _fmt(r.get("fid"), ".2f") if "fid" in r else fid_note
        lines.append(f"| {name} | {r['step']} | {r['ms_per_step']:.1f} | {r['vs_reference']:.2f}x | "
                     f"{r['images_per_s']:.1f} | {_fmt(r.get('cpu_share'), '.2f') or 'n/a'} | {r['rmse']:.4f} | "
                     f"{r['psnr_db']:.2f} | {r['laplacian_var_samples']:.5f} | {r['hf_share_samples']:.4f} | "
                     f"{r['ms_ssim']:.4f} | {fid} |")
    lines.append(f"| real images | | | | | | | | {real['laplacian_var_real']:.5f} | {real['hf_share_real']:.4f} | | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/cpu_synthetic.yaml"))
    parser.add_argument("--steps", type=int, default=700, help="steps of every run (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=350,
                        help="IntroVAE's and Soft-IntroVAE's VAE warm-up (default: %(default)s)")
    parser.add_argument("--root", type=Path, default=Path("runs/objectives"))
    parser.add_argument("--tag", default="photos", help="run names are TAG-vae, TAG-introvae, TAG-soft")
    parser.add_argument("--ranks", type=int, default=2, help="processes per run (default: %(default)s)")
    data = parser.add_argument_group("data")
    data.add_argument("--train-shards", default="shards/photos/train")
    data.add_argument("--heldout", default="shards/photos/heldout", help="for RMSE/PSNR")
    data.add_argument("--real", help="real images for sharpness and FID (default: --train-shards)")
    intro = parser.add_argument_group("IntroVAE (and the VAE, whose loss is its warm-up's)")
    intro.add_argument("--alpha", type=float, default=0.25)
    intro.add_argument("--beta", type=float, default=16.0)
    intro.add_argument("--margin", default="auto", help="a number or auto (default: %(default)s)")
    soft = parser.add_argument_group("Soft-IntroVAE")
    soft.add_argument("--beta-rec", type=float, default=1.0)
    soft.add_argument("--beta-kl", type=float, default=1.0)
    soft.add_argument("--beta-neg", type=float, default=256.0)
    soft.add_argument("--also-soft-beta-rec", type=float, nargs="*", default=[], metavar="BETA_REC",
                      help="one more Soft-IntroVAE run per value, at that beta_rec (its run: TAG-soft-brVALUE); "
                           "8 puts IntroVAE's weight on the squared error (see above)")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--num-images", type=int, default=1000, help="samples for sharpness and FID")
    ev.add_argument("--num-real", type=int, default=1000, help="real images for sharpness and FID")
    ev.add_argument("--num-heldout", type=int, help="held-out images (default: all)")
    ev.add_argument("--ms-ssim-pairs", type=int, default=500)
    ev.add_argument("--eval-batch", type=int, default=64)
    ev.add_argument("--eval-seed", type=int, default=0)
    ev.add_argument("--raw-weights", action="store_true", help="the networks' own weights, not their average")
    ev.add_argument("--inception", help="the FID Inception file (default: $INTROVAE_DIST_INCEPTION; none: no FID)")
    ev.add_argument("--cache", type=Path, help="cache of FID's real statistics")
    parser.add_argument("--skip-steps", type=int, default=50,
                        help="steps after the warm-up left out of the timing (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="after --: overrides for every run")
    args = parser.parse_args(argv)
    if not 0 < args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps {args.warmup_steps}: expected between 0 and --steps {args.steps}")
    args.real = args.real or args.train_shards
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    batch = load_config(args.config, [f"data.shards={args.train_shards}", *args.overrides]).train.batch_global
    specs = run_specs(args, batch)
    for spec in specs:  # every run's config is checked before the first one trains
        load_config(args.config, spec.overrides)
    trainings = {spec.objective: train(args.config, spec, args.root / spec.name, args.ranks) for spec in specs}
    inception = inception_path(args.inception)
    features = load_inception(inception, "cpu") if inception is not None else None
    rows = measure(args, specs, trainings, features)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join([__file__, *argv])
    report(args, specs, rows, command, fid="computed" if features is not None else NO_FID)


def measure(args: argparse.Namespace, specs: list[RunSpec], trainings: dict[str, dict[str, Any]],
            features: Any) -> dict[str, dict[str, Any]]:
    """Each run's step time and evaluation; the timing window from the IntroVAE run's own warm-up
    (a re-made table reads the runs as they were trained, whatever this command's --steps)."""
    reference_cfg = load_config(args.root / f"{args.tag}-{REFERENCE}" / "config.yaml")
    warmup_steps = reference_cfg.loss.warmup_images // reference_cfg.train.batch_global
    rows: dict[str, dict[str, Any]] = {}
    for spec in specs:
        run_dir = args.root / spec.name
        cfg = load_config(run_dir / "config.yaml")
        if cfg.train.total_steps != args.steps:
            print(f"# note: {run_dir} was trained for {cfg.train.total_steps} steps, not --steps {args.steps}",
                  file=sys.stderr)
        records = [json.loads(line) for line in (run_dir / METRICS_NAME).read_text().splitlines() if line.strip()]
        rows[spec.objective] = {"run_dir": str(run_dir), "overrides": spec.overrides, **trainings[spec.objective],
                                "precision": cfg.encoder.precision, "batch": cfg.train.batch_global,
                                "warmup_steps": cfg.loss.warmup_images // cfg.train.batch_global,
                                **timing(records, cfg.train.batch_global, warmup_steps, cfg.train.total_steps,
                                         args.skip_steps),
                                **evaluate_run(run_dir, args, features)}
    for row in rows.values():
        row["vs_reference"] = row["ms_per_step"] / rows[REFERENCE]["ms_per_step"]
    return rows


def report(args: argparse.Namespace, specs: list[RunSpec], rows: dict[str, dict[str, Any]], command: str,
           fid: str) -> None:
    """Print the table and write ROOT/side_by_side.{md,json,png}."""
    ref, cpu = rows[REFERENCE], cpu_info()
    real = {k: ref[k] for k in ("laplacian_var_real", "hf_share_real", "sharpness_num_real", "sharpness_real")}
    ranks = sorted({str(r.get("ranks", "?")) for r in rows.values()})
    lines = [
        f"# {command}",
        f"# {cpu['model_name']}, {cpu['cpus']} CPUs, bf16 flags: {', '.join(cpu['bf16_flags']) or 'none'}; "
        f"torch {cpu['torch']}; precision {ref['precision']}",
        f"# {ref['step']} steps ({ref['warmup_steps']} warm-up), batch {ref['batch']}, {'/'.join(ranks)} ranks, one "
        f"seed; {ref['weights']}; held-out {args.heldout} ({ref['recon_num_images']} images); sharpness of "
        f"{ref['sharpness_num_samples']} samples vs {real['sharpness_num_real']} images of {args.real}; MS-SSIM of "
        f"{ref['ms_ssim_pairs']} pairs at {ref['ms_ssim_px']} px; ms/step: median over steps "
        f"{ref['timed_steps'][0]}-{ref['timed_steps'][1]}; CPU share: the training processes' CPU time / (wall "
        f"time x {cpu['cpus']} CPUs), start-up included",
        table(rows, real, NO_FID),
        f"# vae and introvae logs agree through the shared warm-up (step {ref['warmup_steps']}): "
        f"{_warmup_shared(args.root, specs, ref['warmup_steps'])}",
    ]
    args.root.mkdir(parents=True, exist_ok=True)
    grid = args.root / f"{OUT_NAME}.png"
    stack_grids({s.objective: last_grid(args.root / s.name) for s in specs}, grid)
    (args.root / f"{OUT_NAME}.md").write_text("\n".join(lines) + "\n")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.root / f"{OUT_NAME}.json").write_text(json.dumps(
        {"command": command, "cwd": os.getcwd(), "cpu": cpu, "settings": settings, "fid": fid,
         "warmup_logs_agree": _warmup_shared(args.root, specs, ref["warmup_steps"]), "runs": rows, "grid": str(grid)},
        indent=1) + "\n")
    print("\n".join(lines))
    print(f"# written: {args.root / OUT_NAME}.md, .json, .png")


def _warmup_shared(root: Path, specs: list[RunSpec], warmup_steps: int) -> bool:
    """Whether the VAE's and IntroVAE's metrics.jsonl hold the same losses up to the warm-up's end."""
    logs = {}
    for spec in specs:
        if spec.objective in ("vae", "introvae"):
            lines = (root / spec.name / METRICS_NAME).read_text().splitlines()
            logs[spec.objective] = [(r["step"], r["l_ae"], r["kl_real"]) for r in map(json.loads, filter(None, lines))
                                    if r["step"] <= warmup_steps]
    return logs["vae"] == logs["introvae"] and len(logs["vae"]) == warmup_steps


if __name__ == "__main__":
    main()
