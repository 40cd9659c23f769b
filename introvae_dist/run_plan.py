"""The run's plan: everything derived from the config and the world before any engine starts.

Order matters for users: every check of their input (config, shards, batch split, run folder)
runs here, before any process group or engine starts, so a mistake costs seconds, not a queue
slot. Also resolves the `auto` choices (precision, memory format) for this device, in place, so
the config a run records is the one it ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from introvae_dist import collectives
from introvae_dist.checkpointing.resume_plan import ResumePlan, plan_resume
from introvae_dist.config import Config, ConfigError, config_to_dict
from introvae_dist.data.loader import StreamSpec, check_stream_coverage
from introvae_dist.data.shard_set import (
    DataError, ShardSet, resolve_shard_set, stored_image_size_px, verify_shards, with_sample_counts,
)
from introvae_dist.distributed import World
from introvae_dist.precision import (
    PrecisionChoice, PrecisionError, bf16_support, choose, choose_channels_last, fp16_support, training_device,
)


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
