"""The real entry point, end to end: deepspeed launcher, torchrun, plain python; bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import deepspeed_cmd, free_port, run, tail

TINY = ["model.resolution_px=16", "model.widths=[8,16]", "model.latent_dim=8", "data.num_workers=1",
        "train.batch_global=4", "train.log_every_steps=2", "loss.warmup_images=8", "loss.margin=4"]


def _overrides(shards: Path, root: Path, steps: int, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"run.root={root}", f"train.total_steps={steps}", *TINY, *extra]


def _only_run(root: Path) -> Path:
    runs = sorted(root.iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def _check_run(run_dir: Path, steps: int, saves: list[int]) -> list[dict[str, object]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for key in ("l_ae", "kl_real", "kl_rec_e", "kl_fake_e", "kl_rec_g", "kl_fake_g", "loss_e", "loss_g"):
        assert all(isinstance(r[key], float) for r in records), key
    assert records[0]["phase"] == "warmup" and records[-1]["phase"] == "adversarial"
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png"))
    for step in saves:
        folder = run_dir / "checkpoints" / f"step_{step:08d}"
        assert (folder / "MANIFEST.json").is_file(), folder
        for net in ("encoder", "generator"):  # file names differ by ZeRO stage
            assert list((folder / net / "ds").glob("*model_states.pt")), folder / net
            assert list((folder / net / "ds").glob("*optim_states.pt")), folder / net
        assert json.loads((folder / "trainer_state.json").read_text())["step"] == step
    return records


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks_trains_and_saves(tiny_shards: Path, tmp_path: Path) -> None:
    args = _overrides(tiny_shards, tmp_path / "runs", 6, "train.sample_every_steps=3", "train.save_every_steps=3",
                      "encoder.zero_stage=2", "generator.zero_stage=3")
    cmd = deepspeed_cmd(2, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml", *args)
    proc = run(cmd)
    assert proc.returncode == 0, tail(proc)
    run_dir = _only_run(tmp_path / "runs")
    _check_run(run_dir, 6, saves=[3, 6])
    # DeepSpeed's CPU all-reduce buffers (66 MB per rank in /dev/shm) must not outlive the run.
    port = cmd[cmd.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step_00000003.png", "step_00000006.png"]
    state = json.loads((run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["images_seen"] == 24


@pytest.mark.slow
def test_torchrun_two_ranks_trains(tiny_shards: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
           *_overrides(tiny_shards, tmp_path / "runs", 3, "encoder.precision=fp32", "generator.zero_stage=1")]
    proc = run(cmd)
    assert proc.returncode == 0, tail(proc)
    _check_run(_only_run(tmp_path / "runs"), 3, saves=[3])


def test_plain_python_one_process_trains(tiny_shards: Path, tmp_path: Path) -> None:
    proc = run([sys.executable, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                *_overrides(tiny_shards, tmp_path / "runs", 4, "model.checkpoint_blocks=false")])
    assert proc.returncode == 0, tail(proc)
    # The demo config sets channels-last itself (configs/cpu_synthetic.yaml), so auto is not asked.
    assert "memory format: train.channels_last=true: as configured" in proc.stdout, tail(proc)
    run_dir = _only_run(tmp_path / "runs")
    _check_run(run_dir, 4, saves=[4])
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    # The same command again resumes the finished run: nothing to train, nothing overwritten.
    proc = run([sys.executable, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                *_overrides(tiny_shards, tmp_path / "runs", 4, "model.checkpoint_blocks=false")])
    assert proc.returncode == 0, tail(proc)
    assert "nothing to do: step 4 of train.total_steps=4" in proc.stderr + proc.stdout, tail(proc)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == before


def test_shared_encoder_fast_path_trains_with_finite_losses(tiny_shards: Path, tmp_path: Path) -> None:
    proc = run([sys.executable, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                *_overrides(tiny_shards, tmp_path / "runs", 3, "train.step_order=shared_encoder",
                            "model.checkpoint_min_side_px=8")])
    assert proc.returncode == 0, tail(proc)
    _check_run(_only_run(tmp_path / "runs"), 3, saves=[3])


def test_dry_run_prints_the_resolved_config_and_starts_nothing(tiny_shards: Path, tmp_path: Path) -> None:
    proc = run([sys.executable, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml", "--dry-run",
                *_overrides(tiny_shards, tmp_path / "runs", 5, "encoder.lr=1e-4")])
    assert proc.returncode == 0, tail(proc)
    assert "lr: 0.0001" in proc.stdout and "total_steps: 5" in proc.stdout and "# world: 1 rank(s)" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_non_finite_loss_stops_with_step_and_terms_and_saves_nothing(tiny_shards: Path, tmp_path: Path) -> None:
    proc = run([sys.executable, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                *_overrides(tiny_shards, tmp_path / "runs", 4, "loss.beta=1.0e38", "encoder.precision=fp32",
                            "generator.precision=fp32")])
    assert proc.returncode == 3, tail(proc)
    assert "step 1: non-finite loss in" in proc.stderr and "l_ae=" in proc.stderr and "loss_e" in proc.stderr
    assert not list((_only_run(tmp_path / "runs") / "checkpoints").glob("step_*"))


def test_a_bad_config_value_exits_2_with_one_error_line_and_starts_nothing(tiny_shards: Path, tmp_path: Path) -> None:
    """The launcher's side of a refused config: exit 2 and an "error: " line naming the source,
    the key, the value and what was expected. The cases themselves are tested in process
    (tests/test_config.py, test_bad_input_is_refused_before_any_engine_starts)."""
    proc = run([sys.executable, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                *_overrides(tiny_shards, tmp_path / "runs", 2), "model.checkpoint_min_side_px=-1"])
    assert proc.returncode == 2, tail(proc)
    assert ("error: configs/cpu_synthetic.yaml + command-line overrides: model.checkpoint_min_side_px=-1: "
            "expected >= 0 (0: every block)") in proc.stderr.splitlines(), tail(proc)
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_batch_that_does_not_divide_over_ranks_is_refused(tiny_shards: Path) -> None:
    from introvae_dist.config import ConfigError, load_config
    from introvae_dist.distributed import World
    from introvae_dist.run_plan import plan_run

    cfg = load_config(None, [f"data.shards={tiny_shards}", "train.batch_global=6", "model.resolution_px=16",
                             "model.widths=[8,16]"])
    with pytest.raises(ConfigError, match="batch_global=6 does not divide over 4 ranks"):
        plan_run(cfg, World(rank=0, local_rank=0, world_size=4, local_world_size=4))
    with pytest.raises(ConfigError, match="BatchNorm needs at least 2"):
        plan_run(cfg, World(rank=0, local_rank=0, world_size=6, local_world_size=6))


def _damaged_shards(out: Path) -> Path:
    """2 shards of 8 synthetic 16 px images: one holds a corrupt JPEG, the other is cut short."""
    from introvae_dist.data.shard_writer import write_shards
    from introvae_dist.data.synthetic import encode_png, render_image

    samples = [(f"{i:08d}", encode_png(render_image(i, 16)), "png") for i in range(16)]
    samples[3] = ("00000003", b"\xff\xd8\xff\xe0 not a jpeg", "jpg")
    write_shards(samples, out, "damaged", samples_per_shard=8)
    cut = out / "damaged-000001.tar"
    cut.write_bytes(cut.read_bytes()[: 5 * 1024 + 700])  # inside the data of a member
    return out


def test_damaged_shards_fail_their_checksums_before_training(tmp_path: Path) -> None:
    shards = _damaged_shards(tmp_path / "shards")
    proc = run([sys.executable, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                *_overrides(shards, tmp_path / "runs", 2)])
    assert proc.returncode == 2, tail(proc)
    assert "do not match" in proc.stderr and "damaged-000001.tar" in proc.stderr, tail(proc)
    assert str(shards / "manifest.json") in proc.stderr, tail(proc)
    assert not (tmp_path / "runs").exists()
    assert (shards / "damaged-000001.tar").is_file()  # the user's data is never touched


def test_damaged_shards_are_skipped_and_counted_in_the_training_log(tmp_path: Path) -> None:
    shards = _damaged_shards(tmp_path / "shards")
    proc = run([sys.executable, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                *_overrides(shards, tmp_path / "runs", 6, "data.verify=none", "train.log_every_steps=1")])
    assert proc.returncode == 0, tail(proc)
    records = [json.loads(line) for line in (_only_run(tmp_path / "runs") / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["data_samples_skipped"] >= 1 and records[-1]["data_shards_damaged"] >= 1
    assert "samples skipped" in proc.stdout + proc.stderr


def _undecodable_after_the_first_shard(out: Path) -> Path:
    """4 shards of 100 samples: the first holds good 16 px PNGs (so the grid's fixed images
    load), the other three nothing but bytes that are no image, so a loader stream that reads
    one of them meets 100 undecodable samples in a row (a DataError in its worker)."""
    from introvae_dist.data.shard_writer import write_shards
    from introvae_dist.data.synthetic import encode_png, render_image

    samples = [(f"{i:08d}", encode_png(render_image(i, 16)), "png") if i < 100
               else (f"{i:08d}", b"\xff\xd8\xff\xe0 not a jpeg", "jpg") for i in range(400)]
    write_shards(samples, out, "bad", samples_per_shard=100)
    return out


@pytest.mark.slow
def test_a_data_error_on_one_rank_ends_every_rank_with_exit_2_within_seconds(tmp_path: Path) -> None:
    """Before issue 13 this job hung for good: rank 1's loader worker raised, rank 1 waited on
    that worker at exit, and rank 0 waited in the step's all-reduce. Nothing is killed here:
    the subprocess timeout only bounds a regression."""
    shards = _undecodable_after_the_first_shard(tmp_path / "shards")
    proc = run(deepspeed_cmd(2, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                             *_overrides(shards, tmp_path / "runs", 50, "data.verify=none")), timeout_s=180)
    assert proc.returncode == 2, tail(proc)
    out = proc.stdout + proc.stderr
    assert "samples in a row failed to decode" in out, tail(proc)
    failed = out.split("stopped the run (exit 2): ", 1)
    assert len(failed) == 2 and "failed to decode" in failed[1].splitlines()[0], tail(proc)
    assert "stops too" in out, tail(proc)
    assert not list((_only_run(tmp_path / "runs") / "checkpoints").glob("step_*"))


def test_a_data_error_in_one_process_exits_2(tmp_path: Path) -> None:
    shards = _undecodable_after_the_first_shard(tmp_path / "shards")
    proc = run([sys.executable, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                *_overrides(shards, tmp_path / "runs", 50, "data.verify=none", "data.num_workers=2")], timeout_s=120)
    assert proc.returncode == 2, tail(proc)
    assert "samples in a row failed to decode" in proc.stderr, tail(proc)


@pytest.mark.slow
def test_soft_introvae_trains_saves_logs_and_evaluates_under_zero3(tiny_shards: Path, tmp_path: Path) -> None:
    """loss.objective=soft_introvae through the deepspeed launcher at 2 ranks, both engines
    under ZeRO-3 in the device's precision (auto): its figures in metrics.jsonl and TensorBoard,
    the grids, the curves, checkpoints with the EMA, and `evaluate` on the finished run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from introvae_dist.cli import main
    from introvae_dist.soft_algorithm import SOFT_METRIC_NAMES

    tiny = [o for o in _overrides(tiny_shards, tmp_path / "runs", 6) if not o.startswith("loss.margin=")]
    proc = run(deepspeed_cmd(2, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml", *tiny,
                             "loss.objective=soft_introvae", "encoder.zero_stage=3", "generator.zero_stage=3",
                             "train.sample_every_steps=3", "train.save_every_steps=3"))
    assert proc.returncode == 0, tail(proc)
    assert "note: loss.objective=soft_introvae on the command line: configs/cpu_synthetic.yaml's keys of introvae " \
           "(loss.alpha, loss.beta, loss.margin) are not used" in proc.stderr, tail(proc)
    run_dir = _only_run(tmp_path / "runs")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["phase"] for r in records] == ["warmup"] * 2 + ["adversarial"] * 4
    for name in SOFT_METRIC_NAMES:
        assert all(isinstance(r[name], float) for r in records), name
    assert "l_ae" not in records[0] and all(r["margin"] is None for r in records)
    assert all(0 < r["exp_elbo_rec"] <= 1 and 0 < r["exp_elbo_fake"] <= 1 for r in records)
    assert "exp-ELBO rec" in proc.stdout + proc.stderr  # the log line
    for step in (3, 6):
        folder = run_dir / "checkpoints" / f"step_{step:08d}"
        assert (folder / "MANIFEST.json").is_file() and (folder / "ema.pt").is_file(), folder
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step_00000003.png", "step_00000006.png"]
    assert (run_dir / "curves.png").is_file()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"exp_elbo/exp_elbo_rec", "exp_elbo/exp_elbo_fake", "loss/rec_err", "kl/kl_fake_g"} <= tags, tags
    assert [e.step for e in events.Scalars("exp_elbo/exp_elbo_fake")] == list(range(1, 7))
    # Evaluation reads the run like any other: its networks, not its objective.
    assert main(["evaluate", str(run_dir), "--metrics", "ms_ssim,rmse", "--heldout", str(tiny_shards),
                 "--ms-ssim-pairs", "4", "--batch", "4"]) == 0
    (record,) = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert record["step"] == 6 and 0 < record["rmse"] < 1


def test_soft_introvae_non_finite_loss_stops_with_exit_3(tiny_shards: Path, tmp_path: Path) -> None:
    tiny = [o for o in _overrides(tiny_shards, tmp_path / "runs", 4) if not o.startswith("loss.margin=")]
    proc = run([sys.executable, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml", *tiny,
                "loss.objective=soft_introvae", "loss.beta_kl=1.0e300", "encoder.precision=fp32",
                "generator.precision=fp32"])
    assert proc.returncode == 3, tail(proc)
    assert "step 1: non-finite loss in" in proc.stderr and "exp_elbo_rec=" in proc.stderr, tail(proc)
    assert not list((_only_run(tmp_path / "runs") / "checkpoints").glob("step_*"))
