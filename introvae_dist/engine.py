"""DeepSpeed engines for E and G: one engine per network, each with its own config.

The only module that imports DeepSpeed. Two engines in one process follow the pattern in
FIELD-NOTES: separate config dicts, separate checkpoint folders, and the frozen network called
through its bare `.module` (see `introvae_dist.algorithm`).
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from introvae_dist import collectives, peer_failure
from introvae_dist.config import EngineConfig
from introvae_dist.distributed import world_from_env

# DeepSpeed logs every engine's whole config at INFO; keep the training log readable.
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

import deepspeed  # noqa: E402  (after the logger level, which its import reads)
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from deepspeed.runtime.utils import register_output_backward_hooks  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402


def init_distributed(timeout_s: float = 600.0) -> torch.device:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_* (see distributed.py) and
    return this rank's device.

    The backend follows the accelerator: NCCL on GPUs, gloo on CPU. The GPU is bound to the
    local rank first: DeepSpeed sets it only when the engines are built, after our first
    collectives (:mod:`introvae_dist.collectives`).
    """
    device = collectives.bind_device(world_from_env().local_rank)
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s), verbose=False)
    peer_failure.start_watching()
    _unlink_shm_allreduce_buffer()
    return device


def shutdown_distributed() -> None:
    """Leave the process group after the last collective, before the interpreter exits.

    This unregisters the groups, so nothing later in the process can start a collective on
    them. It does not end the backend's threads: DeepSpeed's engines and ZeRO-partitioned
    parameters keep references to the groups (measured: the gloo threads are all still there
    after it), so those end with the process.
    """
    peer_failure.stop_watching()
    collectives.destroy()


def leave_after_failure() -> None:
    """Leave a gloo process group on an error path where this rank is in no collective (bad
    input found, a NaN all ranks agreed on), before the interpreter exits.

    Left to the interpreter's teardown, gloo's worker threads can still be alive when it
    destroys them, and the process aborts ("terminate called without an active exception",
    exit -6 instead of the status it was returning; seen once in CI on a bad-shards exit;
    pytorch/pytorch#190489). Leaving the group while the interpreter is whole ends them in
    order. Under NCCL the group is left to the process's end: destroying it while a peer may
    still be inside a collective can hang (pytorch/torchtitan#1342), and the peers have been
    told to stop (peer_failure.report).
    """
    peer_failure.stop_watching()
    if collectives.is_initialized() and collectives.backend_device().type == "cpu":
        collectives.destroy()


