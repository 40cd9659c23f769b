"""Typed run configuration: YAML presets plus dotted overrides, validated before any work.

The only module that reads YAML. Each section is a dataclass that documents its fields and
validates itself on construction, so a config built in code (a test, a benchmark) is checked
like one read from a file; components receive their own section only. Unknown keys and wrong
types are rejected with the file and the dotted key named.

YAML is imported by the functions that read or write it only: the inference side imports the
dataclasses (the model section of an exported file) without it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, Literal

from introvae_dist.models import num_stages, table3_widths


class ConfigError(ValueError):
    """A configuration file, key or value is not what the trainer expects."""


@dataclass
class ModelConfig:
    """The networks of Table 3 (Appendix B)."""

    resolution_px: int = 128
    latent_dim: int = 256
    #: Width per stage, highest resolution first; null takes Table 3's widths.
    widths: list[int] | None = None
    #: "batch" (authors' code), "group", or "none"; group/none do not depend on the split.
    norm: Literal["batch", "group", "none"] = "batch"
    #: Recompute activations inside residual blocks in the backward pass.
    checkpoint_blocks: bool = True
    #: ... only in blocks that run at a side of at least this many pixels (0: every block). The
    #: high-resolution blocks hold most of the activations and cost no more FLOPs than the
    #: others, so a threshold keeps most of the memory saving for a part of the recomputation
    #: (docs/BENCHMARKS.md, memory at 1024).
    checkpoint_min_side_px: int = 0

    def resolved_widths(self) -> tuple[int, ...]:
        return tuple(self.widths) if self.widths is not None else table3_widths(self.resolution_px)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_finite(self, "model")
        try:
            stages = num_stages(self.resolution_px)
        except ValueError as e:
            raise ConfigError(f"model.resolution_px: {e}") from None
        if self.widths is None and self.resolution_px > 1024:
            raise ConfigError(f"model.resolution_px={self.resolution_px}: Table 3 ends at 1024; give model.widths")
        if self.widths is not None and (len(self.widths) != stages or min(self.widths) < 1):
            raise ConfigError(
                f"model.widths={self.widths}: expected {stages} positive widths for "
                f"resolution_px={self.resolution_px}"
            )
        _positive("model.latent_dim", self.latent_dim)
        if self.checkpoint_min_side_px < 0:
            raise ConfigError(f"model.checkpoint_min_side_px={self.checkpoint_min_side_px}: expected >= 0 (0: every block)")


#: The objectives `loss.objective` selects, each with its own keys and their defaults. A key
#: of one objective given with the other is refused (a weight that silently does nothing is
#: worse than an error); the other objective's keys stay null in the resolved config.
Objective = Literal["introvae", "soft_introvae"]
OBJECTIVE_KEYS: dict[str, dict[str, float | int]] = {
    # Eq. 11-12 (Sec. 4.1) and Eq. 10's factor; the margin's automatic choice (margin.py).
    "introvae": {"alpha": 0.25, "beta": 0.5, "margin": 110.0, "margin_factor": 1.5,
                 "margin_window_images": 4096, "l_ae_factor": 0.5},
    # Soft-IntroVAE (Daniel & Tamar 2021; soft_losses.py): the authors' train_soft_intro_vae.py
    # recommends beta_neg 256 at 28-32 px and 1024 for CelebA-HQ; gamma_r is its default.
    "soft_introvae": {"beta_rec": 1.0, "beta_kl": 1.0, "beta_neg": 256.0, "gamma_r": 1e-8},
}


@dataclass
class LossConfig:
    """The objective and its weights: IntroVAE's alpha, beta, m of Eq. 11-12 (Sec. 4.1) and
    Eq. 10's factor, or Soft-IntroVAE's betas; and the VAE warm-up, shared by both.

    A key left out (None) takes its objective's default from OBJECTIVE_KEYS at construction; the
    inactive objective's keys must stay None."""

    #: "introvae": Algorithm 1 (algorithm.py). "soft_introvae": Soft-IntroVAE's exponential
    #: of the ELBO of generated images in place of the hinge (soft_algorithm.py).
    objective: Objective = "introvae"
    alpha: float | None = None
    beta: float | None = None
    #: m of Eq. 11, or "auto": margin_factor x the mean KL(real) of the warm-up's last
    #: margin_window_images images (Appendix D: "a little larger than the training
    #: kl-divergence value of VAEs"; introvae_dist/margin.py). "auto" needs a warm-up.
    margin: float | Literal["auto"] | None = None
    #: With margin "auto": the factor over the warm-up's KL(real). 1.5 gave Fig. 5's balance on
    #: the demo and on photographs; 1.25 left the demo's KL(real) above m (docs/TRAINING.md).
    margin_factor: float | None = None
    #: With margin "auto": the warm-up images whose KL(real) is averaged (the last ones).
    margin_window_images: int | None = None
    #: 0.5 as in Eq. 10; 1.0 reproduces the authors' code.
    l_ae_factor: float | None = None
    #: Soft-IntroVAE: the weight of the reconstruction error (in every ELBO term).
    beta_rec: float | None = None
    #: Soft-IntroVAE: the weight of KL in the ELBO of real images (E) and of x_r, x_p (G).
    beta_kl: float | None = None
    #: Soft-IntroVAE: the weight of KL in the exponentiated ELBO of x_r and x_p (E).
    beta_neg: float | None = None
    #: Soft-IntroVAE: the weight of G's reconstruction of its own x_r and x_p.
    gamma_r: float | None = None
    #: Images trained as a plain VAE before the adversarial phase (Sec. 4.1; Soft-IntroVAE's
    #: optional num_vae): IntroVAE with alpha = 0, Soft-IntroVAE without its adversarial terms.
    warmup_images: int = 0

    def __post_init__(self) -> None:
        if self.objective in OBJECTIVE_KEYS:  # else validate() names the bad value
            self._refuse_other_objectives_keys()
            for name, default in OBJECTIVE_KEYS[self.objective].items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
        self.validate()

    def _refuse_other_objectives_keys(self) -> None:
        for objective, keys in OBJECTIVE_KEYS.items():
            given = [name for name in keys if objective != self.objective and getattr(self, name) is not None]
            if given:
                raise ConfigError(
                    f"loss.{given[0]}={getattr(self, given[0])!r} is a key of loss.objective={objective}, but "
                    f"loss.objective={self.objective}: remove {', '.join('loss.' + k for k in given)} or set "
                    f"loss.objective={objective}")

    def validate(self) -> None:
        if self.objective not in OBJECTIVE_KEYS:
            raise ConfigError(f"loss.objective={self.objective!r}: expected one of {', '.join(OBJECTIVE_KEYS)}")
        self._refuse_other_objectives_keys()
        _check_finite(self, "loss")
        _at_least_zero("loss.warmup_images", self.warmup_images)
        if self.objective == "soft_introvae":
            _positive("loss.beta_rec", self.beta_rec)  # type: ignore[arg-type]
            for name in ("beta_kl", "beta_neg", "gamma_r"):
                _at_least_zero(f"loss.{name}", getattr(self, name))
            return
        for name in ("alpha", "beta"):
            _at_least_zero(f"loss.{name}", getattr(self, name))
        if self.margin != "auto":
            _at_least_zero("loss.margin", self.margin, "or 'auto'")  # type: ignore[arg-type]
        _positive("loss.margin_factor", self.margin_factor)  # type: ignore[arg-type]
        _positive("loss.margin_window_images", self.margin_window_images)  # type: ignore[arg-type]
        _positive("loss.l_ae_factor", self.l_ae_factor)  # type: ignore[arg-type]
        if self.margin == "auto" and self.warmup_images <= 0:
            raise ConfigError("loss.margin=auto chooses m from the VAE warm-up's KL(real), but loss.warmup_images="
                              f"{self.warmup_images}: set loss.warmup_images > 0 (Sec. 4.1) or give loss.margin a value")
        if self.margin == "auto" and self.margin_window_images > self.warmup_images:  # type: ignore[operator]
            raise ConfigError(f"loss.margin_window_images={self.margin_window_images} is more than loss.warmup_images="
                              f"{self.warmup_images}: the window is the warm-up's last images; make it at most that")


