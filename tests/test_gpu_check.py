"""bench/gpu_check.sh and bench/gpu_wheels.sh on a machine without a GPU: the scripts parse,
the check refuses a missing argument, and without CUDA it measures nothing, writes nothing and
says so in one line (so a wrong machine costs nothing and its output cannot be mistaken for a
result). Their GPU path runs on the lent GPU machine only (DEVELOPERS.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import run, tail

SCRIPTS = ("bench/gpu_check.sh", "bench/gpu_wheels.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script: str) -> None:
    proc = run(["bash", "-n", script], timeout_s=30)
    assert proc.returncode == 0 and proc.stderr == "", tail(proc)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_passes_shellcheck(script: str) -> None:
    proc = run(["shellcheck", script], timeout_s=60)
    assert proc.returncode == 0, tail(proc)


def test_gpu_check_without_an_argument_prints_its_usage_and_exits_2() -> None:
    proc = run(["bash", "bench/gpu_check.sh"], timeout_s=30)
    assert proc.returncode == 2, tail(proc)
    assert proc.stdout == "" and proc.stderr.splitlines() == [proc.stderr.strip()], tail(proc)
    assert proc.stderr.startswith("usage: bash bench/gpu_check.sh OUT_DIR"), tail(proc)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_check_without_a_gpu_says_so_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "not" / "there" / "yet"
    proc = run(["bash", "bench/gpu_check.sh", str(out)], timeout_s=120)
    assert proc.returncode == 0, tail(proc)
    assert proc.stderr == "", tail(proc)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "nothing was measured" in lines[0], tail(proc)
    assert out.is_dir() and list(out.iterdir()) == []  # created, left empty
