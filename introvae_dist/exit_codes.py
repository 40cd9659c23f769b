"""Every exit status of introvae-dist's commands and launchers, in one place.

launchers/train.py, the `introvae-dist` CLI and launchers/slurm.sh return these; SLURM
scripts, requeue logic and CI read them, so each value has one meaning across all of them
(README, docs/CHECKPOINTS.md "Exit codes").
"""

from __future__ import annotations

#: Done: the work asked for is complete (for training: a finished run, or "nothing to do").
EXIT_OK = 0
#: Failed while working (an exception after the input checks passed).
EXIT_FAILED = 1
#: Bad input (config, shards, checkpoint, command line), found before any expensive work.
EXIT_BAD_INPUT = 2
#: A loss became NaN or infinite; training stopped without saving the broken state.
EXIT_NON_FINITE = 3
#: Stopped by SIGTERM/SIGUSR1 after a complete checkpoint: 75 is EX_TEMPFAIL of sysexits.h,
#: "try again later", which is what a requeued job does.
EXIT_SAVED_ON_SIGNAL = 75
#: Interrupted by Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130
