"""`sbatch launchers/slurm.sh` against a real one-node SLURM cluster (tests/slurm_cluster.py):
a 2-task CPU job trains and saves; stop signals mid-run save, requeue and resume with every
step logged once; `scancel` saves and does not requeue; bad input fails at once with the
reason in the job log; array tasks get their own run folders and logs.

Each job overrides the script's GPU header for this CPU node: `--ntasks-per-node=2
--gpus-per-node=0 --cpus-per-task=1`, and a --time far from the script's USR1@300 notice.
Skipped, with the reason, where SLURM cannot be installed or started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO
from slurm_cluster import SlurmCluster, SlurmUnavailable, start_cluster

pytestmark = pytest.mark.slow

TINY = ["model.resolution_px=16", "model.widths=[8,16]", "model.latent_dim=8", "train.batch_global=4",
        "train.log_every_steps=1", "loss.warmup_images=8", "loss.margin=4", "train.sample_every_steps=1000",
        "data.num_workers=1"]
CPU_JOB = ["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
CONFIG = "configs/cpu_synthetic.yaml"
RUN_NAME = "cpu-synthetic"                     # configs/cpu_synthetic.yaml's run.name
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    try:
        c = start_cluster()
    except SlurmUnavailable as e:
        pytest.skip(f"no SLURM cluster here: {e}")
    try:
        # DeepSpeed's CPU comm op, built (~30 s on a fresh machine) outside any job: a job killed
        # by a test's timeout in the middle of that build would leave torch's build lock behind,
        # and every later DeepSpeed start on this machine would wait on it for ever.
        build = subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                               capture_output=True, text=True, timeout=600)
        assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
        yield c
    finally:
        c.stop()


def _sbatch(cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess[str]:
    # As conftest.run: the jobs import this checkout, whatever is installed.
    python_path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {"PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}
    return cluster.run("sbatch", "--parsable", *args, cwd=REPO, env=env)


def _submit(cluster: SlurmCluster, *args: str) -> int:
    proc = _sbatch(cluster, *args)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def _job_name(what: str) -> str:
    # Unique: job ids start again at 1 on every new test cluster, and --open-mode=append would
    # add to an older session's log of the same name.
    return f"slurmtest-{what}-{uuid.uuid4().hex[:8]}"


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else f"(no file {path})"


def _wait(cluster: SlurmCluster, job: int | str, log: Path, timeout_s: float = 180) -> dict[str, str]:
    """Poll until the job is over (a requeued job passes through PENDING again)."""
    deadline = time.monotonic() + timeout_s
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        fields = cluster.job(job)
        if fields.get("JobState") in FINAL:
            return fields
        time.sleep(0.5)
    cluster.run("scancel", str(job))
    raise AssertionError(f"job {job} not done within {timeout_s:.0f} s: {fields.get('JobState')}\n"
                         f"{_read(log)[-4000:]}\n{cluster.logs()}")


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line being written
            break
    return steps


def _wait_for_step(cluster: SlurmCluster, job: int, run_dir: Path, step: int, log: Path,
                   restarts: int, timeout_s: float = 120) -> None:
    """Until run `restarts` of the job has logged `step` (so the trainer's handler is in place)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = cluster.job(job)
        if fields.get("JobState") in FINAL:
            raise AssertionError(f"job {job} ended early: {fields.get('JobState')}\n{_read(log)[-4000:]}")
        if fields.get("Restarts") == str(restarts) and fields.get("JobState") == "RUNNING":
            steps = _steps(run_dir)
            if steps and steps[-1] >= step:
                return
        time.sleep(0.1)
    raise AssertionError(f"job {job} run {restarts} did not reach step {step}\n{_read(log)[-4000:]}")


def _complete_checkpoint(run_dir: Path, step: int) -> None:
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{step:08d}"
    assert (ckpt / f"step_{step:08d}" / "MANIFEST.json").is_file()


def test_two_task_job_trains_and_leaves_a_complete_checkpoint(cluster: SlurmCluster, tiny_shards: Path,
                                                              tmp_path: Path) -> None:
    name, steps = _job_name("train"), 6
    job = _submit(cluster, f"--job-name={name}", *CPU_JOB, "launchers/slurm.sh", CONFIG,
                  f"data.shards={tiny_shards}", f"run.root={tmp_path}", f"train.total_steps={steps}", *TINY)
    log = REPO / "logs" / f"{name}-{job}.out"  # the header's --output=logs/%x-%j.out, from the repo root
    try:
        fields = _wait(cluster, job, log)
        text = _read(log)
        assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", text[-4000:]
        assert fields["StdOut"] == str(log)
        run_dir = tmp_path / RUN_NAME
        assert _steps(run_dir) == list(range(1, steps + 1))
        _complete_checkpoint(run_dir, steps)
        state = json.loads((run_dir / "checkpoints" / f"step_{steps:08d}" / "trainer_state.json").read_text())
        assert state["world_size"] == 2
        assert f"rendezvous {cluster.node}:{20000 + job % 20000}" in text
        assert "restart 0" in text and "done: training finished (srun exit 0)" in text
        assert "1: " in text and "0: done:" in text  # both ranks' lines, labelled
    finally:
        log.unlink(missing_ok=True)


def test_stop_signals_save_requeue_and_resume_with_every_step_once(cluster: SlurmCluster, tiny_shards: Path,
                                                                   tmp_path: Path) -> None:
    """Three interruptions of one job, each: save, exit 75, `scontrol requeue`, resume.

    1. `scancel -s USR1`: what `#SBATCH --signal=USR1@N` does (to the srun tasks, not the script);
    2. `scancel -s TERM`: what preemption with a GraceTime does (SIGTERM to the job's steps);
    3. `scancel --batch -s USR1`: a notice to the batch script only (`--signal=B:USR1@N`),
       which passes it on to the ranks.
    """
    steps = 60
    (tmp_path / "logs").mkdir()
    name = _job_name("requeue")
    job = _submit(cluster, f"--job-name={name}", f"--output={tmp_path}/logs/%x-%j.out", *CPU_JOB,
                  "launchers/slurm.sh", CONFIG, f"data.shards={tiny_shards}", f"run.root={tmp_path / 'runs'}",
                  f"train.total_steps={steps}", "train.save_every_steps=100000", *TINY)
    log = tmp_path / "logs" / f"{name}-{job}.out"
    run_dir = tmp_path / "runs" / RUN_NAME
    signals = [("USR1", []), ("TERM", []), ("USR1", ["--batch"])]
    saved_at = []
    try:
        for restarts, (sig, how) in enumerate(signals):
            _wait_for_step(cluster, job, run_dir, (saved_at[-1] if saved_at else 0) + 2, log, restarts)
            out = cluster.run("scancel", *how, "-s", sig, str(job))
            assert out.returncode == 0, out.stderr
            _wait_for_step(cluster, job, run_dir, 0, log, restarts + 1)  # requeued and running again
            saved_at.append(int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1]))
        fields = _wait(cluster, job, log)
    finally:
        cluster.run("scancel", str(job))
    text = _read(log)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", text[-4000:]
    assert fields["Restarts"] == str(len(signals))
    assert _steps(run_dir) == list(range(1, steps + 1)), text[-4000:]  # no gap, no repeat
    _complete_checkpoint(run_dir, steps)
    for restarts, ((sig, _), step) in enumerate(zip(signals, saved_at), start=1):
        assert f"stopped by SIG{sig} at step {step} after a complete checkpoint" in text, text[-4000:]
        assert f"requeueing job {job} (restart {restarts})" in text
        assert f"restart {restarts}; batch host" in text
        assert f"resuming from {run_dir / 'checkpoints' / f'step_{step:08d}'} (step {step}," in text
    assert "SIGUSR1 to the batch script: passing it to the ranks" in text
    assert saved_at == sorted(set(saved_at)) and saved_at[-1] < steps


