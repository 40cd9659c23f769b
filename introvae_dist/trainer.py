"""Algorithm 1 over the shard stream: the trainer builds the engines, the stream and the
checkpointer from the plan, then runs the step (Algorithm 1 on one batch) and hands each step's
end to :class:`introvae_dist.maintenance.Maintenance` (logs, grids, evaluation, checkpoints).

Every check of the user's input runs before this, in :func:`introvae_dist.run_plan.plan_run`.
"""

from __future__ import annotations

from typing import Any

import torch

from introvae_dist import collectives
from introvae_dist.algorithm import StepNoise, train_step
from introvae_dist.checkpointing.checkpointer import Checkpointer, ResumePoint
from introvae_dist.checkpointing.rank_state import RankLocal
from introvae_dist.config import Config, ConfigError, config_to_dict
from introvae_dist.data.decode import to_unit_float
from introvae_dist.data.loader import TrainStream, derive_seed
from introvae_dist.distributed import World, cpu_threads_per_rank
from introvae_dist.ema import TrainingEMA
from introvae_dist.losses import LossWeights
from introvae_dist.maintenance import Maintenance
from introvae_dist.margin import Margin
from introvae_dist.models import build_networks
from introvae_dist.progress import Progress
from introvae_dist.run_folder import prepare_run_dir
from introvae_dist.run_plan import Plan, stream_spec, verify_shard_set
from introvae_dist.soft_algorithm import REENCODINGS, soft_train_step
from introvae_dist.soft_losses import SoftWeights


