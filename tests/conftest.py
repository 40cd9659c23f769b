"""Shared fixtures: tiny real shards and a runner for the real launchers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from introvae_dist.data.synthetic import write_synthetic_shards
from introvae_dist.distributed import free_port  # also imported from here by the tests

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 synthetic 16 px images in 4 real WebDataset shards with a manifest."""
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    write_synthetic_shards(out, num_images=64, size_px=16, images_per_shard=16, seed=0)
    return out


def run(cmd: list[str], timeout_s: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a launcher from the repo root with the package importable (plus ``env``).

    PYTHONFAULTHANDLER makes a process that dies of a native fault or abort print every
    thread's Python stack to stderr, so a failing test's tail says where it died. An existing
    PYTHONPATH is kept behind the repository: on the GPU machine it holds the wheels that
    bench/gpu_check.sh installs with ``--target`` (DeepSpeed, WebDataset).
    """
    python_path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
           **(env or {})}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)


def deepspeed_cmd(num_ranks: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
            "--master_port", str(free_port()), script, *args]


def tail(proc: subprocess.CompletedProcess[str], chars: int = 4000) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-chars:]}\n--- stderr ---\n{proc.stderr[-chars:]}"



def write_indexed_shards(out_dir: Path, num_images: int, images_per_shard: int, size_px: int = 8) -> None:
    """Shards (with a manifest) whose image i is a flat PNG of colour (i % 256, i // 256, 128),
    so the loader's output names the images it holds (see :func:`image_indices`)."""
    from PIL import Image

    from introvae_dist.data.shard_writer import write_shards
    from introvae_dist.data.synthetic import encode_png

    samples = (
        (f"{i:08d}", encode_png(Image.new("RGB", (size_px, size_px), (i % 256, i // 256, 128))), "png")
        for i in range(num_images)
    )
    write_shards(samples, out_dir, "indexed", samples_per_shard=images_per_shard)


def image_indices(batch: "torch.Tensor") -> list[int]:  # noqa: F821 (torch imported lazily)
    """Inverse of :func:`write_indexed_shards`' colouring for a batch (B, 3, R, R): uint8
    as the stream yields it, or float in [0, 1]."""
    rgb = (batch[:, :, 0, 0] * 255).round().long() if batch.is_floating_point() else batch[:, :, 0, 0].long()
    return (rgb[:, 0] + 256 * rgb[:, 1]).tolist()