@dataclass
class EngineConfig:
    """One DeepSpeed engine (one per network): ZeRO stage, precision and Adam."""

    zero_stage: int = 1
    #: "auto": bf16 where the device computes it natively (CUDA compute capability >= 8.0; a
    #: CPU with avx512_bf16 or amx_bf16), else fp32 (introvae_dist/precision.py). "bf16": bf16
    #: weights and activations, fp32 master weights in the optimiser. "fp32". "fp16" is read so
    #: that it is refused with the device's reason (run_plan.resolve_precision), not as a typo.
    precision: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    #: torch's fused Adam kernel: one pass over the fp32 master weights instead of several
    #: (docs/BENCHMARKS.md, issue 7). Same update, same state.
    fused_adam: bool = True
    #: Clip this network's gradient to this global L2 norm before its Adam step (0: off).
    #: Off as in the paper; DeepSpeed would clip to 1.0 unless told (docs/DEEPSPEED.md).
    grad_clip_norm: float = 0.0
    #: Under bf16, the dtype in which gradients are summed over ranks: "fp32" rounds the sum
    #: to bf16 once, "bf16" (DeepSpeed's default) at every addition but sends half the bytes.
    #: fp32 precision always reduces in fp32 (docs/DEEPSPEED.md).
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    #: Not a setting: the section this engine fills ("encoder" or "generator"), so that the
    #: messages name its keys in full (encoder.lr); "" names them bare (lr). The one section
    #: that needs it, as the only one with two places in a Config.
    section: InitVar[str] = ""

    def __post_init__(self, section: str) -> None:
        self.validate(section)

    def validate(self, section: str = "") -> None:
        key = _keys_under(section)
        _check_finite(self, section)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{key('zero_stage')}={self.zero_stage}: expected 0, 1, 2 or 3")
        _positive(key("lr"), self.lr)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{key('betas')}={self.betas}: expected two values in [0, 1)")
        _positive(key("adam_eps"), self.adam_eps)
        _at_least_zero(key("grad_clip_norm"), self.grad_clip_norm, "0 turns it off")
        if self.grad_reduce_dtype == "bf16" and self.precision != "bf16":
            raise ConfigError(f"{key('grad_reduce_dtype')}=bf16 with {key('precision')}={self.precision}: "
                              "only bf16 gradients can be reduced in bf16; set precision to bf16 or drop the key")


