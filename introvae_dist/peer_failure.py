"""A rank that fails tells the others, so that every rank stops with the same exit status.

Without this, a rank that meets bad data (a DataError raised in one of its loader workers)
leaves, and its peers wait inside the step's gradient all-reduce: on gloo they then die of
"Connection reset by peer" with a traceback and exit 1; on NCCL they wait for the collective
timeout (15 minutes by default) or for ever. Here the failing rank writes its status and
message to the process group's key-value store (a TCP server in rank 0's process, whatever
the backend) and waits, a few seconds at most, until every peer has seen it. Each rank runs a
watcher thread that polls that key once a second; when it appears, the watcher prints the
failing rank's message and ends its own process at once with the same status. So a data
error stops the whole job with exit 2 within seconds, on every rank and under every
launcher, and the launcher reports 2 as well.

The watcher ends the process with `os._exit` because its main thread may be blocked inside a
collective that will never complete; nothing that a checkpoint needs is lost by this, since
a failed step is never saved.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
import time
from typing import Any

from introvae_dist import collectives

_FAILURE_KEY = "introvae_dist/failure"
_ACK_KEY = "introvae_dist/failure_acks"
#: How often the watcher looks for a failure: a peer stops at most about this long after it.
POLL_INTERVAL_S = 1.0
#: How long a failing rank waits for its peers to take note before it exits anyway.
ACK_TIMEOUT_S = 15.0

_watcher: threading.Thread | None = None
_stop_watching = threading.Event()
#: Set while this rank reports its own failure: its watcher must not end it first.
_reporting = threading.Event()


def start_watching() -> None:
    """Start this rank's watcher (after the process group exists; a no-op at one rank)."""
    global _watcher
    if _watcher is not None or not collectives.is_initialized() or collectives.world_size() == 1:
        return
    _stop_watching.clear()
    _watcher = threading.Thread(target=_watch, args=(collectives.store(), collectives.rank()), name="peer-failure-watch",
                                daemon=True)
    _watcher.start()


def stop_watching() -> None:
    """Stop looking for failures (before leaving the process group at the end of a run)."""
    global _watcher
    _stop_watching.set()
    _watcher = None


def report(status: int, message: str) -> None:
    """Tell every peer that this rank stops with `status` because of `message`, then wait
    (at most ACK_TIMEOUT_S) until each has seen it. Safe to call when there is no process
    group, at one rank, or when another rank has already reported."""
    if not collectives.is_initialized() or collectives.world_size() == 1:
        return
    _reporting.set()
    stop_watching()
    try:
        store, world_size = collectives.store(), collectives.world_size()
        if not store.check([_FAILURE_KEY]):  # the first failure is the one every rank names
            store.set(_FAILURE_KEY, json.dumps({"rank": collectives.rank(), "status": status, "message": message}))
        # Every rank that learns of a failure counts itself once, by reporting or by watching,
        # so ranks that fail together (a bad checkpoint seen by all) do not wait for each other.
        store.add(_ACK_KEY, 1)
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while store.add(_ACK_KEY, 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.1)
    except Exception as e:  # the store's host (rank 0) may be gone already: nothing to tell
        print(f"note: could not tell the other ranks of this failure ({e})", file=sys.stderr, flush=True)


def _watch(store: Any, rank: int) -> None:
    while not _stop_watching.wait(POLL_INTERVAL_S):
        try:
            if not store.check([_FAILURE_KEY]):
                continue
            failure = json.loads(store.get(_FAILURE_KEY))
            if _reporting.is_set() or _stop_watching.is_set():
                return
            store.add(_ACK_KEY, 1)
            # Stay until every rank has taken note: rank 0 hosts the store, and the reporting
            # rank reads the count from it.
            deadline = time.monotonic() + ACK_TIMEOUT_S
            while store.add(_ACK_KEY, 0) < collectives.world_size() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # the reporter polls every 0.1 s: let it read the full count
        except Exception:
            # The store went away: rank 0 has exited. At the end of a run that is normal; after
            # a failure, the collective this rank waits in fails on its own (or times out).
            return
        print(f"error: rank {failure['rank']} stopped the run (exit {failure['status']}): {failure['message']}\n"
              f"rank {rank} stops too", file=sys.stderr, flush=True)
        # The loader workers ignore SIGTERM and would outlive this rank by seconds; they hold
        # nothing that needs saving.
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(int(failure["status"]))
