"""Two DeepSpeed engines over gloo with 2 real ranks against a plain-PyTorch Algorithm 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import deepspeed_cmd, run, tail


@pytest.mark.slow
def test_two_engines_match_plain_pytorch_under_zero_1_2_3_in_both_step_orders(tmp_path: Path) -> None:
    report_path = tmp_path / "grad_check.json"
    proc = run(deepspeed_cmd(2, "tests/workers/grad_check.py", str(report_path)))
    assert proc.returncode == 0, tail(proc)
    report = json.loads(report_path.read_text())
    assert sorted(report) == [f"zero{s}_{o}" for s in (1, 2, 3) for o in ("algorithm1", "shared_encoder")]
    for case, r in report.items():
        # fp32 on both sides; only the order of the cross-rank sum differs.
        assert r["encoder_rel_err"] < 1e-4, (case, r)
        assert r["generator_rel_err"] < 1e-4, (case, r)
        # Neither engine's backward computes the other network's weight gradients.
        assert r["encoder_grads_computed_in_encoder_phase"] > 0, (case, r)
        assert r["generator_grads_computed_in_encoder_phase"] == 0, (case, r)
        assert r["encoder_grads_computed_in_generator_phase"] == 0, (case, r)


# --- reading the world from each launcher's variables (no processes needed) -----------------

from introvae_dist.distributed import slurm_port, tasks_on_node, world_from_env  # noqa: E402


def test_world_from_standard_launcher_variables() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    world = world_from_env(env)  # a launcher's variables win over SLURM's (torchrun under srun)
    assert (world.rank, world.local_rank, world.world_size, world.local_world_size) == (3, 1, 8, 2)


def test_world_from_srun_task_variables_with_rendezvous_from_the_allocation() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NODEID": "2",
           "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456",
           "MASTER_ADDR": "gpu01"}
    world = world_from_env(env)
    assert (world.rank, world.local_rank, world.world_size, world.local_world_size) == (5, 1, 8, 2)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "gpu01" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_batch_script_outside_srun_is_a_world_of_one() -> None:
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}  # no SLURM_STEP_ID: not in srun
    assert world_from_env(env).world_size == 1


def test_tasks_per_node_and_port() -> None:
    assert [tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("4", 0) == 4
    assert slurm_port(1) == 20001 and slurm_port(20000) == 20000 and 20000 <= slurm_port(987654321) < 40000


@pytest.mark.parametrize("var", ["LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                                 "MV2_COMM_WORLD_LOCAL_RANK"])
def test_local_rank_comes_from_the_launchers_variable(var: str) -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", var: "1"}  # rank 5 is GPU 1 of the third node, not GPU 5
    world = world_from_env(env)
    assert world.local_rank == 1 and env["LOCAL_RANK"] == "1"


def test_a_multi_rank_world_without_a_local_rank_is_refused_naming_the_variables() -> None:
    with pytest.raises(ValueError, match=r"RANK=5 WORLD_SIZE=8 but no local rank: set one of LOCAL_RANK, SLURM_LOCALID, "
                                         r"OMPI_COMM_WORLD_LOCAL_RANK"):
        world_from_env({"RANK": "5", "WORLD_SIZE": "8"})
    assert world_from_env({"RANK": "0", "WORLD_SIZE": "1"}).local_rank == 0
