"""The training step, resume and sampling on a CUDA GPU: one rank over NCCL, no mocks.

Skipped without a GPU; bench/gpu_check.sh runs them on the lent H200 (`pytest -m cuda`). Each
reuses the CPU test of the same property and changes only what a GPU changes:

* the two-engine step against the plain-PyTorch Algorithm 1 of test_step_equivalence.py, under
  ZeRO 0-3 and both step orders, with the reference on the same GPU and cuDNN's TF32 off on
  both sides, within the rounding tolerance of the two-rank CPU case;
* resume against one go (test_resume.py's check), at one rank, within a tolerance: cuDNN may
  sum a backward in another order in another process;
* Soft-IntroVAE's step against the authors' loop of test_soft_distributed.py, ZeRO 1-3, the
  reference on the same GPU, TF32 off on both sides;
* `introvae-dist sample --device cuda` on a checkpoint trained on the GPU (ZeRO 2 and 3):
  the grid is written, and one seed gives the same bytes twice.

The figures each test measures (weight differences, whether resume was bitwise) are printed,
so `pytest -rP` shows them for docs/BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import deepspeed_cmd, run, tail
from test_inference import CLI, PAD_PX, TINY_RUN, TRAIN_STEPS
from test_resume import GPU_RESUME_TOL, check_resume_matches_one_go
from test_soft_distributed import TOL as SOFT_TOL
from test_soft_distributed import differences as soft_differences
from test_step_equivalence import EXPECTED_CASES, ROUNDING_TOL, RUNS, differences

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda", 0)


@pytest.fixture
def no_cudnn_tf32() -> Iterator[None]:
    """cuDNN's fp32 convolutions in fp32 in this process, as the worker sets for its own
    (tests/workers/step_check.py); torch's default (TF32 allowed) is restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def gpu_step_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The worker at one rank on the GPU (the CPU file's "ws1" case: BatchNorm, no clipping)."""
    ranks, args = RUNS["ws1"]
    path = tmp_path_factory.mktemp("step_check_cuda") / "ws1.pt"
    proc = run(deepspeed_cmd(ranks, "tests/workers/step_check.py", *args, str(path)))
    assert proc.returncode == 0, tail(proc)
    return torch.load(path, weights_only=True)


def test_two_engine_step_on_the_gpu_matches_algorithm1_under_every_zero_stage(
        gpu_step_report: dict[str, Any], no_cudnn_tf32: None) -> None:
    report = gpu_step_report
    assert report["world_size"] == 1 and report["device"] == "cuda:0", report["device"]
    assert sorted(report["cases"]) == EXPECTED_CASES  # ZeRO 0-3, both step orders
    table = differences(report, CUDA)
    print("largest weight difference to the reference on the GPU:",
          ", ".join(f"{k} {v:.2e}" for k, v in sorted(table.items())))
    # Both sides on one GPU in fp32 (TF32 off): rounding only, as between 1 and 2 CPU ranks.
    assert max(table.values()) < ROUNDING_TOL, table
    # The comparison is not empty: the three steps did move the weights.
    moved = max((report["cases"]["zero3_algorithm1"][3]["encoder"][k] - v.float()).abs().max().item()
                for k, v in report["init"]["encoder"].items() if k in report["cases"]["zero3_algorithm1"][3]["encoder"])
    assert moved > 100 * ROUNDING_TOL, moved


def test_soft_introvae_step_on_the_gpu_matches_the_authors_step_under_zero_1_to_3(
        tmp_path: Path, no_cudnn_tf32: None) -> None:
    path = tmp_path / "soft_ws1.pt"
    proc = run(deepspeed_cmd(1, "tests/workers/soft_check.py", str(path)))
    assert proc.returncode == 0, tail(proc)
    report = torch.load(path, weights_only=True)
    assert report["world_size"] == 1 and report["device"] == "cuda:0", report["device"]
    table = soft_differences(report, CUDA)
    print("Soft-IntroVAE, largest weight difference to the authors' step on the GPU:",
          ", ".join(f"{k} {v:.2e}" for k, v in sorted(table.items())))
    assert max(table.values()) < SOFT_TOL, table


def test_resume_on_the_gpu_matches_one_go(tiny_shards: Path, tmp_path: Path) -> None:
    exact = check_resume_matches_one_go(tiny_shards, tmp_path, ranks=1, tolerance=GPU_RESUME_TOL)
    print(f"resume on the GPU bitwise equal to one go (losses and weights): {exact}")


@pytest.fixture(scope="module")
def gpu_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder trained on the GPU by one rank (test_inference's tiny run: fp32, E at
    ZeRO 2, G at ZeRO 3, one checkpoint at the last step)."""
    root = tmp_path_factory.mktemp("cuda_runs")
    proc = run(deepspeed_cmd(1, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                             f"data.shards={tiny_shards}", f"run.root={root}", *TINY_RUN))
    assert proc.returncode == 0, tail(proc)
    (run_dir,) = root.iterdir()
    assert (run_dir / "checkpoints" / f"step_{TRAIN_STEPS:08d}" / "MANIFEST.json").is_file()
    return run_dir


def _sample(run_dir: Path, grid: Path, seed: int) -> np.ndarray:
    proc = run([*CLI, "sample", str(run_dir), "--grid", str(grid), "-n", "9", "--batch", "4", "--seed", str(seed),
                "--device", "cuda"])
    assert proc.returncode == 0, tail(proc)
    assert f"{grid}: a grid of 9 samples (seed {seed}, 1 rank(s))" in proc.stdout, tail(proc)
    return np.asarray(Image.open(grid).convert("RGB"))


def test_sampling_on_the_gpu_is_written_and_the_same_for_one_seed(gpu_run: Path, tmp_path: Path) -> None:
    first = _sample(gpu_run, tmp_path / "first.png", seed=4)
    again = _sample(gpu_run, tmp_path / "again.png", seed=4)
    other = _sample(gpu_run, tmp_path / "other.png", seed=5)
    side_px = PAD_PX + 3 * (16 + PAD_PX)  # 3 x 3 cells of 16 px (`sample --grid` does not enlarge cells)
    assert first.shape == (side_px, side_px, 3), first.shape
    assert (tmp_path / "first.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    assert not np.array_equal(first, other)  # the seed does pick the samples
    assert first.std() > 1.0  # not a blank image