@dataclass
class DataConfig:
    """Where the training shards are and how they are read."""

    #: A shard folder, manifest.json, brace pattern (x-{000000..000009}.tar), glob, or
    #: pipe:/http URL; several joined by "::".
    shards: str = "shards/synthetic"
    #: A local copy of the manifest of remote (pipe:/http) shards: their counts and checksums.
    manifest: str | None = None
    #: "epoch": each image at most once per epoch (each loader stream leaves out fewer than a
    #: batch); "resampled": shards drawn with replacement, an endless stream. See docs/DATA.md.
    mode: Literal["epoch", "resampled"] = "epoch"
    #: Loader worker processes per rank; every rank x worker reads shards of its own.
    num_workers: int = 2
    #: Encoded samples held in each worker's shuffle buffer.
    shuffle_buffer: int = 256
    hflip: bool = True
    #: Check local shards against the manifest before training: "sha256" (split over ranks),
    #: "size" (a stat per shard) or "none".
    verify: Literal["sha256", "size", "none"] = "sha256"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_finite(self, "data")
        if not self.shards.strip():
            raise ConfigError("data.shards is empty: expected a shard folder, pattern or URL")
        _at_least_zero("data.num_workers", self.num_workers)
        _positive("data.shuffle_buffer", self.shuffle_buffer)


