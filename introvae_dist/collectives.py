"""Every collective of the trainer, the evaluation and the checkpoint code: the one module
that calls ``torch.distributed`` (a test scans the package for any other caller).

Right on every backend:

* a tensor goes over the backend's own device: CUDA for NCCL (which refuses CPU tensors,
  "No backend type associated with device type cpu"), CPU for gloo; callers hand in
  tensors on any device and get the result on the CPU;
* object collectives (pickled, then sent as a byte tensor) and NCCL barriers use the
  current CUDA device, so :func:`bind_device` sets it to this rank's GPU before the first
  collective; otherwise every rank of a node would talk from cuda:0 and hang or fail;
* none is skipped at one rank: a run on one GPU goes through the same NCCL calls as a run
  on 64, so what works at one rank is what the big job runs. With one rank they cost
  microseconds.

The process group itself is made by DeepSpeed inside training (``engine.init_distributed``)
or here for the evaluation and inference commands (:func:`init_process_group`).
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist


def bind_device(local_rank: int) -> torch.device:
    """This rank's device: ``cuda:<local_rank>``, made current, where there is a GPU; else the CPU.

    Call before the process group's first collective (see the module docstring).
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                         "start at most one rank per GPU")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Join the launcher's rendezvous (RANK, WORLD_SIZE, MASTER_ADDR/PORT): NCCL on a GPU, gloo
    on the CPU. The device must be bound (:func:`bind_device`) already."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank()


def world_size() -> int:
    return dist.get_world_size()


def backend_device() -> torch.device:
    """Where a tensor must be to go through the default group's backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of a tensor on any device; the result on the CPU."""
    on_backend = values.detach().to(backend_device(), copy=True)
    dist.all_reduce(on_backend)
    return on_backend.cpu()


def broadcast_tensor_(tensor: torch.Tensor) -> None:
    """Overwrite ``tensor`` on every rank with rank 0's, in place, whatever its device."""
    target = backend_device()
    if tensor.device == target:
        dist.broadcast(tensor, src=0)
        return
    staged = tensor.to(target)
    dist.broadcast(staged, src=0)
    tensor.copy_(staged)


def all_gather_flat(part: torch.Tensor) -> torch.Tensor:
    """Every rank's equal-sized 1-D ``part`` laid end to end in rank order, on every rank, on
    ``part``'s device (as ZeRO-3 reassembles a partitioned weight)."""
    on_backend = part.detach().to(backend_device()).contiguous()
    out = torch.empty(on_backend.numel() * dist.get_world_size(), dtype=on_backend.dtype, device=on_backend.device)
    # torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; same arguments.
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, on_backend)
    return out.to(part.device)


def gather_object(value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order, on every rank."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any) -> Any:
    """Rank 0's picklable ``value`` on every rank (the others' argument is ignored)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank. On NCCL it names this rank's GPU (else torch guesses from the rank)."""
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def store() -> Any:
    """The default group's key-value store, which every rank reaches already (the rendezvous
    of init_process_group); torch exposes it only through this private accessor."""
    return dist.distributed_c10d._get_default_store()


def destroy() -> None:
    """Leave the process group (no-op without one)."""
    if is_initialized():
        dist.destroy_process_group()
