"""What rank 0 writes into the run folder at start, before the first step: the resolved config,
each engine's precision and why, and the per-step logs cut back to the step a resume starts
from. The checkpoints inside it are introvae_dist.checkpointing's."""

from __future__ import annotations

import dataclasses

from introvae_dist.checkpointing.checkpointer import ResumePoint
from introvae_dist.checkpointing.layout import CHECKPOINTS_DIR
from introvae_dist.config import Config, dump_config
from introvae_dist.files import write_json_atomic, write_text_atomic
from introvae_dist.run_log import STEP_LOGS, trim_metrics
from introvae_dist.run_plan import Plan

#: The run folder's record of each engine's precision: asked, chosen, and why.
PRECISION_NAME = "precision.json"
CONFIG_NAME = "config.yaml"


def prepare_run_dir(cfg: Config, plan: Plan, resumed: ResumePoint | None) -> None:
    """Rank 0: create the run folder, say where the run starts, cut the logs back to the resumed
    step and write the resolved config and the precision choices."""
    run_dir = plan.resume.run_dir
    (run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    for line in plan.resume.warnings:
        print(f"warning: {line}", flush=True)
    step = 0
    if resumed is not None:
        step = resumed.state["step"]
        print(f"resuming from {resumed.folder} (step {step}, {resumed.state['images_seen']} images seen)", flush=True)
        for line in plan.resume.accepted_changes:
            print(f"config change accepted on resume: {line}", flush=True)
    for name in STEP_LOGS:
        moved = trim_metrics(run_dir, step, name)
        if moved:
            print(f"moved {moved} records of steps after {step} from {name} to "
                  f"{name.replace('.jsonl', '.discarded.jsonl')}", flush=True)
    write_text_atomic(run_dir / CONFIG_NAME, dump_config(cfg))
    for name, choice in plan.precision.items():
        print(f"{name} precision: {choice.reason}", flush=True)
        if choice.warning:
            print(f"warning: {name}.precision: {choice.warning}", flush=True)
    print(f"memory format: {plan.channels_last_reason}", flush=True)
    write_json_atomic(run_dir / PRECISION_NAME, {name: dataclasses.asdict(choice)
                                                for name, choice in plan.precision.items()})
