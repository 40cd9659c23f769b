"""Everything the end of a training step does besides Algorithm 1, in this order: the step's
figures reduced over ranks (and checked for NaN), the log, the sample grid, the evaluation and
the checkpoint. EDM's training_loop keeps the same split between the step and its maintenance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from introvae_dist import collectives
from introvae_dist.checkpointing.checkpointer import Checkpointer
from introvae_dist.config import Config, dump_config
from introvae_dist.data.loader import TrainStream, describe_epoch, read_fixed_images
from introvae_dist.distributed import World
from introvae_dist.ema import TrainingEMA
from introvae_dist.health import TrainingHealth
from introvae_dist.images import save_grid
from introvae_dist.margin import Margin
from introvae_dist.models import param_dtype
from introvae_dist.plot import render_curves
from introvae_dist.progress import Phase, Progress
from introvae_dist.run_log import METRICS_NAME, RunLog
from introvae_dist.run_plan import Plan
from introvae_dist.tensorboard_log import TensorBoardLog


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; training stops without saving."""


def reduce_over_ranks(figures: dict[str, torch.Tensor], data_counts: dict[str, int], flags: dict[str, bool],
                      world: World) -> tuple[dict[str, float], set[str]]:
    """Loss figures averaged, data counts summed and flags or-ed over ranks, in one collective.

    All ranks agree on the result, so all stop together on a NaN, and all save and stop
    together when any of them received a stop signal. `figures` are the objective's
    (algorithm.METRIC_NAMES or soft_algorithm.SOFT_METRIC_NAMES), in the same order on every
    rank: every rank runs the same step.
    """
    names = tuple(figures)
    losses = torch.stack([figures[name].float().cpu() for name in names])
    counts = torch.tensor([float(v) for v in data_counts.values()])
    raised = torch.tensor([float(v) for v in flags.values()])
    values = collectives.sum_(torch.cat([losses, counts, raised]))
    n_losses, n_counts = len(names), len(data_counts)
    values[:n_losses] /= world.world_size
    record: dict[str, float] = dict(zip(names, values[:n_losses].tolist()))
    record.update({f"data_{name}": int(v) for name, v in zip(data_counts, values[n_losses:n_losses + n_counts].tolist())})
    agreed = {name for name, v in zip(flags, values[n_losses + n_counts:].tolist()) if v > 0}
    return record, agreed


