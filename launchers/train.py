"""Train IntroVAE.

    deepspeed --num_gpus 2 launchers/train.py --config configs/cpu_synthetic.yaml
    torchrun --nproc_per_node 2 launchers/train.py --config configs/cpu_synthetic.yaml
    python launchers/train.py --config configs/cpu_synthetic.yaml train.total_steps=50

Arguments after the options are dotted overrides (encoder.lr=1e-4). `--dry-run` prints the
resolved config and the checks of the input, then exits without starting any engine.

Imports the installed package (README: `python -m pip install -e .`); the tests put the
checkout on PYTHONPATH instead (tests/conftest.py `run`).
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
from pathlib import Path

from introvae_dist import peer_failure
from introvae_dist.checkpointing.layout import CheckpointError
from introvae_dist.config import ConfigError, dump_config, load_config
from introvae_dist.data.loader import describe_epoch
from introvae_dist.data.shard_set import DataError
from introvae_dist.distributed import world_from_env
from introvae_dist.exit_codes import EXIT_BAD_INPUT, EXIT_NON_FINITE, EXIT_SAVED_ON_SIGNAL
from introvae_dist.maintenance import NonFiniteLoss
from introvae_dist.run_plan import plan_run, stream_spec
from introvae_dist.stop_signals import StopSignals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML preset from configs/ (defaults when omitted)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.total_steps=100")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        notes: list[str] = []
        cfg = load_config(args.config, args.overrides, notes)
        world = world_from_env()
        for note in notes if world.is_main else ():
            print(f"note: {note}", file=sys.stderr)
        plan = plan_run(cfg, world)
    except (ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.dry_run:
        if world.is_main:
            print(dump_config(cfg), end="")
            print(f"# world: {world.world_size} rank(s), {plan.batch_per_rank} image(s) per rank, "
                  f"{len(plan.shard_set.shards)} shard(s) of {plan.shard_set.num_samples or 'unknown'} image(s) "
                  f"read in {cfg.data.mode} mode, widths {list(plan.widths)}")
            print(f"# {describe_epoch(stream_spec(cfg, world, plan))}")
        return 0

    from introvae_dist.engine import leave_after_failure, shutdown_distributed  # imports DeepSpeed
    from introvae_dist.trainer import Trainer

    try:
        # From here on a stop signal is recorded, not fatal: one during start-up (engines,
        # checksums) stops the run after its first step, with a complete checkpoint.
        with StopSignals():
            trainer = Trainer(cfg, world, plan)
            stopped_by = trainer.train()
        shutdown_distributed()  # every rank got here: the last collective is behind us
    except (DataError, CheckpointError, ConfigError) as e:  # shards or checkpoints failing their checksums
        print(f"error: {e}", file=sys.stderr, flush=True)
        # The other ranks may wait in a collective. The last line is the error itself (a loader
        # worker's error comes with its traceback in the message).
        peer_failure.report(EXIT_BAD_INPUT, str(e).strip().splitlines()[-1])
        leave_after_failure()
        return EXIT_BAD_INPUT
    except NonFiniteLoss as e:  # every rank sees the same reduced loss and stops at the same step
        print(f"error: {e}", file=sys.stderr)
        leave_after_failure()
        return EXIT_NON_FINITE
    except BaseException as e:
        # Anything else (a bug, a dead disk): peers must not wait in a collective for this rank.
        # The group is not left here: this rank may have failed inside a collective, whose
        # work a gloo group's destroy would wait for.
        peer_failure.report(1, f"{type(e).__name__}: {e}")
        raise
    if stopped_by is not None:
        if world.is_main:
            print(f"stopped by {stopped_by} at step {trainer.progress.step} after a complete checkpoint; "
                  f"run again with the same config to resume (exit {EXIT_SAVED_ON_SIGNAL})")
        return EXIT_SAVED_ON_SIGNAL
    if world.is_main:
        print(f"done: {trainer.run_dir}")
    return 0


if __name__ == "__main__":
    # A rank that dies in native code (a segfault, an abort in a communication library) prints
    # every thread's Python stack into its log first: the post-mortem of a weeks-long run.
    faulthandler.enable(all_threads=True)
    sys.exit(main())