@dataclass
class TrainConfig:
    """Batch, length, seed and the intervals of logs, sample grids and checkpoints."""

    #: Images per optimiser step over all ranks; must divide evenly by the number of ranks.
    batch_global: int = 8
    total_steps: int = 1000
    seed: int = 0
    log_every_steps: int = 10
    sample_every_steps: int = 500
    save_every_steps: int = 1000
    #: Also save when this many minutes have passed since the last save (0: off). A preempted
    #: job loses at most this much work even when steps are slow.
    save_every_minutes: float = 0.0
    #: Checkpoints kept besides the permanent ones; older ones are deleted after each save.
    keep_last_checkpoints: int = 3
    #: Checkpoints whose step is a multiple of this are kept for good (0: none).
    keep_every_steps: int = 0
    #: Folders set aside (``step_N.set-aside-TIME``: a damaged checkpoint, or a killed save in
    #: the way of a new one) kept for inspection; older ones are deleted after each save.
    keep_set_aside_checkpoints: int = 2
    #: Images per row kind (real | reconstruction | sample) in a sample grid.
    grid_images: int = 8
    #: Grid cells are shown at least this many pixels on a side (whole-factor nearest-neighbour
    #: enlargement, images.save_grid): 32 px images become 128 px cells. 0 keeps native size.
    grid_cell_px: int = 128
    #: "algorithm1": the paper's Algorithm 1. "shared_encoder": the fast path, one encoder
    #: pass over x_r and x_p for both updates, G's gradient with E before its step
    #: (Appendix C; introvae_dist.algorithm.shared_encoder_phases, docs/BENCHMARKS.md).
    step_order: Literal["algorithm1", "shared_encoder"] = "algorithm1"
    #: Activations in channels-last (NHWC) memory layout: faster bf16 convolutions in oneDNN
    #: and cuDNN, slower fp32 ones on a CPU (docs/BENCHMARKS.md). "auto": NHWC on CUDA or where
    #: an engine runs bf16, NCHW for fp32 on a CPU (precision.choose_channels_last); resolved
    #: before training, as precision is. Same results up to summation order.
    channels_last: bool | Literal["auto"] = "auto"
    #: Also write TensorBoard event files into RUN/tensorboard/ on rank 0 (view them with
    #: `tensorboard --logdir runs`): metrics.jsonl's figures, the sample grids and this config.
    #: metrics.jsonl is written either way.
    tensorboard: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_finite(self, "train")
        for name in ("batch_global", "total_steps", "log_every_steps", "sample_every_steps",
                     "save_every_steps", "grid_images", "keep_last_checkpoints"):
            _positive(f"train.{name}", getattr(self, name))
        _at_least_zero("train.keep_set_aside_checkpoints", self.keep_set_aside_checkpoints)
        _at_least_zero("train.grid_cell_px", self.grid_cell_px, "0 keeps the images' own size")
        for name in ("save_every_minutes", "keep_every_steps"):
            _at_least_zero(f"train.{name}", getattr(self, name), "0 turns it off")
        if not 0 <= self.seed < 2**32:  # NumPy's seeds are 32-bit
            raise ConfigError(f"train.seed={self.seed}: expected an integer in [0, 2**32)")


@dataclass
class EvalConfig:
    """A small ``introvae-dist evaluate`` every ``every_steps`` steps, appended to RUN/eval.jsonl
    (docs/EVALUATION.md). Off by default: FID needs the Inception weights file."""

    #: 0: off.
    every_steps: int = 0
    #: Of "fid", "ms_ssim", "rmse", "sharpness" (rmse needs heldout_shards; sharpness compares
    #: the first num_images samples with the first num_real images of real_shards).
    metrics: list[Literal["fid", "ms_ssim", "rmse", "sharpness"]] = field(default_factory=lambda: ["fid", "ms_ssim"])
    #: Generated images for FID and sharpness (the paper's FID uses 50,000; this is a quick look).
    num_images: int = 1000
    ms_ssim_pairs: int = 500
    #: FID's and sharpness's real images; null: data.shards. The first num_real of them.
    real_shards: str | None = None
    num_real: int = 5000
    #: Held-out images for RMSE/PSNR; the first num_heldout of them.
    heldout_shards: str | None = None
    num_heldout: int = 500
    #: The FID Inception weights file; null: $INTROVAE_DIST_INCEPTION.
    inception: str | None = None
    #: Cache of real-set statistics; null: $INTROVAE_DIST_CACHE/fid-stats or ~/.cache/introvae-dist/fid-stats.
    cache_dir: str | None = None
    #: Images per forward pass on each rank (even: MS-SSIM pairs images 2k, 2k+1).
    batch_per_rank: int = 32

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_finite(self, "eval")
        _at_least_zero("eval.every_steps", self.every_steps, "0 turns it off")
        for name in ("num_images", "ms_ssim_pairs", "num_real", "num_heldout", "batch_per_rank"):
            _positive(f"eval.{name}", getattr(self, name))
        if not self.metrics:
            raise ConfigError("eval.metrics is empty: expected some of fid, ms_ssim, rmse, sharpness")
        if "rmse" in self.metrics and not self.heldout_shards:
            raise ConfigError("eval.metrics has rmse: set eval.heldout_shards to the held-out images")


