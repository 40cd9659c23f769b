"""Launchers forming one world: two "nodes" on one machine through the deepspeed launcher's
hostfile, and `accelerate launch`, each with real processes over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port, write_indexed_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("indexed")
    write_indexed_shards(out, num_images=64, images_per_shard=16)  # 4 shards: one per stream
    return out


def test_two_nodes_on_loopback_form_one_world_and_read_different_shards(indexed: Path, tmp_path: Path) -> None:
    """`deepspeed --hostfile --no_ssh --node_rank N` once per "node", as on a cluster without ssh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port, out = free_port(), tmp_path / "dump"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    nodes = [
        subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                          "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                          "tests/workers/stream_dump.py", str(indexed), "epoch", "2", "4", "16", "3", str(out)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    # One world of 2 ranks, one on each node, as the process group itself reports it.
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["members"] == ranks[1]["members"] == [[0, "0"], [1, "1"]]
    # Each epoch (2 ranks x 2 workers x 4 batches of 4 = 64 images) reads every image once,
    # and the two ranks read different shards (16 images per shard).
    for epoch in range(2):
        per_rank = [{i for b in r["batches"] if b["epoch"] == epoch for i in b["images"]} for r in ranks]
        assert sorted(per_rank[0] | per_rank[1]) == list(range(64)) and not per_rank[0] & per_rank[1]
        shards = [{i // 16 for i in images} for images in per_rank]
        assert not shards[0] & shards[1], shards


def test_accelerate_launch_trains_with_two_ranks(tiny_shards: Path, tmp_path: Path) -> None:
    """`accelerate launch` as the launcher: it exports RANK/WORLD_SIZE/MASTER_* (torchrun under it)."""
    from conftest import run, tail

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "launchers/train.py", "--config", "configs/cpu_synthetic.yaml", f"data.shards={tiny_shards}",
           f"run.root={tmp_path}", "train.total_steps=3", "model.resolution_px=16", "model.widths=[8,16]",
           "model.latent_dim=8", "train.batch_global=4", "loss.warmup_images=8", "data.num_workers=1"]
    proc = run(cmd)
    assert proc.returncode == 0, tail(proc)
    state = json.loads((tmp_path / "cpu-synthetic" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["images_seen"] == 12
