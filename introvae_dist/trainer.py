"""Builds everything from the config and runs Algorithm 1 over the shard stream.

Order matters for users: every check of their input (config, shards, batch split) runs before
any process group or engine starts, so a mistake costs seconds, not a queue slot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import signal
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from introvae_dist import __version__, collectives
from introvae_dist.algorithm import METRIC_NAMES, StepNoise, train_step
from introvae_dist.checkpoint import (
    CHECKPOINTS_DIR, ENGINE_DIRS, ENGINE_TAG, TRAINER_STATE_NAME, UNIVERSAL_DIR, CheckpointError, check_files,
    delete_checkpoint, describe_files, list_files, parse_step, rank_state_path, read_manifest, read_trainer_state,
    retention_victims, set_aside, set_aside_victims, step_folder_name, survey, write_latest, write_manifest,
)
from introvae_dist.config import Config, ConfigError, config_to_dict, dump_config
from introvae_dist.data.decode import to_unit_float
from introvae_dist.data.loader import (
    StreamSpec, TrainStream, batches_per_rank_epoch, check_stream_coverage, derive_seed, describe_epoch,
    layout_key, position_after_layout_change, read_fixed_images,
)
from introvae_dist.data.shard_set import (
    DataError, ShardSet, resolve_shard_set, stored_image_size_px, verify_shards, with_sample_counts,
)
from introvae_dist.distributed import World, cpu_threads_per_rank
from introvae_dist.files import write_json_atomic, write_text_atomic
from introvae_dist.images import save_grid
from introvae_dist.losses import LossWeights
from introvae_dist.models import Encoder, Generator, param_dtype, set_checkpointing
from introvae_dist.precision import (
    PrecisionChoice, PrecisionError, bf16_support, choose, choose_channels_last, fp16_support, training_device,
)
from introvae_dist.rank_state import (
    capture_rngs, load_rank_state, module_buffers, restore_buffers, restore_rngs, save_rank_state,
)
from introvae_dist.resume import (
    METRICS_NAME, STEP_LOGS, ResumePlan, check_config, lock_run_dir, plan_resume, trim_metrics,
)
from introvae_dist.run_log import RunLog
from introvae_dist.stop_signals import StopSignals



class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; training stops without saving."""


#: Environment variable naming a fault to inject, for the tests of what a kill leaves behind:
#: ``kill-before-manifest:STEP`` SIGKILLs rank 0 once every rank has written its part of the
#: checkpoint of STEP but before the manifest that makes it complete.
FAULT_ENV = "INTROVAE_DIST_FAULT"


@dataclass(frozen=True)
class Plan:
    """Everything derived from the config and the world before any engine starts."""

    shard_set: ShardSet
    batch_per_rank: int
    widths: tuple[int, ...]
    resume: ResumePlan
    #: Each engine section's precision as resolved on this rank's device ("encoder", "generator").
    precision: dict[str, PrecisionChoice]
    #: Why train.channels_last is what it is (precision.choose_channels_last).
    channels_last_reason: str = ""


#: The run folder's record of each engine's precision: asked, chosen, and why.
PRECISION_NAME = "precision.json"
#: The config sections of the two engines (Algorithm 1's E and G).
ENGINE_SECTIONS = ("encoder", "generator")


def resolve_precision(cfg: Config, world: World) -> dict[str, PrecisionChoice]:
    """Replace `precision: auto` in both engine sections by what this device runs, in place:
    the resolved config is the one the run records and a resume is checked against."""
    device = training_device(world.local_rank)
    support = bf16_support(device)
    choices = {}
    for name in ENGINE_SECTIONS:
        section = getattr(cfg, name)
        try:
            choices[name] = choose(section.precision, support, fp16_support(device))
        except PrecisionError as e:
            raise ConfigError(f"{name}.precision={section.precision}: {e}") from None
        section.precision = choices[name].chosen
    return choices


