"""Builds everything from the config and runs Algorithm 1 over the shard stream.

Order matters for users: every check of their input (config, shards, batch split) runs before
any process group or engine starts, so a mistake costs seconds, not a queue slot.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from introvae_dist import __version__
from introvae_dist.algorithm import METRIC_NAMES, StepNoise, train_step
from introvae_dist.config import Config, ConfigError, config_to_dict, dump_config
from introvae_dist.data.decode import to_unit_float
from introvae_dist.data.loader import (
    StreamSpec, TrainStream, check_stream_coverage, describe_epoch, read_fixed_images,
)
from introvae_dist.data.shard_set import (
    DataError, ShardSet, resolve_shard_set, stored_image_size_px, verify_shards, with_sample_counts,
)
from introvae_dist.distributed import World, cpu_threads_per_rank
from introvae_dist.images import save_grid
from introvae_dist.losses import LossWeights
from introvae_dist.models import Encoder, Generator
from introvae_dist.run_log import RunLog

#: Exit code when a loss turns NaN or infinite (documented in README).
EXIT_NON_FINITE = 3


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; training stops without saving."""


@dataclass(frozen=True)
class Plan:
    """Everything derived from the config and the world before any engine starts."""

    shard_set: ShardSet
    batch_per_rank: int
    widths: tuple[int, ...]


def plan_run(cfg: Config, world: World) -> Plan:
    """Check the user's input against the world; raise ConfigError/DataError with the reason."""
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
    plan = Plan(shard_set=shard_set, batch_per_rank=batch_per_rank, widths=cfg.model.resolved_widths())
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
    if world.world_size > 1:
        gathered: list[list[str]] = [[] for _ in range(world.world_size)]
        dist.all_gather_object(gathered, problems)
        problems = [line for lines in gathered for line in lines]
    if problems:
        where = shard_set.manifest_path or shard_set.spec
        raise DataError(f"{len(problems)} shard(s) do not match {where} (data.verify={check}): "
                        + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))


def new_run_dir(root: Path, name: str) -> Path:
    """ROOT/NAME-NNNNN with the next free number: a new run never writes into an old one."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.rsplit("-", 1)[1]) for p in root.glob(f"{name}-*") if p.name.rsplit("-", 1)[1].isdigit()]
    run_dir = root / f"{name}-{max(taken, default=-1) + 1:05d}"
    run_dir.mkdir()
    return run_dir


def _broadcast_object(value: object, world: World) -> object:
    box = [value]
    if world.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _reduce_over_ranks(figures: dict[str, torch.Tensor], data_counts: dict[str, int], world: World) -> dict[str, float]:
    """Loss figures averaged and data counts summed over ranks, in one collective.

    All ranks agree on the result, so all stop together on a NaN.
    """
    losses = torch.stack([figures[name].float().cpu() for name in METRIC_NAMES])
    counts = torch.tensor([float(v) for v in data_counts.values()])
    values = torch.cat([losses, counts])
    if world.world_size > 1:
        dist.all_reduce(values)
    values[: len(METRIC_NAMES)] /= world.world_size
    record: dict[str, float] = dict(zip(METRIC_NAMES, values[: len(METRIC_NAMES)].tolist()))
    record.update({f"data_{name}": int(v) for name, v in zip(data_counts, values[len(METRIC_NAMES):].tolist())})
    return record


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
        engine.init_distributed()
        verify_shard_set(plan.shard_set, cfg.data.verify, world)
        run_dir = new_run_dir(Path(cfg.run.root), cfg.run.name) if world.is_main else None
        self.run_dir = Path(str(_broadcast_object(str(run_dir) if run_dir else "", world)))
        if world.is_main:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))

        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        m = cfg.model
        encoder = Encoder(m.resolution_px, m.latent_dim, plan.widths, m.norm, m.checkpoint_blocks)
        generator = Generator(m.resolution_px, m.latent_dim, plan.widths, m.norm, m.checkpoint_blocks)
        self.enc = engine.build_engine(encoder, cfg.encoder, plan.batch_per_rank, world.world_size)
        self.gen = engine.build_engine(generator, cfg.generator, plan.batch_per_rank, world.world_size)
        self.device = self.enc.device

        self.batches = TrainStream(stream_spec(cfg, world, plan))
        # Per-rank noise stream: eps and z_p differ across ranks like the data does.
        self.noise_rng = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + world.rank)
        self.grid_real, self.grid_z = self._fixed_grid_inputs()
        self.step = 0
        self.images_seen = 0

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> Path:
        """Run until `train.total_steps`; returns the run folder."""
        t = self.cfg.train
        log = RunLog(self.run_dir / "metrics.jsonl", t.total_steps, self.step, self.world.is_main)
        log.message(f"run folder: {self.run_dir}")
        log.message(describe_epoch(self.batches.spec, self.batches.epoch))
        try:
            while self.step < t.total_steps:
                x = to_unit_float(next(self.batches).to(self.device, non_blocking=True))  # (B, 3, R, R)
                warmup = self.images_seen < self.cfg.loss.warmup_images
                noise = StepNoise.sample(x.shape[0], self.cfg.model.latent_dim, self.noise_rng, self.device)
                figures = train_step(self.enc, self.gen, x, noise, self._loss_weights(warmup))
                self.step += 1
                self.images_seen += t.batch_global
                record = _reduce_over_ranks(figures, self.batches.stats(), self.world)
                self._stop_if_non_finite(record)
                record.update(step=self.step, images_seen=self.images_seen, epoch=self.batches.epoch,
                              phase="warmup" if warmup else "adversarial")
                images_per_s = log.step(record, t.batch_global)
                if self.step % t.log_every_steps == 0:
                    log.message(_summary(record, images_per_s))
                if self.step % t.sample_every_steps == 0 or self.step == t.total_steps:
                    self.write_grid()
                if self.step % t.save_every_steps == 0 or self.step == t.total_steps:
                    path = self.save()
                    log.message(f"step {self.step}: checkpoint {path}")
        finally:
            log.close()
        return self.run_dir

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
                f"saving, the last good checkpoint is kept in {self.run_dir / 'checkpoints'}"
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
            e_dtype, g_dtype = next(enc.parameters()).dtype, next(gen.parameters()).dtype
            mu, _ = enc(self.grid_real.to(e_dtype))
            rec = gen(mu.to(g_dtype))
            sample = gen(self.grid_z.to(g_dtype))
        finally:
            enc.train(), gen.train()
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        if self.world.is_main:
            save_grid([self.grid_real, rec, sample], path)
        return path

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self) -> Path:
        """Both engines' sharded checkpoints in their own sub-folders, then trainer state and a
        COMPLETE marker once every rank has finished (a folder without it is not a checkpoint)."""
        folder = self.run_dir / "checkpoints" / f"step_{self.step:08d}"
        state = {"step": self.step, "images_seen": self.images_seen}
        self._engine_lib.save_engine(self.enc, folder / "encoder", "ds", state)
        self._engine_lib.save_engine(self.gen, folder / "generator", "ds", state)
        if self.world.world_size > 1:
            dist.barrier()
        if self.world.is_main:
            trainer_state = {
                **state,
                "phase": "warmup" if self.images_seen < self.cfg.loss.warmup_images else "adversarial",
                "world_size": self.world.world_size,
                "config": config_to_dict(self.cfg),
                "versions": _versions(),
            }
            _write_atomic(folder / "trainer_state.json", json.dumps(trainer_state, indent=1))
            _write_atomic(folder / "COMPLETE", "")
        if self.world.world_size > 1:
            dist.barrier()
        return folder


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
