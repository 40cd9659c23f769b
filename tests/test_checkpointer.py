"""The Checkpointer's decisions alone, without DeepSpeed or a process group: when a step is a
save (steps, minutes, stop signals), what retention keeps, and the fault hook's parsing.

The save protocol itself runs with real engines in tests/test_resume.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from introvae_dist.checkpointing import faults
from introvae_dist.checkpointing.checkpointer import STOP, TIME_DUE, Checkpointer, SaveCadence
from introvae_dist.checkpointing.layout import UNIVERSAL_DIR, describe_files, list_files, write_manifest
from introvae_dist.checkpointing.resume_plan import ResumePlan
from introvae_dist.config import TrainConfig
from introvae_dist.distributed import World


def _checkpointer(run_dir: Path, rank: int = 0, **train: object) -> Checkpointer:
    return Checkpointer(ResumePlan(run_dir), TrainConfig(**train), World(rank, rank, 2), {})  # type: ignore[arg-type]


def _step_folder(run_dir: Path, step: int, complete: bool = True) -> Path:
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    if complete:
        write_manifest(folder, step, describe_files(folder, list_files(folder)))
    return folder


def _steps_left(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# -- cadence ------------------------------------------------------------------------------------


def test_a_step_is_a_save_at_multiples_of_save_every_steps_and_at_the_last_step() -> None:
    cadence = SaveCadence(every_steps=50, every_minutes=0.0, total_steps=120, last_save_s=0.0)
    saves = [step for step in range(1, 121) if cadence.reason(step, set())]
    assert saves == [50, 100, 120]
    assert cadence.reason(50, set()) == "step"


def test_agreed_flags_make_any_step_a_save_and_a_stop_signal_names_itself_first() -> None:
    cadence = SaveCadence(every_steps=1000, every_minutes=5.0, total_steps=5000, last_save_s=0.0)
    assert cadence.reason(7, {TIME_DUE}) == "time"
    assert cadence.reason(7, {STOP}) == "stop signal"
    assert cadence.reason(1000, {STOP, TIME_DUE}) == "stop signal"


def test_minutes_are_due_only_when_switched_on_and_elapsed() -> None:
    assert not SaveCadence(10, 0.0, 100, last_save_s=0.0).time_due(now_s=10**6)  # 0: off
    on = SaveCadence(10, 2.0, 100, last_save_s=1000.0)
    assert not on.time_due(now_s=1000.0 + 119.9)
    assert on.time_due(now_s=1000.0 + 120.0)


def test_only_rank_0s_clock_raises_the_time_flag(tmp_path: Path) -> None:
    """All ranks must agree on a time-based save; rank 0's clock alone decides it."""
    main, other = _checkpointer(tmp_path, 0, save_every_minutes=1e-9), _checkpointer(tmp_path, 1, save_every_minutes=1e-9)
    assert main.local_flags() == {STOP: False, TIME_DUE: True}
    assert other.local_flags() == {STOP: False, TIME_DUE: False}


def test_a_step_that_is_not_due_saves_nothing_and_needs_no_engines(tmp_path: Path) -> None:
    end = _checkpointer(tmp_path, save_every_steps=10, total_steps=100).after_step(3, set())
    assert end.saved is None and end.stop is None
    assert not (tmp_path / "checkpoints").exists()


# -- retention ----------------------------------------------------------------------------------


def test_retention_keeps_the_newest_the_permanent_and_the_resumed_one(tmp_path: Path) -> None:
    for step in (100, 200, 300, 400, 500, 600):
        _step_folder(tmp_path, step)
    (tmp_path / "checkpoints" / UNIVERSAL_DIR / "step_00000100" / "encoder").mkdir(parents=True)
    ckpt = _checkpointer(tmp_path, keep_last_checkpoints=2, keep_every_steps=250)
    ckpt.resumed_from = tmp_path / "checkpoints" / "step_00000200"
    deleted = ckpt.apply_retention()
    assert sorted(p.name for p in deleted) == ["step_00000100", "step_00000300", "step_00000400"]
    assert _steps_left(tmp_path) == ["step_00000200", "step_00000500", "step_00000600", UNIVERSAL_DIR]
    assert not (tmp_path / "checkpoints" / UNIVERSAL_DIR / "step_00000100").exists()  # its conversion goes too


def test_retention_never_touches_an_incomplete_save_and_prunes_old_set_aside_folders(tmp_path: Path) -> None:
    _step_folder(tmp_path, 100), _step_folder(tmp_path, 200)
    _step_folder(tmp_path, 300, complete=False)  # a save in progress or killed: not retention's
    for when in (1000, 2000, 3000):
        (tmp_path / "checkpoints" / f"step_00000050.set-aside-{when}").mkdir()
    _checkpointer(tmp_path, keep_last_checkpoints=1, keep_set_aside_checkpoints=1).apply_retention()
    assert _steps_left(tmp_path) == ["step_00000050.set-aside-3000", "step_00000200", "step_00000300"]


# -- fault injection ----------------------------------------------------------------------------


def test_the_fault_hook_is_a_no_op_unless_named_for_rank_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    assert faults.hook("kill-before-manifest", is_main=True) is faults._nothing
    monkeypatch.setenv(faults.FAULT_ENV, "kill-before-manifest:6")
    assert faults.hook("kill-before-manifest", is_main=False) is faults._nothing
    kill = faults.hook("kill-before-manifest", is_main=True)
    kill(5)  # another step: nothing happens (step 6 would SIGKILL this process)
    monkeypatch.setenv(faults.FAULT_ENV, "kill-before-manifest:six")
    with pytest.raises(ValueError, match="expected kill-before-manifest:STEP"):
        faults.hook("kill-before-manifest", is_main=True)


def test_the_checkpointer_imports_no_deepspeed() -> None:
    """Cadence and retention must stay testable (and the export command usable) without it."""
    import subprocess

    code = "import sys, introvae_dist.checkpointing.checkpointer; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