@dataclass
class EmaConfig:
    """The moving average of the weights used for samples, metrics and export (introvae_dist.ema;
    StyleGAN2-ADA's G_ema)."""

    #: Images over which a weight's share of the average halves (StyleGAN's ema_kimg x 1000);
    #: 0 turns the EMA off. 10,000 is StyleGAN2-ADA's value at its batch of 32 (ema_kimg =
    #: batch x 10 / 32): a third of a CelebA-HQ epoch, 0.3% of LSUN Bedroom's.
    half_life_images: float = 10_000.0
    #: While shorter, the half-life is this share of the images seen so far (StyleGAN's
    #: ema_rampup), so the start of training is forgotten fast; 0: no ramp-up.
    rampup: float = 0.05
    #: Also average E's weights (reconstructions); G's always are when the EMA is on. Off: E's
    #: average helped held-out reconstructions on the demo (+0.5 dB) but not on photographs
    #: (-0.2 dB), so it does not measure better (docs/TRAINING.md).
    encoder: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        return self.half_life_images > 0

    def validate(self) -> None:
        _check_finite(self, "ema")
        _at_least_zero("ema.half_life_images", self.half_life_images, "0 turns the EMA off")
        _at_least_zero("ema.rampup", self.rampup, "0: no ramp-up")


