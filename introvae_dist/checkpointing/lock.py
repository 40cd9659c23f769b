"""The run folder's lock: one job trains into a run folder at a time."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from introvae_dist.config import ConfigError

LOCK_NAME = ".lock"


def lock_run_dir(run_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the run folder for the life of the returned file (rank 0).

    Two jobs training into one folder (a job started twice, a requeue while the old one
    still runs) would overwrite each other's checkpoints: the second is refused, naming the
    first. The lock is released by the kernel when the process ends, however it ends.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / LOCK_NAME).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{run_dir} is in use by {holder}; two jobs must not train into one run folder "
                          "(wait for it to end, or set another run.name)") from None
    handle.seek(0), handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