def _unlink_shm_allreduce_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer.

    On CPU, DeepSpeed's `deepspeed_shm_comm` op creates /dev/shm/deepspeed_allreduce_buffer_
    UID_ADDR_PORT_RANK (66 MB) per rank and never unlinks it (deepspeed 0.19.8, shm.cpp), so
    every run leaks 66 MB of RAM per rank until reboot (seen: 20 GB after a day of test runs,
    then the OOM killer). Every rank maps all its peers' buffers during init; after a barrier
    each rank unlinks its own name. The mappings stay valid, and the memory goes back to the
    system when the last process exits, however it exits.
    """
    collectives.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{os.environ.get('RANK', '0')}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def deepspeed_config(cfg: EngineConfig, batch_per_rank: int, world_size: int,
                     load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict of one engine; ``load_universal`` to resume from a universal
    checkpoint (written by another world size, see :func:`convert_to_universal`).

    Every key that changes the arithmetic of a step is set here rather than left to
    DeepSpeed's defaults; docs/DEEPSPEED.md lists each default, our value and why.
    """
    if cfg.precision not in ("bf16", "fp32"):  # "auto" is resolved by run_plan.plan_run
        raise ValueError(f"precision={cfg.precision!r}: resolve it to bf16 or fp32 before building an engine")
    bf16 = cfg.precision == "bf16"
    return {
        "checkpoint": {"load_universal": load_universal},
        "train_micro_batch_size_per_gpu": batch_per_rank,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch_per_rank * world_size,
        "zero_optimization": {"stage": cfg.zero_stage},
        # DeepSpeed skips a bf16 step whose gradients hold inf/NaN (check_grad_overflow, on by
        # default): silently, and in one engine but not the other. bf16 has fp32's range, so
        # such a gradient is a divergence: let it show in the next loss, which stops the run
        # (exit 3) as it does in fp32.
        "bf16": {"enabled": bf16, "check_grad_overflow": False},
        # DeepSpeed clips every gradient to norm 1.0 unless told (GRADIENT_CLIPPING_DEFAULT in
        # deepspeed/runtime/constants.py); the paper does not clip.
        "gradient_clipping": cfg.grad_clip_norm,
        # The mean over ranks of each rank's batch-mean gradient is the gradient of the global
        # batch mean (losses.py): sum, then divide once by the world size.
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        # DeepSpeed's default sums bf16 gradients over ranks in bf16.
        "communication_data_type": cfg.grad_reduce_dtype if bf16 else "fp32",
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(module: nn.Module, cfg: EngineConfig, batch_per_rank: int, world_size: int,
                 load_universal: bool = False, ds_config: dict[str, Any] | None = None) -> DeepSpeedEngine:
    """Wrap `module` and an Adam optimiser (Sec. 4.1: lr 2e-4, betas 0.9/0.999) in an engine.

    Under bf16 and ZeRO, DeepSpeed keeps fp32 master weights and calls this optimiser on them,
    so `fused_adam` makes that update one fused kernel per flat fp32 partition. `ds_config`
    replaces :func:`deepspeed_config`'s dict (bench/engine_defaults.py compares the two).
    """
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                                 fused=cfg.fused_adam or None)
    if ds_config is None:
        ds_config = deepspeed_config(cfg, batch_per_rank, world_size, load_universal)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine


def adopt_outputs(engine: DeepSpeedEngine, *outputs: torch.Tensor) -> None:
    """`algorithm.AdoptOutputs` for DeepSpeed engines: every `algorithm.train_step` over
    engines of :func:`build_engine` passes ``adopt=adopt_outputs``.

    Attaches to `outputs`, computed by `engine.module` rather than `engine(...)`, the backward
    hooks that DeepSpeed's forward attaches to its outputs (deepspeed 0.19.8, engine.forward):
    they run the engine's backward prologue (ZeRO's backward state, the gradient-accumulation
    boundary) when `engine.backward` first reaches them.

    Needed because G's single forward per step serves two backward passes
    (`algorithm.decode`): a data-only `torch.autograd.grad` for E's phase, then G's own
    backward. Through `engine(...)` the first would already run the prologue and queue the
    gradient reduction, which fails on an empty bucket (FIELD-NOTES: IndexError in
    reduce_ipg_grads) and leaves nothing for the second.
    """
    if not isinstance(engine, DeepSpeedEngine):
        raise TypeError(f"engine.adopt_outputs is for DeepSpeed engines, got a {type(engine).__name__!r} "
                        f"(plain_engine.PlainEngine: pass adopt=plain_engine.adopt_outputs)")
    register_output_backward_hooks(outputs, preprocess_once_fn=engine._backward_prologue,
                                   preprocess_per_tensor_fn=engine._backward_prologue_per_tensor)