def test_scancel_saves_and_the_job_stays_cancelled(cluster: SlurmCluster, tiny_shards: Path, tmp_path: Path) -> None:
    """`scancel ID`: SIGTERM to the batch script and the tasks, SIGKILL KillWait seconds later.
    The ranks save in time (a tiny model), and the script does not requeue: `scontrol requeue`
    would accept the cancelled job and bring it back."""
    (tmp_path / "logs").mkdir()
    name = _job_name("cancel")
    job = _submit(cluster, f"--job-name={name}", f"--output={tmp_path}/logs/%x-%j.out", *CPU_JOB,
                  "launchers/slurm.sh", CONFIG, f"data.shards={tiny_shards}", f"run.root={tmp_path / 'runs'}",
                  "train.total_steps=100000", "train.save_every_steps=100000", *TINY)
    log = tmp_path / "logs" / f"{name}-{job}.out"
    run_dir = tmp_path / "runs" / RUN_NAME
    _wait_for_step(cluster, job, run_dir, 2, log, 0)
    assert cluster.run("scancel", str(job)).returncode == 0
    fields = _wait(cluster, job, log, timeout_s=60)
    text = _read(log)
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", (fields, text[-4000:])
    assert "SIGTERM to the batch script: SLURM is ending this job" in text, text[-4000:]
    assert "but the job was cancelled (reason: None): not requeued" in text, text[-4000:]
    step = _steps(run_dir)[-1]
    assert f"stopped by SIGTERM at step {step} after a complete checkpoint" in text
    _complete_checkpoint(run_dir, step)


