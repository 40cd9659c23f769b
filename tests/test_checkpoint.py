"""The checkpoint folder logic alone (no engines): manifest, discovery, retention, config diffs,
and cutting the metrics log back on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from introvae_dist.checkpointing.layout import (
    CheckpointError, check_files, delete_checkpoint, describe_files, list_files, read_latest, read_manifest,
    retention_victims, survey, write_latest, write_manifest,
)
from introvae_dist.checkpointing.resume_plan import config_changes, plan_resume
from introvae_dist.config import ConfigError, config_to_dict, load_config
from introvae_dist.run_log import trim_metrics


def _fake_checkpoint(root: Path, step: int, complete: bool = True, overrides: tuple[str, ...] = ()) -> Path:
    folder = root / "checkpoints" / f"step_{step:08d}"
    (folder / "encoder" / "ds").mkdir(parents=True)
    (folder / "encoder" / "ds" / "shard.pt").write_bytes(b"x" * 100)
    cfg = config_to_dict(load_config(None, list(overrides)))
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "images_seen": 8 * step, "world_size": 2,
                                                           "config": cfg}))
    if complete:
        files = list_files(folder)
        write_manifest(folder, step, describe_files(folder, files))
    return folder


def test_manifest_lists_every_file_and_catches_truncation_and_change(tmp_path: Path) -> None:
    folder = _fake_checkpoint(tmp_path, 3)
    manifest = read_manifest(folder)
    assert sorted(manifest["files"]) == ["encoder/ds/shard.pt", "trainer_state.json"]
    assert check_files(folder, manifest, sorted(manifest["files"])) == []
    shard = folder / "encoder" / "ds" / "shard.pt"
    shard.write_bytes(b"x" * 99)
    assert "has 99 bytes, the manifest says 100" in check_files(folder, manifest, ["encoder/ds/shard.pt"])[0]
    shard.write_bytes(b"y" * 100)
    assert "does not match its sha256" in check_files(folder, manifest, ["encoder/ds/shard.pt"])[0]
    assert check_files(folder, manifest, ["encoder/ds/shard.pt"], check="size") == []
    (folder / "MANIFEST.json").write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not an introvae-dist checkpoint manifest"):
        read_manifest(folder)


def test_survey_sorts_complete_newest_first_and_names_the_rest(tmp_path: Path) -> None:
    for step in (100, 300, 200):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 400, complete=False)
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    write_latest(tmp_path / "checkpoints", "step_00000300")
    found = survey(tmp_path / "checkpoints")
    assert [step for step, _ in found.with_manifest] == [300, 200, 100]
    assert [p.name for p in found.incomplete] == ["step_00000400"]
    assert [p.name for p in found.foreign] == ["notes.txt"]
    assert read_latest(tmp_path / "checkpoints") == "step_00000300"


@pytest.mark.parametrize(
    "steps,keep_last,keep_every,protected,victims",
    [
        ([100, 200, 300, 400, 500], 2, 0, set(), [100, 200, 300]),
        ([100, 200, 300, 400, 500], 2, 200, set(), [100, 300]),   # 200 and 400 are permanent
        ([100, 200, 300, 400, 500], 1, 0, {200}, [100, 300, 400]),  # never the one resumed from
        ([500], 3, 0, set(), []),
    ],
)
def test_retention_keeps_last_k_every_nth_and_the_resumed(steps, keep_last, keep_every, protected, victims) -> None:
    assert retention_victims(steps, keep_last, keep_every, protected) == victims


def test_delete_removes_the_manifest_first(tmp_path: Path) -> None:
    folder = _fake_checkpoint(tmp_path, 1)
    delete_checkpoint(folder)
    assert not folder.exists()


def test_config_changes_split_into_refused_and_accepted() -> None:
    old = config_to_dict(load_config(None))
    new = config_to_dict(load_config(None, ["model.latent_dim=512", "encoder.lr=1e-4", "generator.precision=fp32",
                                            "train.log_every_steps=5"]))
    changes = config_changes(old, new)
    assert changes.refused == ["generator.precision: 'auto' -> 'fp32'", "model.latent_dim: 256 -> 512"]
    assert changes.accepted == ["encoder.lr: 0.0002 -> 0.0001", "train.log_every_steps: 10 -> 5"]


def test_recomputation_and_speed_switches_may_change_on_resume() -> None:
    # They choose what the backward recomputes and how fast it runs, not what the weights are.
    old = config_to_dict(load_config(None))
    new = config_to_dict(load_config(None, ["model.checkpoint_blocks=false", "model.checkpoint_min_side_px=256",
                                            "train.channels_last=false", "train.step_order=shared_encoder",
                                            "encoder.fused_adam=false"]))
    changes = config_changes(old, new)
    assert changes.refused == []
    assert len(changes.accepted) == 5


def test_plan_resume_refuses_network_changes_and_names_keys(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 5)
    cfg = config_to_dict(load_config(None, ["model.latent_dim=64"]))
    with pytest.raises(ConfigError, match=r"model.latent_dim: 256 -> 64"):
        plan_resume(tmp_path, "auto", cfg)
    plan = plan_resume(tmp_path, "auto", config_to_dict(load_config(None, ["train.total_steps=9"])))
    assert [p.name for p in plan.candidates] == ["step_00000005"]
    assert plan.accepted_changes == ("train.total_steps: 1000 -> 9",)


def test_a_foreign_newest_checkpoint_names_the_older_one_that_fits_and_what_to_move(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 5)
    _fake_checkpoint(tmp_path, 6)
    _fake_checkpoint(tmp_path, 8, overrides=("model.latent_dim=64",))  # another model's, copied in
    with pytest.raises(ConfigError) as err:
        plan_resume(tmp_path, "auto", config_to_dict(load_config(None)))
    ckpt = tmp_path / "checkpoints"
    assert "model.latent_dim: 64 -> 256" in str(err.value)
    assert (f"{ckpt / 'step_00000006'} fits this config: to resume from it, move {ckpt / 'step_00000008'} "
            f"out of {ckpt} and run again") in str(err.value)
    assert (ckpt / "step_00000008").is_dir()  # nothing moved for the user


def test_set_aside_folders_are_surveyed_oldest_first_and_only_the_newest_kept(tmp_path: Path) -> None:
    from introvae_dist.checkpointing.layout import set_aside_victims, survey

    ckpt = tmp_path / "checkpoints"
    for name in ("step_00000009.set-aside-1700000300", "step_00000003.set-aside-1700000100",
                 "step_00000006.set-aside-1700000200", "notes.set-aside-5"):
        (ckpt / name).mkdir(parents=True)
    found = survey(ckpt)
    assert [p.name for p in found.set_aside] == ["step_00000003.set-aside-1700000100",
                                                 "step_00000006.set-aside-1700000200",
                                                 "step_00000009.set-aside-1700000300"]
    assert [p.name for p in found.foreign] == ["notes.set-aside-5"]  # not ours: never deleted
    assert [p.name for p in set_aside_victims(found.set_aside, 2)] == ["step_00000003.set-aside-1700000100"]
    assert set_aside_victims(found.set_aside, 5) == []
    assert len(set_aside_victims(found.set_aside, 0)) == 3


def test_trim_metrics_keeps_steps_up_to_the_resumed_one(tmp_path: Path) -> None:
    lines = [json.dumps({"step": s, "l_ae": 1.0}) for s in range(1, 8)] + ['{"step": 8, "l_a']  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert trim_metrics(tmp_path, 5) == 3
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert len((tmp_path / "metrics.discarded.jsonl").read_text().splitlines()) == 3


def test_run_folder_lock_refuses_a_second_job_and_names_the_first(tmp_path: Path) -> None:
    from introvae_dist.checkpointing.lock import lock_run_dir

    first = lock_run_dir(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"run is in use by pid \d+ on "):
        lock_run_dir(tmp_path / "run")
    first.close()  # the job ended: the folder is free again
    lock_run_dir(tmp_path / "run").close()


def test_stop_signal_during_start_up_is_kept_for_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's outer StopSignals records a notice that arrives before the loop starts;
    the trainer's inner one sees it. Leaving the outer one restores the previous handlers."""
    import os
    import signal

    from introvae_dist import stop_signals

    monkeypatch.setattr(stop_signals, "_received", None)
    before = signal.getsignal(signal.SIGUSR1)
    with stop_signals.StopSignals():
        os.kill(os.getpid(), signal.SIGUSR1)  # while the engines would be starting
        with stop_signals.StopSignals() as inner:
            assert inner.received == "SIGUSR1"
        assert signal.getsignal(signal.SIGUSR1) is stop_signals._record  # the outer one still holds
    assert signal.getsignal(signal.SIGUSR1) is before