def resolve_channels_last(cfg: Config, world: World) -> str:
    """Replace `train.channels_last: auto` by the layout for this device and the resolved
    precisions, in place (after :func:`resolve_precision`); returns the reason."""
    precisions = [getattr(cfg, name).precision for name in ENGINE_SECTIONS]
    chosen, reason = choose_channels_last(cfg.train.channels_last, training_device(world.local_rank), precisions)
    cfg.train.channels_last = chosen
    return reason


def plan_run(cfg: Config, world: World) -> Plan:
    """Check the user's input against the world; raise ConfigError/DataError with the reason.
    Resolves `precision: auto` in `cfg` (see :func:`resolve_precision`)."""
    precision = resolve_precision(cfg, world)
    channels_last_reason = resolve_channels_last(cfg, world)
    if cfg.train.batch_global % world.world_size:
        raise ConfigError(
            f"train.batch_global={cfg.train.batch_global} does not divide over {world.world_size} ranks; "
            f"use a multiple of {world.world_size}"
        )
    batch_per_rank = cfg.train.batch_global // world.world_size
    if cfg.model.norm == "batch" and batch_per_rank < 2:
        raise ConfigError(
            f"train.batch_global={cfg.train.batch_global} over {world.world_size} ranks leaves "
            f"{batch_per_rank} image per rank; BatchNorm needs at least 2 (or set model.norm=group)"
        )
    shard_set = resolve_shard_set(cfg.data.shards, cfg.data.manifest)
    check_stream_coverage(len(shard_set.shards), world.world_size, cfg.data.num_workers)
    if cfg.data.mode == "epoch":
        shard_set = with_sample_counts(shard_set)
    stored_px = stored_image_size_px(shard_set)
    if stored_px is not None and stored_px < cfg.model.resolution_px:
        raise DataError(
            f"data.shards={cfg.data.shards}: images are stored at {stored_px} px, smaller than "
            f"model.resolution_px={cfg.model.resolution_px}; write shards at >= {cfg.model.resolution_px} px "
            f"or train a smaller network"
        )
    resume = plan_resume(Path(cfg.run.root) / cfg.run.name, cfg.run.resume, config_to_dict(cfg))
    plan = Plan(shard_set=shard_set, batch_per_rank=batch_per_rank, widths=cfg.model.resolved_widths(), resume=resume,
                precision=precision, channels_last_reason=channels_last_reason)
    stream_spec(cfg, world, plan).validate()  # e.g. an epoch too small for one batch per stream
    return plan


def stream_spec(cfg: Config, world: World, plan: Plan) -> StreamSpec:
    """This rank's data stream as the config and the plan define it."""
    d = cfg.data
    return StreamSpec(plan.shard_set.shards, cfg.model.resolution_px, plan.batch_per_rank, world.rank,
                      world.world_size, d.num_workers, cfg.train.seed, d.mode, d.shuffle_buffer, d.hflip)


def verify_shard_set(shard_set: ShardSet, check: str, world: World) -> None:
    """Every rank checks its share of the shards against the manifest; all raise if any fails.

    Runs after the process group starts (to split the hashing) and before any engine is built.
    """
    problems = verify_shards(list(shard_set.shards[world.rank::world.world_size]), check)  # type: ignore[arg-type]
    problems = [line for lines in collectives.gather_object(problems) for line in lines]
    if problems:
        where = shard_set.manifest_path or shard_set.spec
        raise DataError(f"{len(problems)} shard(s) do not match {where} (data.verify={check}): "
                        + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))


def _reduce_over_ranks(figures: dict[str, torch.Tensor], data_counts: dict[str, int], flags: dict[str, bool],
                       world: World) -> tuple[dict[str, float], set[str]]:
    """Loss figures averaged, data counts summed and flags or-ed over ranks, in one collective.

    All ranks agree on the result, so all stop together on a NaN, and all save and stop
    together when any of them received a stop signal.
    """
    losses = torch.stack([figures[name].float().cpu() for name in METRIC_NAMES])
    counts = torch.tensor([float(v) for v in data_counts.values()])
    raised = torch.tensor([float(v) for v in flags.values()])
    values = collectives.sum_(torch.cat([losses, counts, raised]))
    n_losses, n_counts = len(METRIC_NAMES), len(data_counts)
    values[:n_losses] /= world.world_size
    record: dict[str, float] = dict(zip(METRIC_NAMES, values[:n_losses].tolist()))
    record.update({f"data_{name}": int(v) for name, v in zip(data_counts, values[n_losses:n_losses + n_counts].tolist())})
    agreed = {name for name, v in zip(flags, values[n_losses + n_counts:].tolist()) if v > 0}
    return record, agreed