def test_bad_input_fails_at_once_with_the_reason_in_the_log(cluster: SlurmCluster, tiny_shards: Path,
                                                             tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    cases = {  # job name -> (sbatch options, script arguments, the reason the log must give)
        "noconfig": ([], ["configs/nope.yaml"], "error: config file not found: configs/nope.yaml"),
        "noshards": ([], [CONFIG, "data.shards=/nope"], "error: shard path '/nope' does not exist"),
        # The test node declares 2 stand-in GPUs: sbatch accepts the job, and the preflight's
        # nvidia-smi check refuses it on this machine without any NVIDIA driver.
        "gpus": (["--gpus-per-node=2"], [CONFIG, f"data.shards={tiny_shards}"],
                 "shows 0 GPU(s) (no nvidia-smi: no NVIDIA driver here) but the job runs 2 task(s) per node"),
    }
    jobs = {}
    for what, (options, arguments, _) in cases.items():
        name = _job_name(what)
        job = _submit(cluster, f"--job-name={name}", f"--output={tmp_path}/logs/%x-%j.out", *CPU_JOB, *options,
                      "launchers/slurm.sh", *arguments, f"run.root={tmp_path / 'runs'}")
        jobs[what] = (job, tmp_path / "logs" / f"{name}-{job}.out")
    for what, (job, log) in jobs.items():
        fields = _wait(cluster, job, log, timeout_s=60)
        text = _read(log)
        assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", (what, fields, text)
        assert cases[what][2] in text, (what, text)
        assert "--kill-on-bad-exit" not in text, (what, text)  # no srun step was started
        assert time.mktime(time.strptime(fields["EndTime"], "%Y-%m-%dT%H:%M:%S")) - \
            time.mktime(time.strptime(fields["StartTime"], "%Y-%m-%dT%H:%M:%S")) <= 20, (what, fields)
    assert not (tmp_path / "runs").exists()  # nothing trained

    # More GPUs than the node has (2): sbatch itself refuses, and says why.
    refused = _sbatch(cluster, "--job-name=slurmtest-toomany", *CPU_JOB, "--gpus-per-node=4",
                      "launchers/slurm.sh", CONFIG, f"data.shards={tiny_shards}")
    assert refused.returncode != 0
    assert "Requested node configuration is not available" in refused.stderr


def test_array_tasks_get_their_own_run_folders_and_logs(cluster: SlurmCluster, tiny_shards: Path,
                                                       tmp_path: Path) -> None:
    """One task each (the node has 2 CPUs, so both run at once), logs in a folder per job name,
    made before sbatch (SLURM does not create it)."""
    name = _job_name("array")
    (tmp_path / "logs" / name).mkdir(parents=True)
    array = _submit(cluster, "--array=0-1", f"--job-name={name}", f"--output={tmp_path}/logs/%x/%A_%a.out",
                    *CPU_JOB, "--ntasks-per-node=1", "launchers/slurm.sh", CONFIG, f"data.shards={tiny_shards}",
                    f"run.root={tmp_path / 'runs'}", "train.total_steps=3", *TINY)
    for task in (0, 1):
        log = tmp_path / "logs" / name / f"{array}_{task}.out"
        fields = _wait(cluster, f"{array}_{task}", log)
        text = _read(log)
        assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", text[-4000:]
        assert f"array task {task} of job {array}: run.name={RUN_NAME}_{task}" in text
        run_dir = tmp_path / "runs" / f"{RUN_NAME}_{task}"
        assert _steps(run_dir) == [1, 2, 3]
        _complete_checkpoint(run_dir, 3)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [f"{RUN_NAME}_0", f"{RUN_NAME}_1"]
