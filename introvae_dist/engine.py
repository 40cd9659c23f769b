"""DeepSpeed engines for E and G: one engine per network, each with its own config.

The only module that imports DeepSpeed. Two engines in one process follow the pattern in
FIELD-NOTES: separate config dicts, separate checkpoint folders, and the frozen network called
through its bare `.module` (see `introvae_dist.algorithm`).
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from introvae_dist.config import EngineConfig

# DeepSpeed logs every engine's whole config at INFO; keep the training log readable.
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

import deepspeed  # noqa: E402  (after the logger level, which its import reads)
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_* (see distributed.py).

    The backend follows the accelerator: NCCL on GPUs, gloo on CPU.
    """
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s), verbose=False)


def deepspeed_config(cfg: EngineConfig, batch_per_rank: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of one engine."""
    return {
        "train_micro_batch_size_per_gpu": batch_per_rank,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch_per_rank * world_size,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(module: nn.Module, cfg: EngineConfig, batch_per_rank: int, world_size: int) -> DeepSpeedEngine:
    """Wrap `module` and an Adam optimiser (Sec. 4.1: lr 2e-4, betas 0.9/0.999) in an engine."""
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps)
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(cfg, batch_per_rank, world_size)
    )
    return engine


def full_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The whole fp32 gradient of `param`, gathered from ZeRO partitions (a collective)."""
    return safe_get_full_grad(param)


def save_engine(engine: DeepSpeedEngine, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
    """Save one engine's sharded checkpoint (every rank must call this)."""
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state)


def engine_dtype(engine: DeepSpeedEngine) -> torch.dtype:
    return next(engine.module.parameters()).dtype
