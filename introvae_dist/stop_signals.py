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

#: Exit status after a stop signal, once the checkpoint is complete: 75 is EX_TEMPFAIL of
#: sysexits.h, "try again later", which is what a requeued job does.
EXIT_SAVED_ON_SIGNAL = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Context manager: while active, SIGTERM/SIGUSR1 set :attr:`received` instead of killing."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            print(f"received {name}: finishing this step, saving a checkpoint, then exiting "
                  f"with status {EXIT_SAVED_ON_SIGNAL}", file=sys.stderr, flush=True)
        self.received = name