def select_checkpoint(plan: ResumePlan, world: World, current_config: dict[str, Any]) -> Path | None:
    """The newest candidate whose files match its manifest, checked split over the ranks.

    A damaged one is skipped with a warning naming it and its bad files, and set aside (renamed,
    not deleted) when it is newer than the one chosen, so later saves never collide with it.
    """
    skipped: list[Path] = []
    for folder in plan.candidates:
        try:
            manifest = read_manifest(folder)
            files = sorted(manifest["files"])
            problems = check_files(folder, manifest, files[world.rank::world.world_size])
        except CheckpointError as e:
            problems = [str(e)]
        problems = sorted({line for lines in collectives.gather_object(problems) for line in lines})
        if not problems:
            if folder != plan.candidates[0]:
                check_config(folder, current_config)  # an older one may hold another config
            if world.is_main:
                for bad in skipped:
                    if bad.parent.parent.resolve() == plan.run_dir.resolve():
                        print(f"warning: set aside damaged checkpoint {bad} as {set_aside(bad)}", flush=True)
            collectives.barrier()
            return folder
        message = f"checkpoint {folder} is damaged: " + "; ".join(problems[:5])
        if plan.explicit_step:
            raise CheckpointError(message)
        if world.is_main:
            print(f"warning: skipping {message}", flush=True)
        skipped.append(folder)
    if plan.candidates:
        raise CheckpointError(f"no usable checkpoint among the {len(plan.candidates)} in "
                              f"{plan.candidates[0].parent}; all are damaged (see the warnings above). "
                              "Move them away, or start a new run (another run.name)")
    return None


