"""Faults injected into the save protocol, for the tests of what a kill leaves behind.

Set ``INTROVAE_DIST_FAULT=kill-before-manifest:STEP`` and rank 0 SIGKILLs itself once every rank
has written its part of the checkpoint of STEP but before the manifest that makes it complete
(tests/test_resume.py). Without the variable a hook is a no-op, decided once at start, so the
save path reads as the protocol and nothing else.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

FAULT_ENV = "INTROVAE_DIST_FAULT"
#: The points of the save protocol a fault can be injected at.
POINTS = ("kill-before-manifest",)


def hook(point: str, is_main: bool) -> Callable[[int], None]:
    """A callable of the step, to be called at ``point``: SIGKILLs rank 0 at the step named in
    FAULT_ENV for this point, does nothing otherwise."""
    assert point in POINTS, point
    name, _, step = os.environ.get(FAULT_ENV, "").partition(":")
    if name != point or not is_main:
        return _nothing
    if not step.isdigit():
        raise ValueError(f"{FAULT_ENV}={os.environ[FAULT_ENV]!r}: expected {point}:STEP")
    at_step = int(step)

    def kill_at(current: int) -> None:
        if current == at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    return kill_at


def _nothing(_step: int) -> None:
    pass
