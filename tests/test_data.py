"""Tests of the synthetic dataset and the shard writer on real tar shards in tmp_path."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from introvae_dist.data.shard_writer import write_shards
from introvae_dist.data.synthetic import encode_png, render_image
from introvae_dist.data.synthetic import main as synthetic_main

# --- synthetic images ------------------------------------------------------------------------

def test_render_image_is_deterministic_structured_and_varied() -> None:
    first = np.asarray(render_image(3, 32, seed=0))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, np.asarray(render_image(3, 32, seed=0)))
    assert not np.array_equal(first, np.asarray(render_image(3, 32, seed=1)))
    images = [np.asarray(render_image(i, 32), dtype=np.float32) for i in range(8)]
    for i in range(len(images)):
        assert images[i].std() > 10.0, f"image {i} is nearly flat"
        for j in range(i):
            assert np.abs(images[i] - images[j]).mean() > 5.0, f"images {i} and {j} look alike"


def test_render_image_rejects_tiny_size() -> None:
    with pytest.raises(ValueError, match="size_px"):
        render_image(0, 4)


# --- shard writer ----------------------------------------------------------------------------

def test_write_shards_counts_manifest_and_sha256(tmp_path: Path) -> None:
    samples = [(f"{i:08d}", encode_png(render_image(i, 8)), "png") for i in range(10)]
    shards = write_shards(samples, tmp_path, "demo", samples_per_shard=4, params={"answer": 42})

    assert [p.name for p in shards] == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["name"] == "demo"
    assert manifest["num_samples"] == 10
    assert manifest["params"] == {"answer": 42}
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 2]
    for entry, path in zip(manifest["shards"], shards):
        assert entry["file"] == path.name
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with tarfile.open(shards[0]) as tar:
        assert tar.getnames() == [f"{i:08d}.png" for i in range(4)]
        assert tar.extractfile(f"{0:08d}.png").read() == samples[0][1]


def test_write_shards_keeps_final_names_clean_on_error(tmp_path: Path) -> None:
    def failing_samples():
        yield "00000000", b"ok", "png"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(failing_samples(), tmp_path, "demo", samples_per_shard=4)
    assert list(tmp_path.iterdir()) == []


def test_write_shards_rejects_keys_webdataset_would_misgroup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key"):
        write_shards([("a.b", b"x", "png")], tmp_path, "demo", samples_per_shard=4)


def test_synthetic_cli_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", str(tmp_path), "--num-images", "6", "--size-px", "8", "--images-per-shard", "4"]
    assert synthetic_main(args) == 0
    assert "wrote 6 images in 2 shards" in capsys.readouterr().out
    shard_mtime_ns = (tmp_path / "synthetic-000000.tar").stat().st_mtime_ns
    assert synthetic_main(args) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "synthetic-000000.tar").stat().st_mtime_ns == shard_mtime_ns


def test_synthetic_cli_names_bad_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        synthetic_main(["--out", str(tmp_path), "--size-px", "4"])
    assert exit_info.value.code == 2
    assert "--size-px" in capsys.readouterr().err
