"""The one owner of a run's checkpoints: when to save, the save protocol, what to keep, the run
folder's lock, and which checkpoint a run resumes from.

The training loop makes one call per step, :meth:`Checkpointer.after_step`, with the flags all
ranks agreed on; everything else happens at start (:meth:`Checkpointer.start`,
:meth:`Checkpointer.restore`). Modelled on torchtitan's CheckpointManager: the loop says which
step ended, the manager decides whether that is a save.

The objects saved are given to :meth:`Checkpointer.attach`; each has ``state_dict`` /
``load_state_dict`` (the data stream, this rank's RNGs and buffers, the training progress)
except the two engines, which DeepSpeed saves into folders of their own (FIELD-NOTES: two
engines in one folder overwrite each other).

DeepSpeed is imported only where an engine is saved, loaded or converted, so the cadence and
retention decisions are tested without it (tests/test_checkpointer.py).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import torch

from introvae_dist import __version__, collectives
from introvae_dist.checkpointing import faults
from introvae_dist.checkpointing.layout import (
    CHECKPOINTS_DIR, EMA_NAME, ENGINE_DIRS, ENGINE_TAG, TRAINER_STATE_NAME, UNIVERSAL_DIR, CheckpointError, check_files,
    delete_checkpoint, describe_files, list_files, parse_step, rank_state_path, read_manifest, read_trainer_state,
    retention_victims, set_aside, set_aside_victims, step_folder_name, survey, write_latest, write_manifest,
)
from introvae_dist.checkpointing.lock import lock_run_dir
from introvae_dist.checkpointing.rank_state import RankLocal, load_rank_state, save_rank_state
from introvae_dist.checkpointing.resume_plan import ResumePlan, check_config
from introvae_dist.config import ConfigError, TrainConfig
from introvae_dist.distributed import World
from introvae_dist.files import write_atomic, write_text_atomic
from introvae_dist.stop_signals import StopSignals


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


#: The flags each rank reports after a step (:meth:`Checkpointer.local_flags`); the loop or-s
#: them over ranks with the step's figures, in one collective, and hands the result back.
STOP, TIME_DUE = "stop", "save_due"


@dataclass
class SaveCadence:
    """When a step is also a save: every ``every_steps`` steps, the last step, when
    ``every_minutes`` have passed since the last save (0: never), and on a stop signal."""

    every_steps: int
    every_minutes: float
    total_steps: int
    #: time.monotonic() of the last save (or of the start).
    last_save_s: float

    def time_due(self, now_s: float) -> bool:
        return self.every_minutes > 0 and now_s - self.last_save_s >= 60 * self.every_minutes

    def reason(self, step: int, agreed: set[str]) -> str | None:
        """Why ``step`` is saved given the flags all ranks agreed on, or None."""
        if STOP in agreed:
            return "stop signal"
        if TIME_DUE in agreed:
            return "time"
        if step % self.every_steps == 0 or step == self.total_steps:
            return "step"
        return None


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run goes on from, chosen and verified by :meth:`Checkpointer.start`."""

    folder: Path
    #: Its trainer_state.json (step, images_seen, world_size, config, ...).
    state: dict[str, Any]
    #: The checkpoint was written by another number of ranks: the engines load from DeepSpeed's
    #: universal format and the per-rank files belong to no rank of this world.
    universal: bool


@dataclass(frozen=True)
class StepEnd:
    """What :meth:`Checkpointer.after_step` did."""

    #: The checkpoint written at this step, if any, and why ("step", "time", "stop signal").
    saved: Path | None = None
    why: str = ""
    #: Set when the run must stop now: the signal's name (after the checkpoint above).
    stop: str | None = None


@dataclass
class _Saved:
    encoder: Any  # DeepSpeedEngine
    generator: Any
    stream: Stateful
    rank_local: RankLocal
    #: Returns step, images_seen and phase for trainer_state.json.
    progress: Callable[[], dict[str, Any]]
    #: The weights' moving average (introvae_dist.ema.TrainingEMA), None when ema is off.
    ema: Any = None