class Trainer:
    """Owns the two engines, the data stream and the run folder; `train()` runs the loop."""

    def __init__(self, cfg: Config, world: World, plan: Plan) -> None:
        # Deferred: importing DeepSpeed costs seconds; `--dry-run` never needs it.
        from introvae_dist import engine

        self.cfg, self.world, self.plan = cfg, world, plan
        self._engine_lib = engine
        threads = cpu_threads_per_rank(world)
        if threads is not None and not torch.cuda.is_available():
            torch.set_num_threads(threads)
        engine.init_distributed(cfg.run.collective_timeout_s)
        verify_shard_set(plan.shard_set, cfg.data.verify, world)
        self.run_dir = plan.resume.run_dir
        self.ckpt_dir = self.run_dir / CHECKPOINTS_DIR
        self.evaluator = self._build_evaluator() if cfg.eval.every_steps else None
        self._lock = self._lock_run_dir()
        self.resumed_from = select_checkpoint(plan.resume, world, config_to_dict(cfg))
        saved = read_trainer_state(self.resumed_from) if self.resumed_from else None
        self.step = saved["step"] if saved else 0
        self.images_seen = saved["images_seen"] if saved else 0
        if world.is_main:
            self._prepare_run_dir()
        collectives.barrier()

        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        m = cfg.model
        encoder = Encoder(m.resolution_px, m.latent_dim, plan.widths, m.norm, m.checkpoint_blocks)
        generator = Generator(m.resolution_px, m.latent_dim, plan.widths, m.norm, m.checkpoint_blocks)
        set_checkpointing(encoder, m.checkpoint_blocks, m.checkpoint_min_side_px)
        set_checkpointing(generator, m.checkpoint_blocks, m.checkpoint_min_side_px)
        # Channels-last activations, not weights: DeepSpeed's flat weight buffers are NCHW (and
        # its initial broadcast refuses channels-last parameters); oneDNN and cuDNN then run
        # the convolutions in the input's layout.
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        generator.activation_memory_format = self.memory_format
        universal = saved is not None and saved["world_size"] != world.world_size
        if universal:
            self._convert_to_universal(saved["world_size"])
        self.enc = engine.build_engine(encoder, cfg.encoder, plan.batch_per_rank, world.world_size, universal)
        self.gen = engine.build_engine(generator, cfg.generator, plan.batch_per_rank, world.world_size, universal)
        self.device = self.enc.device
        # Per-rank noise stream: eps and z_p differ across ranks like the data does.
        self.noise_rng = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + world.rank)

        spec = stream_spec(cfg, world, plan)
        consumed, counts = 0, None
        if self.resumed_from is not None:
            consumed, counts = self._restore(self.resumed_from, universal, spec)
        self.batches = TrainStream(spec, consumed, counts)
        self.grid_real, self.grid_z = self._fixed_grid_inputs()
        self._last_save_s = time.monotonic()
        self.stop = StopSignals()

    # -- start and resume -----------------------------------------------------------------------

    def _lock_run_dir(self) -> IO[str] | None:
        """Rank 0 locks the run folder; every rank raises if another job holds it."""
        lock, problem = None, None
        if self.world.is_main:
            try:
                lock = lock_run_dir(self.run_dir)
            except ConfigError as e:
                problem = str(e)
        problem = collectives.broadcast_object(problem)
        if problem:
            raise ConfigError(str(problem))
        return lock

    def _prepare_run_dir(self) -> None:
        """Rank 0: create the run folder, write the config, and cut the log back to the resumed step."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        for line in self.plan.resume.warnings:
            print(f"warning: {line}", flush=True)
        if self.resumed_from is not None:
            print(f"resuming from {self.resumed_from} (step {self.step}, {self.images_seen} images seen)", flush=True)
            for line in self.plan.resume.accepted_changes:
                print(f"config change accepted on resume: {line}", flush=True)
        for name in STEP_LOGS:
            moved = trim_metrics(self.run_dir, self.step, name)
            if moved:
                print(f"moved {moved} records of steps after {self.step} from {name} to "
                      f"{name.replace('.jsonl', '.discarded.jsonl')}", flush=True)
        write_text_atomic(self.run_dir / "config.yaml", dump_config(self.cfg))
        for name, choice in self.plan.precision.items():
            print(f"{name} precision: {choice.reason}", flush=True)
            if choice.warning:
                print(f"warning: {name}.precision: {choice.warning}", flush=True)
        print(f"memory format: {self.plan.channels_last_reason}", flush=True)
        write_json_atomic(self.run_dir / PRECISION_NAME, {name: dataclasses.asdict(choice)
                                                         for name, choice in self.plan.precision.items()})

    def _convert_to_universal(self, saved_world_size: int) -> None:
        """A checkpoint of another world size loads through DeepSpeed's universal format; rank 0
        converts each engine once into checkpoints/universal/ while the others wait."""
        assert self.resumed_from is not None
        target = self.ckpt_dir / UNIVERSAL_DIR / self.resumed_from.name
        if self.world.is_main:
            print(f"the checkpoint was written by {saved_world_size} rank(s), this run has {self.world.world_size}: "
                  f"converting it to DeepSpeed's universal format in {target}", flush=True)
            for net in ENGINE_DIRS:
                if not (target / net).is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    self._engine_lib.convert_to_universal(self.resumed_from / net, ENGINE_TAG, target / net)
        collectives.barrier()

    def _restore(self, folder: Path, universal: bool, spec: StreamSpec) -> tuple[int, dict[str, int] | None]:
        """Load both engines, then this rank's RNGs, buffers and stream position.

        Exact when the world size and the data layout are those of the save; otherwise the RNGs
        are re-seeded from (seed, step, rank) and the stream goes on at the same share of the epoch.
        """
        source = self.ckpt_dir / UNIVERSAL_DIR / folder.name if universal else folder
        self._engine_lib.load_engine(self.enc, source / "encoder", ENGINE_TAG, self.cfg.encoder)
        self._engine_lib.load_engine(self.gen, source / "generator", ENGINE_TAG, self.cfg.generator)
        own = rank_state_path(folder, self.world.rank)
        state = load_rank_state(own) if not universal and own.is_file() else None
        if state is not None:
            restore_rngs(state["rngs"], self.noise_rng)
            restore_buffers(self.enc.module, state["buffers"]["encoder"])
            restore_buffers(self.gen.module, state["buffers"]["generator"])
        else:
            seed = derive_seed(self.cfg.train.seed, self.step, self.world.rank)
            random.seed(seed), np.random.seed(seed), torch.manual_seed(seed), self.noise_rng.manual_seed(seed)
        stream = (state or load_rank_state(rank_state_path(folder, 0)))["stream"]
        if state is not None and stream["layout"] == layout_key(spec):
            return stream["consumed"], stream["counts"]
        consumed = position_after_layout_change(stream["consumed"], stream["batches_per_rank_epoch"], spec)
        if self.world.is_main:
            print(f"data: the stream's layout changed since the save (ranks, workers, batch or shards); "
                  f"going on in epoch {consumed // batches_per_rank_epoch(spec)} at the same share of it", flush=True)
        return consumed, None

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> str | None:
        """Run until `train.total_steps` or a stop signal; returns the signal's name if one
        stopped the run (after a complete checkpoint), else None."""
        t = self.cfg.train
        log = RunLog(self.run_dir / METRICS_NAME, t.total_steps, self.step, self.world.is_main)
        log.message(f"run folder: {self.run_dir}")
        log.message(describe_epoch(self.batches.spec, self.batches.epoch))
        if self.step >= t.total_steps:
            log.message(f"nothing to do: step {self.step} of train.total_steps={t.total_steps} is done "
                        "(raise train.total_steps to train on, or set run.name to start a new run)")
        try:
            with self.stop:
                while self.step < t.total_steps:
                    stopped = self._one_step(log)
                    if stopped:
                        return stopped
        finally:
            self.batches.close()  # on every path, a dead peer's error included (see close())
            log.close()
        return None

    def _one_step(self, log: RunLog) -> str | None:
        t = self.cfg.train
        images = next(self.batches).to(self.device, non_blocking=True)  # uint8 (B, 3, R, R)
        # Re-laid out while still uint8 (a quarter of the bytes); the float keeps the layout.
        x = to_unit_float(images.contiguous(memory_format=self.memory_format))
        warmup = self.images_seen < self.cfg.loss.warmup_images
        noise = StepNoise.sample(x.shape[0], self.cfg.model.latent_dim, self.noise_rng, self.device)
        figures = train_step(self.enc, self.gen, x, noise, self._loss_weights(warmup), order=t.step_order)
        self.step += 1
        self.images_seen += t.batch_global
        # Rank 0's clock decides time-based saves, so all ranks agree on them.
        minutes_due = (self.world.is_main and t.save_every_minutes > 0
                       and time.monotonic() - self._last_save_s >= 60 * t.save_every_minutes)
        record, flags = _reduce_over_ranks(figures, self.batches.stats(),
                                           {"stop": self.stop.received is not None, "save_due": minutes_due}, self.world)
        self._stop_if_non_finite(record)
        record.update(step=self.step, images_seen=self.images_seen, epoch=self.batches.epoch,
                      phase="warmup" if warmup else "adversarial")
        images_per_s = log.step(record, t.batch_global)
        if self.step % t.log_every_steps == 0:
            log.message(_summary(record, images_per_s))
        last = self.step == t.total_steps
        if self.step % t.sample_every_steps == 0 or last:
            self.write_grid()
        if self.evaluator is not None and self.step % self.cfg.eval.every_steps == 0:
            self._evaluate(log)
        if self.step % t.save_every_steps == 0 or last or flags:
            path = self.save()
            why = "stop signal" if "stop" in flags else "time" if flags else "step"
            log.message(f"step {self.step}: checkpoint {path} ({why})")
        if "stop" in flags and not last:  # a signal at the last step changes nothing: the run is done
            return self.stop.received or "a stop signal on another rank"
        return None

    def _loss_weights(self, warmup: bool) -> LossWeights:
        c = self.cfg.loss
        # VAE warm-up (Sec. 4.1): alpha = 0 reduces Eq. 11-12 to a plain VAE.
        return LossWeights(alpha=0.0 if warmup else c.alpha, beta=c.beta, margin=c.margin, l_ae_factor=c.l_ae_factor)

    def _stop_if_non_finite(self, record: dict[str, float]) -> None:
        bad = {k: v for k, v in record.items() if not math.isfinite(v)}
        if bad:
            terms = ", ".join(f"{k}={v}" for k, v in record.items())
            raise NonFiniteLoss(
                f"step {self.step}: non-finite loss in {', '.join(bad)} ({terms}); stopping without "
                f"saving, the last good checkpoint is kept in {self.ckpt_dir}"
            )
    # -- sample grids ---------------------------------------------------------------------------

    def _fixed_grid_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shards' first images and a seeded z_p, the same on all ranks (ZeRO-3 forwards
        are collective), so every grid of a run shows the same inputs."""
        n = self.cfg.train.grid_images
        real = read_fixed_images(self.plan.shard_set.shards, n, self.cfg.model.resolution_px)
        z = torch.randn(n, self.cfg.model.latent_dim, generator=torch.Generator().manual_seed(self.cfg.train.seed))
        return real.to(self.device), z.to(self.device)

    @torch.no_grad()
    def write_grid(self) -> Path:
        """PNG of rows real | reconstruction (from mu) | sample, at eval-mode BatchNorm."""
        enc, gen = self.enc.module, self.gen.module
        enc.eval(), gen.eval()
        try:
            e_dtype, g_dtype = param_dtype(enc), param_dtype(gen)
            mu, _ = enc(self.grid_real.to(e_dtype))
            rec = gen(mu.to(g_dtype))
            sample = gen(self.grid_z.to(g_dtype))
        finally:
            enc.train(), gen.train()
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        if self.world.is_main:
            save_grid([self.grid_real, rec, sample], path, min_cell_px=self.cfg.train.grid_cell_px)
        return path

    # -- evaluation during training (eval.every_steps; introvae_dist.evaluation) -----------------

    def _build_evaluator(self) -> Any:
        """Checks the eval section's inputs (shards, Inception file) before any engine starts."""
        from introvae_dist.evaluation import EvaluationInputError, TrainingEvaluator

        try:
            return TrainingEvaluator(self.cfg.eval, self.cfg.data.shards, self.run_dir, self.cfg.model.resolution_px,
                                     self.cfg.train.seed)
        except EvaluationInputError as e:
            raise ConfigError(f"eval: {e}") from None

    def _evaluate(self, log: RunLog) -> None:
        """Every rank evaluates its share of the networks as they are now; rank 0 logs the figures."""
        from introvae_dist.evaluation import EVAL_LOG_NAME, summary
        from introvae_dist.rank_work import Workers

        record = self.evaluator.run(self.enc.module, self.gen.module, self.step, self.images_seen,
                                    Workers(self.world, self.device))
        if record is not None:
            log.message(f"step {self.step}: eval {summary(record)} (in {EVAL_LOG_NAME})")

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self) -> Path:
        """One complete checkpoint of this step (every rank must call this).

        Order: both engines' shards and every rank's own state, then trainer_state.json; a
        barrier; the checksums, split over the ranks; the manifest, written last by rank 0; the
        `latest` pointer, replaced atomically; only then retention deletes old checkpoints.
        A kill anywhere before the manifest leaves a folder that resume skips.
        """
        folder = self.ckpt_dir / step_folder_name(self.step)
        if self.world.is_main and folder.exists():
            # Left by a save that never finished, or damaged: renamed, never deleted.
            print(f"warning: {folder} exists; set aside as {set_aside(folder)}", flush=True)
        collectives.barrier()
        self._engine_lib.save_engine(self.enc, folder / "encoder", ENGINE_TAG, {})
        self._engine_lib.save_engine(self.gen, folder / "generator", ENGINE_TAG, {})
        save_rank_state(rank_state_path(folder, self.world.rank), self._rank_state())
        if self.world.is_main:
            write_text_atomic(folder / TRAINER_STATE_NAME, json.dumps(self._trainer_state(), indent=1) + "\n")
        collectives.barrier()
        _inject_fault("kill-before-manifest", self.step, self.world)
        names = collectives.broadcast_object(list_files(folder) if self.world.is_main else None)
        mine = describe_files(folder, names[self.world.rank::self.world.world_size])  # type: ignore[index]
        files = {k: v for part in collectives.gather_object(mine) for k, v in part.items()}
        if self.world.is_main:
            write_manifest(folder, self.step, files)
            write_latest(self.ckpt_dir, folder.name)
            self._apply_retention()
        collectives.barrier()
        self._last_save_s = time.monotonic()
        return folder

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "phase": "warmup" if self.images_seen < self.cfg.loss.warmup_images else "adversarial",
            "world_size": self.world.world_size,
            # What the optimisers really use (a resume applies the config's, not the saved ones).
            "lr": {"encoder": self.enc.optimizer.param_groups[0]["lr"], "generator": self.gen.optimizer.param_groups[0]["lr"]},
            "config": config_to_dict(self.cfg),
            "versions": _versions(),
            "time": time.time(),
        }

    def _rank_state(self) -> dict[str, Any]:
        spec = self.batches.spec
        return {
            "rank": self.world.rank,
            "step": self.step,
            "rngs": capture_rngs(self.noise_rng),
            "buffers": {"encoder": module_buffers(self.enc.module), "generator": module_buffers(self.gen.module)},
            "stream": {"consumed": self.batches.consumed, "counts": self.batches.stats(),
                       "layout": layout_key(spec), "batches_per_rank_epoch": batches_per_rank_epoch(spec)},
        }

    def _apply_retention(self) -> None:
        """Rank 0, after a save: keep the newest train.keep_last_checkpoints, the multiples of
        train.keep_every_steps and the checkpoint this run resumed from; delete the rest."""
        t = self.cfg.train
        found = survey(self.ckpt_dir)
        complete = {step: folder for step, folder in found.with_manifest}
        protected = {parse_step(self.resumed_from.name)} if self.resumed_from is not None else set()
        for step in retention_victims(list(complete), t.keep_last_checkpoints, t.keep_every_steps, protected):  # type: ignore[arg-type]
            delete_checkpoint(complete[step])
            universal = self.ckpt_dir / UNIVERSAL_DIR / complete[step].name
            if universal.is_dir():
                shutil.rmtree(universal)
        # Set-aside folders (killed or damaged saves, several GB each at 1024 px) are kept for a
        # look, but not for ever.
        for folder in set_aside_victims(found.set_aside, t.keep_set_aside_checkpoints):
            shutil.rmtree(folder)
            print(f"deleted {folder}, set aside earlier (train.keep_set_aside_checkpoints="
                  f"{t.keep_set_aside_checkpoints} keeps the newest)", flush=True)


