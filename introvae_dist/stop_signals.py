"""Stop requests by signal: SIGTERM (preemption, scancel, the launchers' shutdown) and
SIGUSR1 (SLURM's `--signal` notice before the time limit).

The handler only records the signal; the trainer finishes the step it is in, agrees with
the other ranks at the step's end (any rank's signal stops all), saves, and exits with
:data:`EXIT_SAVED_ON_SIGNAL`. Nothing is done inside the handler itself, because a signal can
arrive in the middle of a collective or a checkpoint write.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType, TracebackType
from typing import Any

from introvae_dist.exit_codes import EXIT_SAVED_ON_SIGNAL  # the status after a stop signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


#: The first stop signal this process received (signal state is per process, so is this).
_received: str | None = None
_installed_depth = 0


class StopSignals:
    """Context manager: while active, SIGTERM/SIGUSR1 are recorded instead of killing.

    Nestable: launchers/train.py enters one at process start, so a notice that arrives while
    the engines are still being built is not lost (nor kills the rank); the trainer's own,
    entered around the loop, sees it and stops after the first step.
    """

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    @property
    def received(self) -> str | None:
        return _received

    def __enter__(self) -> StopSignals:
        global _installed_depth
        if _installed_depth == 0:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, _record)
        _installed_depth += 1
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _installed_depth
        _installed_depth -= 1
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _record(signum: int, _frame: FrameType | None) -> None:
    global _received
    name = signal.Signals(signum).name
    if _received is None:
        print(f"received {name}: finishing this step, saving a checkpoint, then exiting "
              f"with status {EXIT_SAVED_ON_SIGNAL}", file=sys.stderr, flush=True)
    _received = name