class Checkpointer:
    """Checkpoints of one run folder, for one rank (every rank builds one; all call alike)."""

    def __init__(self, plan: ResumePlan, train: TrainConfig, world: World, config: dict[str, Any]) -> None:
        self.plan, self.train, self.world, self.config = plan, train, world, config
        self.run_dir = plan.run_dir
        self.dir = plan.run_dir / CHECKPOINTS_DIR
        self.cadence = SaveCadence(train.save_every_steps, train.save_every_minutes, train.total_steps, time.monotonic())
        self.stop_signals = StopSignals()
        self.resumed_from: Path | None = None
        self._lock: IO[str] | None = None
        self._saved: _Saved | None = None
        self._before_manifest = faults.hook("kill-before-manifest", world.is_main)

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> ResumePoint | None:
        """Lock the run folder, choose and verify the checkpoint to resume (checksums split over
        the ranks) and, after a world-size change, convert it to DeepSpeed's universal format.
        Every rank calls this after the process group starts and before any engine is built."""
        self._lock = self._lock_run_dir()
        self.resumed_from = self._select()
        if self.resumed_from is None:
            return None
        state = read_trainer_state(self.resumed_from)
        point = ResumePoint(self.resumed_from, state, state["world_size"] != self.world.world_size)
        if point.universal:
            self._convert_to_universal(point)
        return point

    def _lock_run_dir(self) -> IO[str] | None:
        """Rank 0 locks the run folder; every rank raises if another job holds it."""
        lock, problem = None, None
        if self.world.is_main:
            try:
                lock = lock_run_dir(self.run_dir)
            except ConfigError as e:
                problem = str(e)
        problem = collectives.broadcast_object(problem)
        if problem:
            raise ConfigError(str(problem))
        return lock

    def _select(self) -> Path | None:
        """The newest candidate whose files match its manifest, checked split over the ranks.

        A damaged one is skipped with a warning naming it and its bad files, and set aside
        (renamed, not deleted) when it is newer than the one chosen, so later saves never
        collide with it.
        """
        plan, world = self.plan, self.world
        skipped: list[Path] = []
        for folder in plan.candidates:
            try:
                manifest = read_manifest(folder)
                files = sorted(manifest["files"])
                problems = check_files(folder, manifest, files[world.rank::world.world_size])
            except CheckpointError as e:
                problems = [str(e)]
            problems = sorted({line for lines in collectives.gather_object(problems) for line in lines})
            if not problems:
                if folder != plan.candidates[0]:
                    check_config(folder, self.config)  # an older one may hold another config
                if world.is_main:
                    for bad in skipped:
                        if bad.parent.parent.resolve() == plan.run_dir.resolve():
                            print(f"warning: set aside damaged checkpoint {bad} as {set_aside(bad)}", flush=True)
                collectives.barrier()
                return folder
            message = f"checkpoint {folder} is damaged: " + "; ".join(problems[:5])
            if plan.explicit_step:
                raise CheckpointError(message)
            if world.is_main:
                print(f"warning: skipping {message}", flush=True)
            skipped.append(folder)
        if plan.candidates:
            raise CheckpointError(f"no usable checkpoint among the {len(plan.candidates)} in "
                                  f"{plan.candidates[0].parent}; all are damaged (see the warnings above). "
                                  "Move them away, or start a new run (another run.name)")
        return None

    def _convert_to_universal(self, point: ResumePoint) -> None:
        """Rank 0 converts each engine once into checkpoints/universal/ while the others wait."""
        from introvae_dist import engine

        target = self.dir / UNIVERSAL_DIR / point.folder.name
        if self.world.is_main:
            print(f"the checkpoint was written by {point.state['world_size']} rank(s), this run has "
                  f"{self.world.world_size}: converting it to DeepSpeed's universal format in {target}", flush=True)
            for net in ENGINE_DIRS:
                if not (target / net).is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    engine.convert_to_universal(point.folder / net, ENGINE_TAG, target / net)
        collectives.barrier()

    def attach(self, encoder: Any, generator: Any, stream: Stateful, rank_local: RankLocal,
               progress: Callable[[], dict[str, Any]], ema: Any = None) -> None:
        """The objects every save writes and :meth:`restore` loads."""
        self._saved = _Saved(encoder, generator, stream, rank_local, progress, ema)
        self.cadence.last_save_s = time.monotonic()  # minutes count from here, not from start-up

    def restore(self, point: ResumePoint, engine_configs: dict[str, Any], reseed: int) -> None:
        """Load both engines, then this rank's RNGs, buffers and stream position.

        Exact when the world size and the data layout are those of the save. After a world-size
        change the RNGs are re-seeded with ``reseed`` (derived from seed, step and rank) and the
        stream goes on at the same share of the epoch (its ``load_state_dict``).
        """
        from introvae_dist import engine

        saved = self._require_attached()
        source = self.dir / UNIVERSAL_DIR / point.folder.name if point.universal else point.folder
        engine.load_engine(saved.encoder, source / "encoder", ENGINE_TAG, engine_configs["encoder"])
        engine.load_engine(saved.generator, source / "generator", ENGINE_TAG, engine_configs["generator"])
        own = rank_state_path(point.folder, self.world.rank)
        state = load_rank_state(own) if not point.universal and own.is_file() else None
        if state is not None:
            saved.rank_local.load_state_dict(state)
        else:
            saved.rank_local.reseed(reseed)
        stream = (state or load_rank_state(rank_state_path(point.folder, 0)))["stream"]
        note = saved.stream.load_state_dict(stream)
        if note and self.world.is_main:
            print(note, flush=True)
        if saved.ema is not None:
            self._restore_ema(saved.ema, point.folder)
        self.cadence.last_save_s = time.monotonic()

    def _restore_ema(self, ema: Any, folder: Path) -> None:
        """The saved average; a checkpoint without one (saved before the EMA existed, or with
        ema off) starts it at the resumed weights, and says so."""
        path = folder / EMA_NAME
        if path.is_file():
            fresh = ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            if fresh and self.world.is_main:
                print(f"ema: {path} holds no average of the {' and '.join(fresh)}; it starts at the resumed weights",
                      flush=True)
            return
        ema.reset_to_live()
        if self.world.is_main:
            print(f"ema: {folder} holds no {EMA_NAME}; the moving average starts at the resumed weights", flush=True)

    def _require_attached(self) -> _Saved:
        if self._saved is None:
            raise RuntimeError("Checkpointer.attach() must name the objects to save before a save or restore")
        return self._saved

    # -- every step -----------------------------------------------------------------------------

    def local_flags(self) -> dict[str, bool]:
        """This rank's stop and time-due flags, to be or-ed over ranks with the step's figures.
        Rank 0's clock alone decides time-based saves, so all ranks agree on them."""
        return {STOP: self.stop_signals.received is not None,
                TIME_DUE: self.world.is_main and self.cadence.time_due(time.monotonic())}

    def after_step(self, step: int, agreed: set[str]) -> StepEnd:
        """Save if ``step`` is due (cadence) and say whether the run stops here. Every rank
        calls this with the same ``agreed`` flags, so all save and stop together."""
        why = self.cadence.reason(step, agreed)
        if why is None:
            return StepEnd()
        path = self.save(step)
        last = step == self.train.total_steps
        # A signal at the last step changes nothing: the run is done.
        stop = (self.stop_signals.received or "a stop signal on another rank") if STOP in agreed and not last else None
        return StepEnd(path, why, stop)

    # -- the save protocol ----------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """One complete checkpoint of ``step`` (every rank must call this).

        Order: both engines' shards and every rank's own state, then trainer_state.json; a
        barrier; the checksums, split over the ranks; the manifest, written last by rank 0; the
        `latest` pointer, replaced atomically; only then retention deletes old checkpoints.
        A kill anywhere before the manifest leaves a folder that resume skips.
        """
        from introvae_dist import engine

        saved, world = self._require_attached(), self.world
        folder = self.dir / step_folder_name(step)
        if world.is_main and folder.exists():
            # Left by a save that never finished, or damaged: renamed, never deleted.
            print(f"warning: {folder} exists; set aside as {set_aside(folder)}", flush=True)
        collectives.barrier()
        engine.save_engine(saved.encoder, folder / "encoder", ENGINE_TAG, {})
        engine.save_engine(saved.generator, folder / "generator", ENGINE_TAG, {})
        save_rank_state(rank_state_path(folder, world.rank),
                        {"rank": world.rank, "step": step, **saved.rank_local.state_dict(),
                         "stream": saved.stream.state_dict()})
        ema = saved.ema.state_dict() if saved.ema is not None else None  # a collective under ZeRO-3
        if world.is_main:
            if ema is not None:
                write_atomic(folder / EMA_NAME, lambda stream: torch.save(ema, stream))
            write_text_atomic(folder / TRAINER_STATE_NAME, json.dumps(self._trainer_state(saved), indent=1) + "\n")
        collectives.barrier()
        self._before_manifest(step)
        names = collectives.broadcast_object(list_files(folder) if world.is_main else None)
        mine = describe_files(folder, names[world.rank::world.world_size])  # type: ignore[index]
        files = {k: v for part in collectives.gather_object(mine) for k, v in part.items()}
        if world.is_main:
            write_manifest(folder, step, files)
            write_latest(self.dir, folder.name)
            self.apply_retention()
        collectives.barrier()
        self.cadence.last_save_s = time.monotonic()
        return folder

    def _trainer_state(self, saved: _Saved) -> dict[str, Any]:
        return {
            **saved.progress(),
            "world_size": self.world.world_size,
            # What the optimisers really use (a resume applies the config's, not the saved ones).
            "lr": {"encoder": saved.encoder.optimizer.param_groups[0]["lr"],
                   "generator": saved.generator.optimizer.param_groups[0]["lr"]},
            "config": self.config,
            "versions": _versions(),
            "time": time.time(),
        }

    # -- retention ------------------------------------------------------------------------------

    def apply_retention(self) -> list[Path]:
        """Rank 0, after a save: keep the newest train.keep_last_checkpoints, the multiples of
        train.keep_every_steps and the checkpoint this run resumed from; delete the rest, and
        set-aside folders beyond train.keep_set_aside_checkpoints. Returns what it deleted."""
        t = self.train
        found = survey(self.dir)
        complete = dict(found.with_manifest)
        protected = {parse_step(self.resumed_from.name)} if self.resumed_from is not None else set()
        deleted = []
        for step in retention_victims(list(complete), t.keep_last_checkpoints, t.keep_every_steps, protected):  # type: ignore[arg-type]
            delete_checkpoint(complete[step])
            universal = self.dir / UNIVERSAL_DIR / complete[step].name
            if universal.is_dir():
                shutil.rmtree(universal)
            deleted.append(complete[step])
        # Set-aside folders (killed or damaged saves, several GB each at 1024 px) are kept for a
        # look, but not for ever.
        for folder in set_aside_victims(found.set_aside, t.keep_set_aside_checkpoints):
            shutil.rmtree(folder)
            deleted.append(folder)
            print(f"deleted {folder}, set aside earlier (train.keep_set_aside_checkpoints="
                  f"{t.keep_set_aside_checkpoints} keeps the newest)", flush=True)
        return deleted


def _versions() -> dict[str, str]:
    import deepspeed
    import webdataset

    return {"introvae_dist": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "webdataset": getattr(webdataset, "__version__", "unknown"), "python": platform.python_version()}