class Trainer:
    """Owns the two engines, the data stream and the run's progress; `train()` runs the loop."""

    def __init__(self, cfg: Config, world: World, plan: Plan) -> None:
        # Deferred: importing DeepSpeed costs seconds; `--dry-run` never needs it.
        from introvae_dist import engine

        self.cfg, self.world, self.plan = cfg, world, plan
        self._adopt = engine.adopt_outputs  # DeepSpeed's output hooks for G's shared forward
        threads = cpu_threads_per_rank(world)
        if threads is not None and not torch.cuda.is_available():
            torch.set_num_threads(threads)
        engine.init_distributed(cfg.run.collective_timeout_s)
        verify_shard_set(plan.shard_set, cfg.data.verify, world)
        self.run_dir = plan.resume.run_dir
        evaluator = self._build_evaluator() if cfg.eval.every_steps else None
        self.checkpointer = Checkpointer(plan.resume, cfg.train, world, config_to_dict(cfg))
        resumed = self.checkpointer.start()
        self.progress = Progress(cfg.loss.warmup_images)
        self.margin = Margin(cfg.loss, cfg.train.batch_global)
        if resumed is not None:
            self.progress.load_state_dict(resumed.state)
            self.margin.load_state_dict(resumed.state.get("margin"))
            self.margin.require_chosen_after_warmup(self.progress.images_seen)
        if world.is_main:
            prepare_run_dir(cfg, plan, resumed)
        collectives.barrier()

        self.enc, self.gen = self._build_engines(universal=resumed is not None and resumed.universal)
        self.device = self.enc.device
        # Per-rank noise stream: eps and z_p differ across ranks like the data does.
        self.noise_rng = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + world.rank)
        self.batches = TrainStream(stream_spec(cfg, world, plan))
        self.ema = self._build_ema()
        self.checkpointer.attach(self.enc, self.gen, self.batches,
                                 RankLocal(self.noise_rng, {"encoder": self.enc.module, "generator": self.gen.module}),
                                 self._trainer_state, self.ema)
        if resumed is not None:
            self._restore(resumed)
        self.maintenance = Maintenance(cfg, world, plan, self.checkpointer, evaluator, self.enc, self.gen, self.ema,
                                       self.margin)

    def _build_engines(self, universal: bool) -> tuple[Any, Any]:
        """E and G, the same initial weights on every rank, each in its DeepSpeed engine."""
        from introvae_dist import engine

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        encoder, generator = build_networks(cfg.model)
        # Channels-last activations, not weights: DeepSpeed's flat weight buffers are NCHW (and
        # its initial broadcast refuses channels-last parameters); oneDNN and cuDNN then run
        # the convolutions in the input's layout.
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        generator.activation_memory_format = self.memory_format
        batch, ranks = self.plan.batch_per_rank, self.world.world_size
        return (engine.build_engine(encoder, cfg.encoder, batch, ranks, universal),
                engine.build_engine(generator, cfg.generator, batch, ranks, universal))

    def _trainer_state(self) -> dict[str, Any]:
        """What trainer_state.json holds of the run's progress: steps, images, phase, and m."""
        return {**self.progress.state_dict(), "margin": self.margin.state_dict()}

    def _build_ema(self) -> TrainingEMA | None:
        """The weights' moving average (ema.*): of G, and of E too with ema.encoder; None when off."""
        e = self.cfg.ema
        if not e.enabled:
            return None
        engines = {"encoder": self.enc, "generator": self.gen} if e.encoder else {"generator": self.gen}
        return TrainingEMA(e, self.cfg.train.batch_global, engines)

    def _restore(self, resumed: ResumePoint) -> None:
        """Both engines and this rank's RNGs, buffers and stream position (Checkpointer.restore);
        after a world-size change the RNGs are re-seeded from (seed, step, rank)."""
        reseed = derive_seed(self.cfg.train.seed, self.progress.step, self.world.rank)
        self.checkpointer.restore(resumed, {"encoder": self.cfg.encoder, "generator": self.cfg.generator}, reseed)

    def _build_evaluator(self) -> Any:
        """Checks the eval section's inputs (shards, Inception file) before any engine starts."""
        from introvae_dist.evaluation import EvaluationInputError, TrainingEvaluator

        try:
            return TrainingEvaluator(self.cfg.eval, self.cfg.data.shards, self.run_dir, self.cfg.model.resolution_px,
                                     self.cfg.train.seed)
        except EvaluationInputError as e:
            raise ConfigError(f"eval: {e}") from None

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> str | None:
        """Run until `train.total_steps` or a stop signal; returns the signal's name if one
        stopped the run (after a complete checkpoint), else None."""
        self.maintenance.open_log(self.progress, self.batches)
        try:
            with self.checkpointer.stop_signals:
                while self.progress.step < self.cfg.train.total_steps:
                    phase, images_before = self.progress.phase, self.progress.images_seen
                    figures = self.train_on(next(self.batches), phase)
                    if self.ema is not None:
                        self.ema.update(images_before)  # StyleGAN's ramp-up counts the images before the step
                    self.progress.advance(self.cfg.train.batch_global)
                    stopped = self.maintenance.after_step(figures, phase, self.progress, self.batches)
                    if stopped:
                        return stopped
        finally:
            self.batches.close()  # on every path, a dead peer's error included (see close())
            self.maintenance.close()
        return None

    def train_on(self, images: torch.Tensor, phase: str) -> dict[str, torch.Tensor]:
        """One iteration of the objective on one batch of uint8 images (B, 3, R, R): E's update,
        then G's (Algorithm 1, or Soft-IntroVAE's); returns this rank's loss figures (not yet
        reduced over ranks)."""
        images = images.to(self.device, non_blocking=True)
        # Re-laid out while still uint8 (a quarter of the bytes); the float keeps the layout.
        x = to_unit_float(images.contiguous(memory_format=self.memory_format))
        latent = self.cfg.model.latent_dim
        if self.cfg.loss.objective == "soft_introvae":
            noise = StepNoise.sample(x.shape[0], latent, self.noise_rng, self.device, reencodings=REENCODINGS)
            return soft_train_step(self.enc, self.gen, x, noise, self._soft_weights(phase), adopt=self._adopt)
        noise = StepNoise.sample(x.shape[0], latent, self.noise_rng, self.device)
        return train_step(self.enc, self.gen, x, noise, self._loss_weights(phase), order=self.cfg.train.step_order,
                          adopt=self._adopt)

    def _loss_weights(self, phase: str) -> LossWeights:
        c = self.cfg.loss
        assert c.alpha is not None and c.beta is not None and c.l_ae_factor is not None  # objective introvae
        # VAE warm-up (Sec. 4.1): alpha = 0 reduces Eq. 11-12 to a plain VAE.
        return LossWeights(alpha=0.0 if phase == "warmup" else c.alpha, beta=c.beta, margin=self.margin.value,
                           l_ae_factor=c.l_ae_factor)

    def _soft_weights(self, phase: str) -> SoftWeights:
        c = self.cfg.loss
        assert c.beta_rec is not None and c.beta_kl is not None and c.beta_neg is not None and c.gamma_r is not None
        # The warm-up drops the adversarial terms: the plain VAE of Soft-IntroVAE's num_vae epochs.
        return SoftWeights(beta_rec=c.beta_rec, beta_kl=c.beta_kl, beta_neg=c.beta_neg, gamma_r=c.gamma_r,
                           adversarial=phase != "warmup")