def load_engine(engine: DeepSpeedEngine, folder: Path, tag: str, cfg: EngineConfig) -> None:
    """Load one engine's weights and optimiser state (every rank must call this), then apply
    the config's optimiser settings: a resume may change the learning rate, and DeepSpeed
    would otherwise restore the saved one with the optimiser state."""
    path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False, load_module_strict=True)
    if path is None:
        raise FileNotFoundError(f"{folder}/{tag}: DeepSpeed found no checkpoint to load")
    groups = [engine.optimizer.param_groups]
    inner = getattr(engine.optimizer, "optimizer", None)  # the torch Adam under ZeRO/bf16 wrappers
    if inner is not None and inner.param_groups is not engine.optimizer.param_groups:
        groups.append(inner.param_groups)
    for param_groups in groups:
        for group in param_groups:
            # The saved groups carry the saving run's kernel choice too; this run's config wins.
            group.update(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps, fused=cfg.fused_adam or None)
    if cfg.fused_adam:  # the fused kernel wants each step count beside its moments (a state
        # saved by the unfused kernel keeps it on the CPU)
        for state in (inner if inner is not None else engine.optimizer).state.values():
            if torch.is_tensor(state.get("step")) and torch.is_tensor(state.get("exp_avg")):
                state["step"] = state["step"].to(device=state["exp_avg"].device, dtype=torch.float32)


def convert_to_universal(folder: Path, tag: str, out_folder: Path) -> None:
    """DeepSpeed's universal checkpoint of ``folder/tag`` in ``out_folder/tag``, loadable on
    any world size. Runs DeepSpeed's own converter (FIELD-NOTES) as a subprocess, which keeps
    its worker pools out of this process; writes to a temp folder renamed at the end, so a
    kill leaves no half conversion under the final name."""
    tmp = out_folder.with_name(out_folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder / tag),
           "--output_folder", str(tmp / tag), "--inject_missing_state", "--num_extract_workers", "2",
           "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {folder / tag} to a universal checkpoint failed "
                           f"(exit {proc.returncode}): {proc.stderr[-2000:]}")
    shutil.rmtree(out_folder, ignore_errors=True)
    tmp.rename(out_folder)


def full_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The whole fp32 gradient of `param`, gathered from ZeRO partitions (a collective)."""
    return safe_get_full_grad(param)


def full_fp32_params(engine: DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """Every weight of the engine's module in full, as the optimiser holds it: the fp32 master
    copy gathered from all ZeRO partitions (a collective: every rank must call this), or the
    weight itself without ZeRO and bf16."""
    out = {}
    for name, param in engine.module.named_parameters():
        master = safe_get_full_fp32_param(param)
        out[name] = (master if master is not None else param.detach()).float().cpu().clone()
    return out


# -- weights as this rank holds them (the EMA's view, introvae_dist.ema) ----------------------------


def local_weights(engine: DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """Each weight of the engine's module as this rank holds it, in the engine's dtype, without
    a copy or a collective: the whole weight under ZeRO 0-2, this rank's flat partition under
    ZeRO-3 (``ds_tensor``: elements ``[rank * n, (rank + 1) * n)`` of the flattened weight,
    zero-padded at the end; deepspeed 0.19.8, partition_parameters._partition_param)."""
    return {name: (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach()
            for name, p in engine.module.named_parameters()}


def full_from_local(engine: DeepSpeedEngine, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors from per-rank views shaped like :func:`local_weights` (a collective under
    ZeRO-3: every rank must call this), on the CPU."""
    out = {}
    for name, p in engine.module.named_parameters():
        part = local[name]
        if hasattr(p, "ds_tensor"):
            part = collectives.all_gather_flat(part)[:p.ds_numel].view(p.ds_shape)
        out[name] = part.cpu().clone()
    return out


def local_from_full(engine: DeepSpeedEngine, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's view (:func:`local_weights`) of whole tensors, on the module's device."""
    out = {}
    for name, p in engine.module.named_parameters():
        whole = full[name].to(engine.device)
        if hasattr(p, "ds_tensor"):
            n, start = p.ds_tensor.numel(), p.ds_tensor.numel() * collectives.rank()
            flat = torch.zeros(n, dtype=whole.dtype, device=whole.device)
            mine = whole.reshape(-1)[start:start + n]
            flat[:mine.numel()] = mine
            whole = flat
        out[name] = whole
    return out


def save_engine(engine: DeepSpeedEngine, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
    """Save one engine's sharded checkpoint (every rank must call this)."""
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state)


