"""Work split over the ranks of a launcher (torchrun, deepspeed, srun), or one plain process.

The inference commands and the evaluation cut a list of N images into batches
``[kB, (k+1)B)`` and give every rank a contiguous run of whole batches
(:func:`rank_batches`), so an image is computed in the same batch whatever the number of
ranks. Results are sums (feature statistics, MS-SSIM, squared errors) added with one
``all_reduce`` each, or small objects gathered on rank 0.

Under a launcher the process group is started here (gloo on CPU, NCCL on GPU) unless one is
running already (inside training, DeepSpeed's); the world comes from
:func:`introvae_dist.distributed.world_from_env`, the one reader of launcher variables.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from introvae_dist.distributed import World, cpu_threads_per_rank, world_from_env

#: How long a rank waits in a collective for the others (they finish their shares at
#: different times; a dead rank ends the job after this instead of hanging it).
COLLECTIVE_TIMEOUT_S = 3600.0


def rank_batches(total: int, batch: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous share of images ``[0, total)``: whole batches
    ``[kB, (k+1)B)``, ``ceil(total / B)`` of them dealt out as evenly as possible."""
    batches = -(-total // batch)
    first, last = rank * batches // world_size, (rank + 1) * batches // world_size
    return range(min(first * batch, total), min(last * batch, total))


def max_rank_batches(total: int, batch: int, world_size: int) -> int:
    """The most batches any rank gets from :func:`rank_batches` (its loop count)."""
    batches = -(-total // batch)
    return -(-batches // world_size)


@dataclass
class Workers:
    """This process's place in the job, its device, and the collectives the evaluation needs."""

    world: World
    device: torch.device
    owns_process_group: bool = False

    @classmethod
    def from_env(cls, device: str | None = None) -> Workers:
        """Join the launcher's world (or be a world of one) on ``device`` (default: this rank's
        GPU if there is one, else the CPU), with one CPU thread share per rank."""
        world = world_from_env()
        dev = torch.device(device if device else f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        else:
            threads = cpu_threads_per_rank(world)
            if threads is not None:
                torch.set_num_threads(threads)
        owns = False
        if world.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
            owns = True
        return cls(world, dev, owns)

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    def share(self, total: int, batch: int) -> range:
        return rank_batches(total, batch, self.world.rank, self.world.world_size)

    def rounds(self, total: int, batch: int) -> int:
        return max_rank_batches(total, batch, self.world.world_size)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks of a tensor on any device; the result on the CPU."""
        if self.world.world_size == 1:
            return values.cpu()
        on_device = values.to(self._collective_device())
        dist.all_reduce(on_device)
        return on_device.cpu()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensor_(self, tensor: torch.Tensor) -> None:
        """Overwrite ``tensor`` on every rank with rank 0's, in place."""
        if self.world.world_size == 1:
            return
        if tensor.device.type == self._collective_device().type:
            dist.broadcast(tensor, src=0)
        else:
            staged = tensor.to(self._collective_device())
            dist.broadcast(staged, src=0)
            tensor.copy_(staged)

    def barrier(self) -> None:
        if self.world.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")
