"""A checkpoint written by the code before issue 15's checkpointing package still resumes.

The fixture (tests/data/checkpoint_5f935ce/, see its README) is a real one-rank DeepSpeed
checkpoint of step 2 with the losses of steps 3 and 4 of the same run without a stop.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import REPO, deepspeed_cmd, run, tail

FIXTURE = REPO / "tests" / "data" / "checkpoint_5f935ce"
#: The fixture's run, less its data and run folder (see the fixture's README).
ARGS = ["train.total_steps=4", "train.save_every_steps=2", "model.resolution_px=16", "model.widths=[8,16]",
        "model.latent_dim=8", "train.batch_global=4", "train.log_every_steps=1", "loss.warmup_images=4",
        "loss.margin=4", "train.sample_every_steps=1000", "encoder.precision=fp32", "generator.precision=fp32",
        "train.keep_last_checkpoints=5", "train.channels_last=false"]
LOSSES = ("loss_e", "loss_g", "l_ae", "kl_real", "kl_rec_e", "kl_fake_e", "kl_rec_g", "kl_fake_g")

pytestmark = pytest.mark.slow


def test_a_checkpoint_of_the_former_layout_resumes_and_continues_the_run(tiny_shards: Path, tmp_path: Path) -> None:
    step_dir = tmp_path / "old" / "step_00000002"
    shutil.copytree(FIXTURE / "step_00000002", step_dir)  # resume must not write into tests/data
    proc = run(deepspeed_cmd(1, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                             f"data.shards={tiny_shards}", f"run.root={tmp_path}", "run.name=resumed",
                             f"run.resume={step_dir}", *ARGS))
    assert proc.returncode == 0, tail(proc)
    assert f"resuming from {step_dir} (step 2, 8 images seen)" in proc.stdout, tail(proc)
    got = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (FIXTURE / "one_go_steps_3_4.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [3, 4]
    # The same weights, Adam moments, RNGs and batches give the same losses; the tolerance is
    # for another CPU's fp32 kernels (a lost moment or another batch moves them by percents).
    for g, w in zip(got, want):
        for key in LOSSES:
            assert math.isclose(g[key], w[key], rel_tol=1e-3), (g["step"], key, g[key], w[key])
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000004" / "MANIFEST.json").is_file()