def _inject_fault(name: str, step: int, world: World) -> None:
    """Tests only: SIGKILL rank 0 at the named point (see FAULT_ENV)."""
    if os.environ.get(FAULT_ENV) == f"{name}:{step}" and world.is_main:
        os.kill(os.getpid(), signal.SIGKILL)


def _summary(record: dict[str, float | str | int], images_per_s: float) -> str:
    return (f"step {record['step']} [{record['phase']}] L_AE {record['l_ae']:.2f} | KL real {record['kl_real']:.2f} "
            f"| E sees rec {record['kl_rec_e']:.2f} fake {record['kl_fake_e']:.2f} | G sees rec "
            f"{record['kl_rec_g']:.2f} fake {record['kl_fake_g']:.2f} | {images_per_s:.1f} img/s"
            + _damage_note(record))


def _damage_note(record: dict[str, float | str | int]) -> str:
    """Shown only once data went bad, so a clean run's log stays short."""
    skipped, damaged = record.get("data_samples_skipped", 0), record.get("data_shards_damaged", 0)
    return f" | data: {skipped} samples skipped, {damaged} shards damaged" if skipped or damaged else ""


def _versions() -> dict[str, str]:
    import deepspeed
    import webdataset

    return {"introvae_dist": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "webdataset": getattr(webdataset, "__version__", "unknown"), "python": platform.python_version()}
