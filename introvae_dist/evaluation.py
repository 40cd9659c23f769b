"""``introvae-dist evaluate`` and the evaluation during training: FID, MS-SSIM,
reconstruction error and sharpness, each rank doing its share.

Protocols (docs/EVALUATION.md has them in full):

* FID (Heusel et al. 2017): pool3 features of the FID Inception network over ``num_generated``
  samples (50,000 by default, the paper's Table 2) against the first ``num_real`` images of a
  real shard set (50,000 or all there are), decoded at the model's resolution as training
  decodes them. The real set's statistics are cached under a key that hashes the shards'
  sha256s (the manifest's, or hashed here), the number of images, the resolution and the
  feature network id, so the same set is read once per network and resolution.
* MS-SSIM (PGGAN's protocol, :mod:`introvae_dist.metrics.ms_ssim`): over ``ms_ssim_pairs``
  pairs of samples (images 2k and 2k+1; 10,000 pairs by default), 8-bit, at ``ms_ssim_px``
  (128): larger samples are box-downsampled to it, smaller ones are measured at their size.
* Reconstruction: RMSE and PSNR (peak 1, per image, averaged) of G(mu) against the first
  ``num_heldout`` images of a held-out shard set.
* Sharpness (:mod:`introvae_dist.metrics.sharpness`): the mean variance of the Laplacian and
  the mean share of spectral power above half Nyquist, of the first ``num_generated``
  samples and of FID's real images (the first ``num_real`` of the real set), both 8-bit at
  the model's resolution, so the two can be compared.

Samples are those of ``introvae-dist sample --seed`` (:mod:`introvae_dist.inference`): the
same images for any number of ranks; images ``[0, max(num_generated, 2 * pairs))`` serve FID,
sharpness and MS-SSIM. Every rank takes a contiguous run of whole batches of each list, and
the sums (feature statistics, MS-SSIM values, squared errors, sharpness values) are added over
ranks; rank 0 computes the figures. No DeepSpeed or YAML here: the trainer hands in its section.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from introvae_dist import collectives
from introvae_dist.data.image_inputs import check_stored_size
from introvae_dist.data.loader import read_image_range
from introvae_dist.data.shard_set import DataError, ShardSet, resolve_shard_set, verify_shards, with_sample_counts
from introvae_dist.data.tar_reader import ReadStats
from introvae_dist.files import sha256_of_file, write_atomic
from introvae_dist.images import to_uint8
from introvae_dist.inference import decode, generated_batches, latents
from introvae_dist.metrics.fid import FeatureExtractor, FeatureStats, frechet_distance
from introvae_dist.metrics.inception import FEATURE_DIM, InceptionWeightsError, how_to_get_weights, load_fid_inception
from introvae_dist.metrics.ms_ssim import PGGAN_WEIGHTS, ms_ssim
from introvae_dist.metrics.pixels import mse_per_image, psnr_db
from introvae_dist.metrics.sharpness import high_frequency_share, laplacian_variance
from introvae_dist.models import param_dtype
from introvae_dist.rank_work import Workers
from introvae_dist.run_log import EVAL_LOG_NAME  # noqa: F401  (the run folder's eval log; re-exported)

METRICS = ("fid", "ms_ssim", "rmse", "sharpness")
#: Environment variables: the Inception weights file, and the cache folder of real statistics.
INCEPTION_ENV = "INTROVAE_DIST_INCEPTION"
CACHE_ENV = "INTROVAE_DIST_CACHE"
STATS_FORMAT = "introvae-dist-fid-stats/1"
MS_SSIM_LEVELS = len(PGGAN_WEIGHTS)


class EvaluationInputError(ValueError):
    """Bad evaluation input (metric, shard set, resolution, Inception file); names it."""


@dataclass(frozen=True)
class FeatureNetwork:
    """What FID measures with: images (B, 3, H, W) in [0, 1] -> features (B, dim), and an id
    that keys the cache of real statistics (two networks never share one)."""

    extract: FeatureExtractor
    id: str
    dim: int


@dataclass(frozen=True)
class EvalPlan:
    """One evaluation, checked (:func:`plan_evaluation`)."""

    metrics: tuple[str, ...]
    resolution_px: int
    num_generated: int = 50_000
    ms_ssim_pairs: int = 10_000
    ms_ssim_px: int = 128
    real: ShardSet | None = None
    num_real: int = 50_000
    heldout: ShardSet | None = None
    #: None: every image of the held-out set.
    num_heldout: int | None = None
    seed: int = 0
    batch: int = 32
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())

    @property
    def num_samples(self) -> int:
        """Generated images needed: FID's, sharpness's and MS-SSIM's share one list."""
        return max(self.num_generated if {"fid", "sharpness"} & set(self.metrics) else 0,
                   2 * self.ms_ssim_pairs if "ms_ssim" in self.metrics else 0)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "introvae-dist") / "fid-stats"


