"""Who this process is in the job: rank, local rank and world size, read from the launcher.

The only module that reads launcher environment variables. The deepspeed launcher, torchrun
and `accelerate launch` all export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
a plain `python launchers/train.py` sets none and runs as a world of one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    #: Ranks on this node (LOCAL_WORLD_SIZE from torchrun, LOCAL_SIZE from deepspeed, else all).
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, grids and the resolved config."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _int_var(env: MutableMapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r}: expected an integer") from None


def world_from_env(env: MutableMapping[str, str] | None = None) -> World:
    """Read the world from a launcher's variables; fill in a one-process world otherwise.

    For a lone process the rendezvous variables are set here, so that `deepspeed.initialize`
    (which needs them) works under plain `python` too.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        local_rank = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} WORLD_SIZE={world_size}: expected 0 <= RANK < WORLD_SIZE")
        local_var = next((v for v in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if v in env), None)
        local_world_size = _int_var(env, local_var) if local_var else world_size
        return World(rank=rank, local_rank=local_rank, world_size=world_size, local_world_size=local_world_size)
    env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return World(rank=0, local_rank=0, world_size=1)


def cpu_threads_per_rank(world: World, env: MutableMapping[str, str] | None = None) -> int | None:
    """Intra-op threads for each rank on a CPU node, or None to keep the user's OMP_NUM_THREADS.

    PyTorch gives every process all cores; with several ranks per node they then fight over
    the same cores (measured: 2 ranks on 2 cores ran several times slower than 1 thread each).
    """
    env = os.environ if env is None else env
    if "OMP_NUM_THREADS" in env:
        return None
    return max(1, (os.cpu_count() or 1) // max(1, world.local_world_size))
