"""Who this process is in the job: rank, local rank and world size, read from the launcher.

The only module that reads launcher environment variables, in this order:

1. RANK and WORLD_SIZE (with LOCAL_RANK, MASTER_ADDR, MASTER_PORT): the deepspeed launcher
   (also with --hostfile), torchrun and `accelerate launch` all export these;
2. SLURM's task variables inside an `srun` step (one task per GPU): SLURM_PROCID,
   SLURM_LOCALID, SLURM_NTASKS, the tasks per node; the rendezvous is the job's first node
   and a port derived from the job id, unless MASTER_ADDR/MASTER_PORT are set (slurm.sh sets
   them the same way);
3. nothing: a plain `python launchers/train.py` runs as a world of one.

Cases 2 and 3 write the standard variables into the environment, because DeepSpeed's
`init_distributed` reads only those (FIELD-NOTES).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; another process may take it before
    it is bound again, so a launcher retried on EADDRINUSE is the caller's business)."""
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
    if not ("RANK" in env and "WORLD_SIZE" in env) and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        _export_slurm_world(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        local_rank = _local_rank(env, rank, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} WORLD_SIZE={world_size}: expected 0 <= RANK < WORLD_SIZE")
        local_var = next((v for v in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if v in env), None)
        local_world_size = _int_var(env, local_var) if local_var else world_size
        return World(rank=rank, local_rank=local_rank, world_size=world_size, local_world_size=local_world_size)
    env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return World(rank=0, local_rank=0, world_size=1)


#: Where a launcher that sets RANK but not LOCAL_RANK keeps the rank on the node: SLURM's srun,
#: Open MPI's mpirun, MPICH/Intel MPI's Hydra, MVAPICH2.
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                   "MV2_COMM_WORLD_LOCAL_RANK")


def _local_rank(env: MutableMapping[str, str], rank: int, world_size: int) -> int:
    """This process's rank on its node: the GPU it uses. RANK is only right on the first node,
    so without one of LOCAL_RANK_VARS a multi-rank world is refused rather than guessed."""
    for name in LOCAL_RANK_VARS:
        if name in env:
            env["LOCAL_RANK"] = env[name]  # DeepSpeed's init reads LOCAL_RANK
            return _int_var(env, name)
    if world_size == 1:
        env["LOCAL_RANK"] = "0"
        return 0
    raise ValueError(f"RANK={rank} WORLD_SIZE={world_size} but no local rank: set one of "
                     f"{', '.join(LOCAL_RANK_VARS)} (the rank on this node, which picks the GPU)")


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: fixed per job (all its tasks agree without talking),
    different between jobs (two jobs on one node do not collide), outside the ephemeral range."""
    return 20000 + job_id % 20000


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """This node's entry of SLURM_TASKS_PER_NODE, e.g. ``"2(x3),1"`` -> 2 for nodes 0-2, 1 for 3."""
    node = 0
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r}: expected e.g. '2(x3),1'")
        count, repeat = int(match.group(1)), int(match.group(2) or 1)
        if node_id < node + repeat:
            return count
        node += repeat
    raise ValueError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r} lists fewer than {node_id + 1} nodes")


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[03-05,09]" -> "gpu03"), as scontrol expands it."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def _export_slurm_world(env: MutableMapping[str, str]) -> None:
    """Translate an srun task's SLURM variables into the standard ones (case 2 above)."""
    rank, world_size = _int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_NTASKS")
    node_id = _int_var(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    if "SLURM_NTASKS_PER_NODE" in env:
        local_world_size = _int_var(env, "SLURM_NTASKS_PER_NODE")
    else:
        local_world_size = tasks_on_node(env.get("SLURM_TASKS_PER_NODE", str(world_size)), node_id)
    env.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                "LOCAL_WORLD_SIZE": str(local_world_size)})
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = _first_host(env["SLURM_JOB_NODELIST"]) if "SLURM_JOB_NODELIST" in env else "127.0.0.1"
    env.setdefault("MASTER_PORT", str(slurm_port(_int_var(env, "SLURM_JOB_ID"))))


def cpu_threads_per_rank(world: World, env: MutableMapping[str, str] | None = None) -> int | None:
    """Intra-op threads for each rank on a CPU node, or None to keep the user's OMP_NUM_THREADS.

    PyTorch gives every process all cores; with several ranks per node they then fight over
    the same cores (measured: 2 ranks on 2 cores ran several times slower than 1 thread each).
    """
    env = os.environ if env is None else env
    if "OMP_NUM_THREADS" in env:
        return None
    return max(1, (os.cpu_count() or 1) // max(1, world.local_world_size))
