"""Work split over the ranks of a launcher (torchrun, deepspeed, srun), or one plain process.

The inference commands and the evaluation cut a list of N images into batches
``[kB, (k+1)B)`` and give every rank a contiguous run of whole batches
(:func:`rank_batches`), so an image is computed in the same batch whatever the number of
ranks. Results are sums (feature statistics, MS-SSIM, squared errors) added with one
``all_reduce`` each, or small objects gathered on rank 0.

The process group is started here (gloo on CPU, NCCL on GPU), also for a world of one, unless
one is running already (inside training, DeepSpeed's); the world comes from
:func:`introvae_dist.distributed.world_from_env`, the one reader of launcher variables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from introvae_dist import collectives
from introvae_dist.distributed import World, cpu_threads_per_rank, world_from_env

#: How long a rank waits in a collective for the others (they finish their shares at
#: different times; a dead rank ends the job after this instead of hanging it).
COLLECTIVE_TIMEOUT_S = 3600.0


class DeviceError(ValueError):
    """A device asked for that this machine does not have."""


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
    """This process's place in the job, its device and its share of the work; the collectives
    themselves are :mod:`introvae_dist.collectives`' (one place for every torch.distributed call)."""

    world: World
    device: torch.device
    owns_process_group: bool = False

    @classmethod
    def from_env(cls, device: str | None = None) -> Workers:
        """Join the launcher's world (or be a world of one) on ``device`` (default: this rank's
        GPU if there is one, else the CPU), with one CPU thread share per rank."""
        world = world_from_env()
        dev = torch.device(device) if device else None
        if dev is None or (dev.type == "cuda" and dev.index is None):
            dev = collectives.bind_device(world.local_rank)  # "cuda": this rank's GPU
            if device and dev.type != "cuda":
                raise DeviceError(f"--device {device}: this machine has no CUDA GPU (torch.cuda.is_available() is False)")
        elif dev.type == "cuda":
            torch.cuda.set_device(dev)
        if dev.type != "cuda":
            threads = cpu_threads_per_rank(world)
            if threads is not None:
                torch.set_num_threads(threads)
        owns = False
        if not collectives.is_initialized():
            collectives.init_process_group(dev, COLLECTIVE_TIMEOUT_S)
            owns = True
        return cls(world, dev, owns)

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    def share(self, total: int, batch: int) -> range:
        return rank_batches(total, batch, self.world.rank, self.world.world_size)

    def rounds(self, total: int, batch: int) -> int:
        return max_rank_batches(total, batch, self.world.world_size)

    def close(self) -> None:
        if self.owns_process_group:
            collectives.destroy()
