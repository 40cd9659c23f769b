"""The benchmarks' `--device cuda`: refused at once without a GPU, and run on one."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run, tail

#: The scripts that take `--device {cpu,cuda}` (bench/device.py).
SCRIPTS = ("bench/step_throughput.py", "bench/vs_authors.py", "bench/memory_1024.py", "bench/conv_peak.py")
#: Not a timing test: only "refused before any work". The refusal itself is an import of torch
#: (seconds); the work it stands before (FLOP counting, DeepSpeed, engines) takes far longer.
REFUSAL_BOUND_S = 20.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("script", SCRIPTS)
def test_device_cuda_without_a_gpu_is_refused_before_any_work(script: str) -> None:
    start = time.perf_counter()
    proc = run([sys.executable, script, "--device", "cuda"], timeout_s=120)
    elapsed_s = time.perf_counter() - start
    assert proc.returncode == 2, tail(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, tail(proc)
    assert lines[0].startswith(f"{script}: --device cuda") and "no CUDA" in lines[0], tail(proc)
    assert proc.stdout == "", tail(proc)
    assert elapsed_s < REFUSAL_BOUND_S, f"took {elapsed_s:.1f} s: did the benchmark run?\n{tail(proc)}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_peak_and_step_throughput_run_on_the_gpu(tmp_path: Path) -> None:
    peak_json, step_json = tmp_path / "conv_peak.json", tmp_path / "step.json"
    proc = run([sys.executable, "bench/conv_peak.py", "--device", "cuda", "--repeats", "1",
                "--json", str(peak_json)], timeout_s=300)
    assert proc.returncode == 0, tail(proc)
    peak = json.loads(peak_json.read_text())
    assert {"device", "backend_flags", "conv", "conv_best_tflops", "matmul", "peak"} <= peak.keys()
    assert peak["device"]["type"] == "cuda" and peak["device"]["compute_capability"]
    assert peak["peak"]["best"] == max(peak["peak"]["conv_bf16"], peak["peak"]["matmul_bf16"]) > 0

    proc = run([sys.executable, "bench/step_throughput.py", "--device", "cuda", "--resolution-px", "64",
                "--batch", "4", "--steps", "1", "--json", str(step_json)], timeout_s=600)
    assert proc.returncode == 0, tail(proc)
    assert "no core-share filter on cuda" in proc.stdout, tail(proc)
    step = json.loads(step_json.read_text())
    assert {"device", "backend_flags", "peak_tflops", "setup", "results"} <= step.keys()
    assert step["device"]["type"] == "cuda" and step["backend_flags"]["cudnn_benchmark"] is False
    assert [r["variant"] for r in step["results"]] == ["bf16", "fp32"]
    for r in step["results"]:
        assert r["rounds_used"] == [0] and r["images_per_s"] > 0 and r["mfu"] is not None