def inception_path(explicit: str | Path | None) -> Path | None:
    """``--inception`` / ``eval.inception`` if given, else ``$INTROVAE_DIST_INCEPTION``, else None."""
    if explicit:
        return Path(explicit).expanduser()
    from_env = os.environ.get(INCEPTION_ENV)
    return Path(from_env).expanduser() if from_env else None


def load_inception(explicit: str | Path | None, device: torch.device | str) -> FeatureNetwork:
    """The standard FID network from a local file (no network access).

    Raises:
        EvaluationInputError: no file given, or the file is missing or not the FID weights;
            the message says where to get it.
    """
    path = inception_path(explicit)
    if path is None:
        raise EvaluationInputError(f"FID needs the Inception weights and none were given: {how_to_get_weights()}; "
                                   f"or leave FID out (--metrics ms_ssim,rmse)")
    try:
        network, network_id = load_fid_inception(path, device)
    except InceptionWeightsError as e:
        raise EvaluationInputError(str(e)) from None
    return FeatureNetwork(network, network_id, FEATURE_DIM)


def plan_evaluation(metrics: tuple[str, ...] | list[str], resolution_px: int, *, real: str | None = None,
                    heldout: str | None = None, **settings: Any) -> EvalPlan:
    """Check the request against the model before any image is drawn.

    Raises:
        EvaluationInputError: unknown metric, FID or sharpness without a real set, RMSE without
            a held-out set, shards that cannot be read or store images smaller than the model's,
            MS-SSIM at a size it cannot measure, an odd batch with MS-SSIM, non-positive counts.
    """
    metrics = tuple(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise EvaluationInputError(f"metrics {','.join(metrics) or '(none)'}: expected some of {','.join(METRICS)}")
    if "fid" in metrics and not real:
        raise EvaluationInputError("FID needs a real shard set to compare with (--real SHARDS)")
    if "sharpness" in metrics and not real:
        raise EvaluationInputError("sharpness compares samples with real images: it needs a real shard set "
                                   "(--real SHARDS)")
    if "rmse" in metrics and not heldout:
        raise EvaluationInputError("RMSE/PSNR need a held-out shard set (--heldout SHARDS)")
    needs_real = "fid" in metrics or "sharpness" in metrics
    plan = EvalPlan(metrics, resolution_px, real=_shard_set(real, resolution_px) if needs_real else None,
                    heldout=_shard_set(heldout, resolution_px) if "rmse" in metrics else None, **settings)
    for name in ("num_generated", "ms_ssim_pairs", "ms_ssim_px", "num_real", "batch"):
        if getattr(plan, name) <= 0:
            raise EvaluationInputError(f"{name}={getattr(plan, name)}: expected a positive number")
    if plan.num_heldout is not None and plan.num_heldout <= 0:
        raise EvaluationInputError(f"num_heldout={plan.num_heldout}: expected a positive number")
    if plan.seed < 0:
        raise EvaluationInputError(f"seed={plan.seed}: expected >= 0")
    if "ms_ssim" in metrics:
        side = min(resolution_px, plan.ms_ssim_px)
        if side % 2 ** (MS_SSIM_LEVELS - 1) or resolution_px % side:
            raise EvaluationInputError(f"MS-SSIM at {side} px of {resolution_px} px samples: needs a side divisible "
                                       f"by {2 ** (MS_SSIM_LEVELS - 1)} that divides the samples' side")
        if plan.batch % 2:
            raise EvaluationInputError(f"batch={plan.batch}: MS-SSIM pairs images 2k and 2k+1, so the batch must be even")
    if "fid" in metrics and plan.num_generated < 2:
        raise EvaluationInputError("FID needs at least 2 generated images")
    return plan


def _shard_set(spec: str | None, resolution_px: int) -> ShardSet:
    """The shard set, its counts, and a size check against its manifest (a stat per shard: the
    cache key trusts the manifest's sha256s, and a truncated shard is the common damage)."""
    try:
        shard_set = with_sample_counts(resolve_shard_set(str(spec)))
        check_stored_size(shard_set, resolution_px)
    except DataError as e:
        raise EvaluationInputError(str(e)) from None
    problems = verify_shards(list(shard_set.shards), "size")
    if problems:
        raise EvaluationInputError(f"{shard_set.manifest_path or spec}: shards do not match the manifest: "
                                   + "; ".join(problems[:3]))
    return shard_set


# --- the evaluation --------------------------------------------------------------------------

def evaluate(encoder: nn.Module, generator: nn.Module, plan: EvalPlan, workers: Workers,
             features: FeatureNetwork | None = None, *, pad_forwards: bool = False,
             progress: bool = True) -> dict[str, Any] | None:
    """Run ``plan`` with this rank's share; every rank must call it. Returns the figures on
    rank 0 (None elsewhere).

    ``features`` is required for FID. ``pad_forwards``: every rank runs the same number of
    E and G forwards (dummy ones where its share is shorter), for modules whose forward is a
    collective (a ZeRO-3 engine's module, inside training).
    """
    if "fid" in plan.metrics and features is None:
        raise EvaluationInputError("FID needs a feature network")
    started = time.perf_counter()
    record: dict[str, Any] = {"seed": plan.seed, "world_size": workers.world.world_size}
    bar = _ProgressFactory(progress and workers.is_main)
    if plan.num_samples:
        record.update(_sample_figures(generator, plan, workers, features, pad_forwards, bar))
    if "rmse" in plan.metrics:
        record.update(_reconstruction_figures(encoder, generator, plan, workers, pad_forwards, bar))
    record["elapsed_s"] = round(time.perf_counter() - started, 3)
    return record if workers.is_main else None


def _sample_figures(generator: nn.Module, plan: EvalPlan, workers: Workers, features: FeatureNetwork | None,
                    pad_forwards: bool, bar: _ProgressFactory) -> dict[str, Any]:
    num_fid = plan.num_generated if "fid" in plan.metrics else 0
    num_sharp = plan.num_generated if "sharpness" in plan.metrics else 0
    num_pairs_images = 2 * plan.ms_ssim_pairs if "ms_ssim" in plan.metrics else 0
    total = plan.num_samples
    share = workers.share(total, plan.batch)
    stats = FeatureStats(features.dim, workers.device) if features is not None and num_fid else None
    ms_ssim_sum = torch.zeros(2, dtype=torch.float64)  # sum of values, number of pairs
    sharp_sums = torch.zeros(3, dtype=torch.float64)  # see _sharpness_sums
    batches = generated_batches(generator, share.start, share.stop, plan.seed, plan.batch, workers.device)
    done = 0
    with bar(total=len(share), desc="samples (rank 0)") as progress:
        for first, images in batches:
            pixels = to_uint8(images)  # (n, 3, R, R), what a saved sample holds
            if stats is not None and first < num_fid:
                fid_part = pixels[:num_fid - first]
                stats.add(features.extract(fid_part.to(workers.device, torch.float32) / 255.0))
            if first < num_pairs_images:
                paired = pixels[:num_pairs_images - first]  # an even count from an even index
                small = _downsample_to(paired.to(torch.float64), plan.ms_ssim_px)
                values = ms_ssim(small[0::2], small[1::2])
                ms_ssim_sum += torch.tensor([values.sum().item(), values.numel()], dtype=torch.float64)
            if first < num_sharp:
                sharp_sums += _sharpness_sums(pixels[:num_sharp - first])
            done += 1
            progress.update(images.shape[0])
    if pad_forwards:
        for _ in range(workers.rounds(total, plan.batch) - done):
            decode(generator, latents(plan.seed, range(1), generator.latent_dim), workers.device)
    figures: dict[str, Any] = {}
    if stats is not None:
        generated = FeatureStats.from_flat(collectives.sum_(stats.to_flat()), stats.dim)
        real, real_info = real_statistics(plan, workers, features, bar)  # type: ignore[arg-type]
        if workers.is_main:
            figures["fid"] = frechet_distance(*generated.mean_cov(), *real)
        figures.update(fid_num_generated=generated.count, feature_network=features.id, **real_info)  # type: ignore[union-attr]
    if num_pairs_images:
        total_value, pairs = collectives.sum_(ms_ssim_sum).tolist()
        figures.update(ms_ssim=total_value / pairs, ms_ssim_pairs=int(pairs),
                       ms_ssim_px=min(plan.ms_ssim_px, plan.resolution_px))
    if num_sharp:
        figures.update(_sharpness_means(collectives.sum_(sharp_sums), "samples"))
        figures.update(_real_sharpness(plan, workers, bar))
    return figures


def _sharpness_sums(pixels: torch.Tensor) -> torch.Tensor:
    """[sum of Laplacian variances, sum of high-frequency shares, images] of uint8 (n, 3, R, R),
    float64 on the CPU, for adding over batches and ranks."""
    x = pixels.to(torch.float64) / 255.0
    return torch.tensor([laplacian_variance(x).sum().item(), high_frequency_share(x).sum().item(), x.shape[0]],
                        dtype=torch.float64)


def _sharpness_means(sums: torch.Tensor, of: str) -> dict[str, Any]:
    laplacian_sum, share_sum, count = sums.tolist()
    return {f"laplacian_var_{of}": laplacian_sum / count, f"hf_share_{of}": share_sum / count,
            f"sharpness_num_{of}": int(count)}


def _real_sharpness(plan: EvalPlan, workers: Workers, bar: _ProgressFactory) -> dict[str, Any]:
    """Sharpness of FID's real images: the first ``num_real`` of the real set, decoded as training
    decodes them (read on every call; the figures are cheap next to the samples')."""
    real = plan.real
    assert real is not None and real.num_samples is not None
    total = min(real.num_samples, plan.num_real)
    share = workers.share(total, plan.batch)
    sums, read = torch.zeros(3, dtype=torch.float64), ReadStats()
    with bar(total=len(share), desc="real set, sharpness (rank 0)") as progress:
        for pixels in read_image_range(real.shards, share.start, share.stop, plan.resolution_px, plan.batch, read):
            sums += _sharpness_sums(pixels)
            progress.update(pixels.shape[0])
    sums = collectives.sum_(sums)
    if sums[2].item() == 0:
        raise EvaluationInputError(f"{real.manifest_path or real.spec}: no decodable real image")
    return {**_sharpness_means(sums, "real"), "sharpness_real": str(real.manifest_path or real.spec)}


def _downsample_to(images: torch.Tensor, side_px: int) -> torch.Tensor:
    """Box-downsample (B, C, R, R) to ``side_px`` when larger (R a multiple of it)."""
    factor = images.shape[-1] // side_px
    return F.avg_pool2d(images, factor) if factor > 1 else images


def _reconstruction_figures(encoder: nn.Module, generator: nn.Module, plan: EvalPlan, workers: Workers,
                            pad_forwards: bool, bar: _ProgressFactory) -> dict[str, Any]:
    heldout = plan.heldout
    assert heldout is not None and heldout.num_samples is not None
    total = min(heldout.num_samples, plan.num_heldout or heldout.num_samples)
    share = workers.share(total, plan.batch)
    read = ReadStats()
    sums = torch.zeros(3, dtype=torch.float64)  # sum of MSE, sum of PSNR, images
    done = 0
    with bar(total=len(share), desc="held-out (rank 0)") as progress:
        for pixels in read_image_range(heldout.shards, share.start, share.stop, plan.resolution_px, plan.batch, read):
            x = pixels.float() / 255.0
            rec = _reconstruct_from_mu(encoder, generator, x, workers.device)
            mse = mse_per_image(x, rec)
            sums += torch.tensor([mse.sum().item(), psnr_db(mse).sum().item(), mse.numel()], dtype=torch.float64)
            done += 1
            progress.update(x.shape[0])
    if pad_forwards:
        dummy = torch.zeros(1, 3, plan.resolution_px, plan.resolution_px)
        for _ in range(workers.rounds(total, plan.batch) - done):
            _reconstruct_from_mu(encoder, generator, dummy, workers.device)
    sum_mse, sum_psnr, count = collectives.sum_(sums).tolist()
    skipped = int(collectives.sum_(torch.tensor([float(read.samples_skipped)], dtype=torch.float64)).item())
    if count == 0:
        raise EvaluationInputError(f"{heldout.manifest_path or heldout.spec}: no decodable held-out image")
    return {"rmse": float(np.sqrt(sum_mse / count)), "psnr_db": sum_psnr / count, "recon_num_images": int(count),
            "recon_skipped": skipped, "heldout": str(heldout.manifest_path or heldout.spec)}


@torch.no_grad()
def _reconstruct_from_mu(encoder: nn.Module, generator: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    mu, _ = encoder(x.to(device=device, dtype=param_dtype(encoder)))
    return decode(generator, mu, device)


# --- real statistics and their cache -------------------------------------------------------

def real_statistics(plan: EvalPlan, workers: Workers, features: FeatureNetwork,
                    bar: Callable[..., Any] | None = None) -> tuple[tuple[np.ndarray, np.ndarray] | None, dict[str, Any]]:
    """Mean and covariance of the real set's features (on rank 0; None elsewhere), from the
    cache when it holds them, else computed over all ranks and cached by rank 0."""
    real = plan.real
    assert real is not None and real.num_samples is not None
    total = min(real.num_samples, plan.num_real)
    key = stats_key(real, total, plan.resolution_px, features.id, workers)
    path = plan.cache_dir / f"fid-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.npz"
    cached = _read_cached(path, key) if workers.is_main else None
    hit = collectives.broadcast_object(cached is not None)
    info = {"fid_real": str(real.manifest_path or real.spec), "fid_real_stats": str(path), "fid_real_cached": hit}
    if hit:
        assert not workers.is_main or cached is not None
        mean_cov, count = (cached[:2], cached[2]) if cached is not None else (None, 0)
        return mean_cov, {**info, "fid_num_real": collectives.broadcast_object(count)}
    share = workers.share(total, plan.batch)
    stats, read = FeatureStats(features.dim, workers.device), ReadStats()
    with (bar or _ProgressFactory(False))(total=len(share), desc="real set (rank 0)") as progress:
        for pixels in read_image_range(real.shards, share.start, share.stop, plan.resolution_px, plan.batch, read):
            stats.add(features.extract(pixels.to(workers.device, torch.float32) / 255.0))
            progress.update(pixels.shape[0])
    merged = FeatureStats.from_flat(collectives.sum_(stats.to_flat()), features.dim)
    if not workers.is_main:
        return None, {**info, "fid_num_real": merged.count}
    mean_cov = merged.mean_cov()
    _write_cached(path, key, *mean_cov, merged.count)
    return mean_cov, {**info, "fid_num_real": merged.count}


def stats_key(real: ShardSet, num_images: int, resolution_px: int, network_id: str, workers: Workers) -> dict[str, Any]:
    """What the real statistics depend on: the shards' content (sha256 from the manifest, or
    hashed here, split over ranks), how many images, at which side, through which network.
    Remote shards without a manifest sha256 are keyed by URL."""
    missing = [i for i, s in enumerate(real.shards) if s.sha256 is None and not s.is_remote]
    mine = {i: sha256_of_file(Path(real.shards[i].url)) for i in missing[workers.world.rank::workers.world.world_size]}
    hashed = {i: h for part in collectives.gather_object(mine) for i, h in part.items()}
    shards = [s.sha256 or hashed.get(i) or f"url:{s.url}" for i, s in enumerate(real.shards)]
    return {"format": STATS_FORMAT, "shards": shards, "num_images": num_images, "resolution_px": resolution_px,
            "feature_network": network_id, "decode": "centre crop, bicubic resize, no flip (data.decode)"}


def _read_cached(path: Path, key: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int] | None:
    try:
        with np.load(path) as data:
            if json.loads(str(data["key"])) != key:
                return None
            return data["mu"], data["sigma"], int(data["count"])
    except (OSError, KeyError, ValueError):
        return None  # absent or unreadable: computed again and rewritten


def _write_cached(path: Path, key: dict[str, Any], mu: np.ndarray, sigma: np.ndarray, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each process its own temporary name: several ranks may compute the same statistics at once.
    write_atomic(path, lambda stream: np.savez(stream, mu=mu, sigma=sigma, count=count,
                                               key=json.dumps(key, sort_keys=True)),
                 tmp=path.with_name(f".{path.name}.{os.getpid()}.tmp"))


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (and fsync: a preempted job keeps the figures it printed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def summary(record: dict[str, Any]) -> str:
    """One line of the figures in a record."""
    parts = []
    if "fid" in record:
        parts.append(f"FID {record['fid']:.3f} ({record['fid_num_generated']:,} samples vs {record['fid_num_real']:,} real)")
    if "ms_ssim" in record:
        parts.append(f"MS-SSIM {record['ms_ssim']:.4f} ({record['ms_ssim_pairs']:,} pairs at {record['ms_ssim_px']} px)")
    if "rmse" in record:
        parts.append(f"RMSE {record['rmse']:.4f} PSNR {record['psnr_db']:.2f} dB ({record['recon_num_images']:,} held-out)")
    if "laplacian_var_samples" in record:
        parts.append(f"sharpness: Laplacian var {record['laplacian_var_samples']:.4g} vs "
                     f"{record['laplacian_var_real']:.4g} real, HF share {record['hf_share_samples']:.4f} vs "
                     f"{record['hf_share_real']:.4f} real ({record['sharpness_num_samples']:,} samples, "
                     f"{record['sharpness_num_real']:,} real)")
    return " | ".join(parts)


class _ProgressFactory:
    """tqdm bars on rank 0 when asked, no-ops otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, total: int, desc: str) -> Any:
        interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
        # As the training bar: in a SLURM or CI log, a line every 30 s instead of every update.
        return tqdm(total=total, desc=desc, unit="img", disable=not self.enabled, dynamic_ncols=True, leave=False,
                    mininterval=0.5 if interactive else 30.0)


# --- during training -------------------------------------------------------------------------

class TrainingEvaluator:
    """A small :func:`evaluate` every ``eval.every_steps`` steps of a run (off by default).

    Built before the engines start, so a bad eval section fails at once: ``section`` is the
    config's ``eval`` section (read by attribute, so this module needs no YAML).
    """

    def __init__(self, section: Any, data_shards: str, run_dir: Path, resolution_px: int, seed: int,
                 device: torch.device | str = "cpu") -> None:
        self.run_dir = run_dir
        cache = Path(section.cache_dir).expanduser() if section.cache_dir else default_cache_dir()
        self.plan = plan_evaluation(
            tuple(section.metrics), resolution_px, real=section.real_shards or data_shards,
            heldout=section.heldout_shards, num_generated=section.num_images, ms_ssim_pairs=section.ms_ssim_pairs,
            num_real=section.num_real, num_heldout=section.num_heldout, seed=seed, batch=section.batch_per_rank,
            cache_dir=cache,
        )
        self.features = load_inception(section.inception, device) if "fid" in self.plan.metrics else None

    def run(self, encoder: nn.Module, generator: nn.Module, step: int, images_seen: int, workers: Workers,
            weights: str = "raw weights") -> dict[str, Any] | None:
        """Evaluate the networks as they are (every rank calls this); rank 0 appends the figures,
        with ``weights`` saying which they are, to ``RUN/eval.jsonl`` and returns them."""
        if self.features is not None and isinstance(self.features.extract, nn.Module):
            self.features.extract.to(workers.device)
        modes = [(net, net.training) for net in (encoder, generator)]
        # Ranks do not synchronise BatchNorm statistics; evaluate with rank 0's everywhere (those a
        # checkpoint exports), so these figures are what `evaluate` gives on this step's checkpoint.
        buffers = [b for net in (encoder, generator) for b in net.buffers()]
        own = [b.detach().clone() for b in buffers]
        for net, _ in modes:
            net.eval()
        try:
            for b in buffers:
                collectives.broadcast_tensor_(b)
            record = evaluate(encoder, generator, self.plan, workers, self.features, pad_forwards=True, progress=False)
        finally:
            with torch.no_grad():
                for b, saved in zip(buffers, own):
                    b.copy_(saved)
            for net, was_training in modes:
                net.train(was_training)
        if record is not None:
            record = {"step": step, "images_seen": images_seen, "weights": weights, **record, "time": time.time()}
            append_record(self.run_dir / EVAL_LOG_NAME, record)
        return record