class Maintenance:
    """The step's end for one rank (every rank calls alike: the reduction, ZeRO-3 grid forwards,
    the evaluation and the save are collective); rank 0 alone writes the log and the grids."""

    def __init__(self, cfg: Config, world: World, plan: Plan, checkpointer: Checkpointer, evaluator: Any,
                 encoder: Any, generator: Any, ema: TrainingEMA | None, margin: Margin) -> None:
        self.cfg, self.world, self.checkpointer, self.evaluator = cfg, world, checkpointer, evaluator
        self.margin, self.health = margin, TrainingHealth()
        self.enc, self.gen, self.ema = encoder, generator, ema  # the engines, and their weights' average
        self.run_dir = plan.resume.run_dir
        self.grid_real, self.grid_z = self._fixed_grid_inputs(plan)
        self.log: RunLog | None = None
        self.tb = TensorBoardLog(self.run_dir, 0, enabled=False)  # open_log() opens the real one

    # -- the log --------------------------------------------------------------------------------

    def open_log(self, progress: Progress, stream: TrainStream) -> RunLog:
        t = self.cfg.train
        self.log = RunLog(self.run_dir / METRICS_NAME, t.total_steps, progress.step, self.world.is_main)
        # Rank 0's TensorBoard events; a resume hides those after the resumed step, as the log is cut back.
        self.tb = TensorBoardLog(self.run_dir, progress.step, enabled=t.tensorboard and self.world.is_main)
        self.tb.text("config", dump_config(self.cfg), progress.step)
        self.log.message(f"run folder: {self.run_dir}")
        self.log.message(describe_epoch(stream.spec, stream.epoch))
        if progress.step >= t.total_steps:
            self.log.message(f"nothing to do: step {progress.step} of train.total_steps={t.total_steps} is done "
                             "(raise train.total_steps to train on, or set run.name to start a new run)")
        return self.log

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.tb.close()

    # -- one step's end -------------------------------------------------------------------------

    def after_step(self, figures: dict[str, torch.Tensor], phase: Phase, progress: Progress,
                   stream: TrainStream) -> str | None:
        """Everything after Algorithm 1's updates at ``progress.step`` (already advanced);
        returns the stop signal's name when the run must stop (after its checkpoint)."""
        assert self.log is not None, "open_log() first"
        t, step = self.cfg.train, progress.step
        record, agreed = reduce_over_ranks(figures, stream.stats(), self.checkpointer.local_flags(), self.world)
        self._stop_if_non_finite(record, step)
        margin = self.margin.value  # the m this step used (0 before an automatic m is chosen: alpha = 0 then)
        record.update(step=step, images_seen=progress.images_seen, epoch=stream.epoch, phase=phase,
                      margin=self.margin.chosen)
        images_per_s = self.log.step(record, t.batch_global)
        self.tb.scalars({**record, "images_per_s": images_per_s}, step)
        if step % t.log_every_steps == 0:
            self.log.message(summary_line(record, images_per_s))
        chosen = self.margin.observe(progress.images_seen - t.batch_global, record["kl_real"])
        if chosen:
            self.log.message(f"step {step}: {chosen}")
        for warning in self.health.check(step, record, margin) if self.margin.active else ():
            self.log.message(warning)  # Theorem 1's regime, in terms of IntroVAE's m
        if step % t.sample_every_steps == 0 or step == t.total_steps:
            self.write_grid(step)
        if self.evaluator is not None and step % self.cfg.eval.every_steps == 0:
            self._evaluate(progress)
        end = self.checkpointer.after_step(step, agreed)
        if end.saved is not None:
            self.log.message(f"step {step}: checkpoint {end.saved} ({end.why})")
        return end.stop

    def _stop_if_non_finite(self, record: dict[str, float], step: int) -> None:
        bad = {k: v for k, v in record.items() if not math.isfinite(v)}
        if bad:
            terms = ", ".join(f"{k}={v}" for k, v in record.items())
            raise NonFiniteLoss(
                f"step {step}: non-finite loss in {', '.join(bad)} ({terms}); stopping without "
                f"saving, the last good checkpoint is kept in {self.checkpointer.dir}"
            )

    # -- sample grids ---------------------------------------------------------------------------

    def _fixed_grid_inputs(self, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """The shards' first images and a seeded z_p, the same on all ranks (ZeRO-3 forwards
        are collective), so every grid of a run shows the same inputs."""
        n, device = self.cfg.train.grid_images, self.enc.device
        real = read_fixed_images(plan.shard_set.shards, n, self.cfg.model.resolution_px)
        z = torch.randn(n, self.cfg.model.latent_dim, generator=torch.Generator().manual_seed(self.cfg.train.seed))
        return real.to(device), z.to(device)

    def networks(self) -> tuple[nn.Module, nn.Module]:
        """E and G for grids and evaluation: the EMA's where there is one (built afresh, fp32,
        eval mode; a collective under ZeRO-3), else the live modules."""
        ema = self.ema.networks(self.cfg.model, self.enc.device) if self.ema is not None else {}
        return ema.get("encoder", self.enc.module), ema.get("generator", self.gen.module)

    @torch.no_grad()
    def write_grid(self, step: int) -> Path:
        """PNG of rows real | reconstruction (from mu) | sample, at eval-mode BatchNorm, through
        the EMA weights where ema is on."""
        enc, gen = self.networks()
        enc.eval(), gen.eval()
        try:
            mu, _ = enc(self.grid_real.to(param_dtype(enc)))
            rec = gen(mu.to(param_dtype(gen)))
            sample = gen(self.grid_z.to(param_dtype(gen)))
        finally:
            enc.train(), gen.train()
        path = self.run_dir / "samples" / f"step_{step:08d}.png"
        if self.world.is_main:
            save_grid([self.grid_real, rec, sample], path, min_cell_px=self.cfg.train.grid_cell_px)
            self.tb.image("samples", path, step)
            render_curves(self.run_dir)  # RUN/curves.png: Fig. 5 of this run so far (metrics.jsonl is line-buffered)
        return path

    # -- evaluation during training (eval.every_steps; introvae_dist.evaluation) -----------------

    def _evaluate(self, progress: Progress) -> None:
        """Every rank evaluates its share of the networks as they are now; rank 0 logs the figures."""
        from introvae_dist.evaluation import summary
        from introvae_dist.rank_work import Workers
        from introvae_dist.run_log import EVAL_LOG_NAME

        assert self.log is not None
        enc, gen = self.networks()
        weights = ("raw weights" if self.ema is None else
                   "EMA weights" if len(self.ema.engines) == 2 else "EMA weights of the generator, raw of the other")
        record = self.evaluator.run(enc, gen, progress.step, progress.images_seen, Workers(self.world, self.enc.device),
                                    weights)
        if record is not None:
            self.log.message(f"step {progress.step}: eval {summary(record)} (in {EVAL_LOG_NAME})")
            self.tb.eval_scalars(record, progress.step)


def summary_line(record: dict[str, Any], images_per_s: float) -> str:
    """One log line of a step's figures, the six KL terms as the two updates see them; for
    Soft-IntroVAE the reconstruction error and E's exponentiated ELBO of x_r and x_p too."""
    kl = (f"KL real {record['kl_real']:.2f} | E sees rec {record['kl_rec_e']:.2f} fake {record['kl_fake_e']:.2f} "
          f"| G sees rec {record['kl_rec_g']:.2f} fake {record['kl_fake_g']:.2f}")
    if "exp_elbo_rec" in record:  # Soft-IntroVAE
        figures = (f"rec {record['rec_err']:.2f} | {kl} | exp-ELBO rec {record['exp_elbo_rec']:.3g} "
                   f"fake {record['exp_elbo_fake']:.3g}")
    else:
        figures = f"L_AE {record['l_ae']:.2f} | {kl}"
    return f"step {record['step']} [{record['phase']}] {figures} | {images_per_s:.1f} img/s" + _damage_note(record)


def _damage_note(record: dict[str, Any]) -> str:
    """Shown only once data went bad, so a clean run's log stays short."""
    skipped, damaged = record.get("data_samples_skipped", 0), record.get("data_shards_damaged", 0)
    return f" | data: {skipped} samples skipped, {damaged} shards damaged" if skipped or damaged else ""