@dataclass
class RunConfig:
    """Where outputs land (the run folder ROOT/NAME), where training resumes from, and how
    long a rank waits for the others before giving up."""

    root: str = "runs"
    name: str = "introvae"
    #: "auto": continue from the newest complete checkpoint in the run folder, if any (what a
    #: requeued job needs); or the path of a checkpoint step folder or another run folder.
    resume: str = "auto"
    #: Seconds a collective may wait for the other ranks; a dead rank ends the job after at
    #: most this long instead of hanging it. Generous by default: saves and the first step
    #: of a large model can take minutes.
    collective_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_finite(self, "run")
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name={self.name!r}: expected a non-empty name without '/'")
        if not self.resume.strip():
            raise ConfigError("run.resume is empty: expected 'auto' or a checkpoint or run folder")
        _positive("run.collective_timeout_s", self.collective_timeout_s)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    encoder: EngineConfig = field(default_factory=EngineConfig)
    generator: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every section again, naming the engines' keys in full: a section is checked when
        it is built, but a field set afterwards (cfg.encoder.lr = ...) is only seen here."""
        self.model.validate()
        self.loss.validate()
        self.encoder.validate("encoder")
        self.generator.validate("generator")
        self.data.validate()
        self.train.validate()
        self.eval.validate()
        self.ema.validate()
        self.run.validate()
        if self.loss.objective != "introvae" and self.train.step_order != "algorithm1":
            raise ConfigError(f"train.step_order={self.train.step_order} is a fast path of loss.objective=introvae; "
                              f"loss.objective={self.loss.objective} has one order: set train.step_order=algorithm1")


def _positive(key: str, value: float) -> None:
    if not value > 0:  # written so that NaN fails too
        raise ConfigError(f"{key}={value}: expected a positive value")


def _at_least_zero(key: str, value: float, meaning: str = "") -> None:
    if not value >= 0:  # written so that NaN fails too
        raise ConfigError(f"{key}={value}: expected a value >= 0" + (f" ({meaning})" if meaning else ""))


def _keys_under(section: str) -> typing.Callable[[str], str]:
    """The full name of a key of `section` ("encoder" + "lr" -> "encoder.lr"; "" + "lr" -> "lr")."""
    return lambda name: f"{section}.{name}" if section else name


def _check_finite(part: Any, section: str) -> None:
    """Every float of a section is a finite number: NaN or inf would pass a range check
    written as `value < 0` and surface later, deep inside Adam or the loss. Checked before a
    section's ranges, so that NaN is named as such."""
    key = _keys_under(section)
    for f in dataclasses.fields(part):
        value = getattr(part, f.name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key(f.name)}={value}: expected a finite number")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, converting int -> float where allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        expected = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key, source)
            except ConfigError:
                # every option named in one message, e.g. "expected bool or 'auto'"
                literal = typing.get_origin(option) is Literal
                expected.append(" or ".join(map(repr, typing.get_args(option))) if literal else _type_name(option))
        raise ConfigError(f"{source}: {key}={value!r}: expected {' or '.join(expected) or 'a supported type'}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{source}: {key}={value!r}: expected one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}={value!r}: expected a list of {_type_name(item_tp)}")
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML follows YAML 1.1, which reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{source}: {key}={value!r}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]  # without InitVars: `section` is no key
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{dotted}'; known keys here: {', '.join(known)}")
        kwargs[key] = _convert(value, hints[key], dotted, source)
    if isinstance(hints.get("section"), InitVar):  # an engine: its messages name encoder.lr, not lr
        kwargs["section"] = prefix
    try:
        return cls(**kwargs)  # each section validates itself
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. encoder.lr=1e-4")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{part}' is not a section")
    import yaml

    value = yaml.safe_load(text) if text.strip() else ""
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                notes: list[str] | None = None) -> Config:
    """Read a YAML preset (or the defaults when `path` is None), apply dotted overrides,
    type-check and validate. Raises ConfigError naming the file and key. What the reading
    decided for the user (keys an objective switch left unused) is appended to `notes`."""
    import yaml

    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a text file (expected UTF-8 YAML; byte {e.start} is "
                              f"{e.object[e.start:e.start + 1]!r})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        raw = loaded or {}
    file_loss = raw.get("loss") if isinstance(raw.get("loss"), dict) else {}
    file_objective, file_keys = file_loss.get("objective", "introvae"), set(file_loss)
    for override in overrides:
        _apply_override(raw, override)
    if overrides:
        source = f"{source} + command-line overrides"
    dropped = _drop_switched_objectives_keys(raw, file_objective, file_keys, overrides)
    if dropped and notes is not None:
        notes.append(f"loss.objective={raw['loss']['objective']} on the command line: {source.split(' + ')[0]}'s "
                     f"keys of {file_objective} ({', '.join('loss.' + k for k in dropped)}) are not used")
    cfg: Config = _build(Config, raw, "", source)
    return cfg


def _drop_switched_objectives_keys(raw: dict[str, Any], file_objective: Any, file_keys: set[str],
                                   overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Where an override switches `loss.objective` away from the file's, the file's keys of its
    own objective are dropped (returned), so that one override runs a preset with the other
    objective (the demo with `loss.objective=soft_introvae`). Such keys given on the command
    line are still refused: the user typed them with the new objective."""
    loss = raw.get("loss")
    if not isinstance(loss, dict) or loss.get("objective", "introvae") == file_objective:
        return []
    typed = {o.split("=", 1)[0].strip().removeprefix("loss.") for o in overrides if o.strip().startswith("loss.")}
    own = OBJECTIVE_KEYS.get(str(file_objective), {})
    dropped = [k for k in own if k in file_keys and k not in typed]
    for k in dropped:
        del loss[k]
    return dropped


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved configuration as YAML (written into every run folder)."""
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
