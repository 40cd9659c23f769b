"""Tests of the data layer on real tar shards built in tmp_path with the real writer."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from introvae_dist.data.loader import (
    DataError,
    build_train_stream,
    decode_and_resize,
    resolve_shards,
    stored_image_size_px,
)
from introvae_dist.data.shard_writer import write_shards
from introvae_dist.data.synthetic import encode_png, render_image, write_synthetic_shards
from introvae_dist.data.synthetic import main as synthetic_main

STORED_PX = 32
TRAIN_PX = 16


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 synthetic 32px images in 4 shards of 12, shared by the stream tests."""
    out_dir = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(out_dir, num_images=48, size_px=STORED_PX, images_per_shard=12, seed=0)
    return out_dir


def first_batches(loader: torch.utils.data.DataLoader, count: int) -> list[torch.Tensor]:
    return list(islice(iter(loader), count))


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


# --- resolve_shards --------------------------------------------------------------------------

def test_resolve_shards_directory_brace_glob_and_file(synthetic_dir: Path) -> None:
    expected = [str(synthetic_dir / f"synthetic-{i:06d}.tar") for i in range(4)]
    assert resolve_shards(str(synthetic_dir)) == expected
    assert resolve_shards(str(synthetic_dir / "synthetic-{000000..000003}.tar")) == expected
    assert resolve_shards(str(synthetic_dir / "synthetic-*.tar")) == expected
    assert resolve_shards(expected[1]) == [expected[1]]
    assert resolve_shards("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]


def test_resolve_shards_directory_without_manifest(tmp_path: Path) -> None:
    for name in ("b.tar", "a.tar"):
        (tmp_path / name).write_bytes(b"\0" * 512)
    assert resolve_shards(str(tmp_path)) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]


def test_resolve_shards_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        resolve_shards(str(missing))
    with pytest.raises(DataError, match="no \\*.tar"):
        resolve_shards(str(tmp_path))
    with pytest.raises(DataError, match="x-000001.tar"):
        (tmp_path / "x-000000.tar").write_bytes(b"\0" * 512)
        resolve_shards(str(tmp_path / "x-{000000..000001}.tar"))
    with pytest.raises(DataError, match="matches no files"):
        resolve_shards(str(tmp_path / "*.tgz"))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError, match="empty.tar.*0 bytes"):
        resolve_shards(str(tmp_path))


def test_resolve_shards_checks_manifest_listing(synthetic_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((synthetic_dir / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="synthetic-000000.tar"):
        resolve_shards(str(tmp_path))


def test_stored_image_size_px(synthetic_dir: Path, tmp_path: Path) -> None:
    assert stored_image_size_px(resolve_shards(str(synthetic_dir))) == STORED_PX
    assert stored_image_size_px(["pipe:cat x.tar"]) is None
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(DataError, match="junk.tar"):
        stored_image_size_px([str(tmp_path / "junk.tar")])


# --- decode_and_resize -----------------------------------------------------------------------

def test_decode_and_resize_crops_resizes_and_flips() -> None:
    # A non-square JPEG much larger than needed exercises the draft (reduced decode) path.
    wide = Image.new("RGB", (400, 200), (255, 0, 0))
    wide.paste((0, 0, 255), (200, 0, 400, 200))  # right half blue
    buffer = io.BytesIO()
    wide.save(buffer, format="JPEG", quality=95)
    pixels = decode_and_resize(buffer.getvalue(), 16, hflip=False, rng=random.Random(0))
    assert pixels.shape == (3, 16, 16) and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    # Centre crop of a red|blue split: left half red, right half blue.
    assert pixels[0, :, :4].mean() > 0.8 and pixels[2, :, -4:].mean() > 0.8

    flips = [decode_and_resize(buffer.getvalue(), 16, hflip=True, rng=random.Random(s)) for s in range(8)]
    assert any(np.array_equal(f, pixels) for f in flips)
    assert any(np.array_equal(f, pixels[:, :, ::-1]) for f in flips)


# --- the training stream ---------------------------------------------------------------------

def test_stream_yields_resized_float_batches(synthetic_dir: Path) -> None:
    loader = build_train_stream(resolve_shards(str(synthetic_dir)), TRAIN_PX, batch_per_rank=8,
                                rank=0, world_size=1, num_workers=0, seed=0, shuffle_buffer=16)
    for batch in first_batches(loader, 8):  # 64 images: more than the 48 stored, so it resamples
        assert batch.shape == (8, 3, TRAIN_PX, TRAIN_PX)
        assert batch.dtype == torch.float32
        assert 0.0 <= batch.min() and batch.max() <= 1.0
        assert batch.std() > 0.05


def test_stream_is_deterministic_per_seed_and_differs_per_rank(synthetic_dir: Path) -> None:
    urls = resolve_shards(str(synthetic_dir))

    def batches(rank: int, seed: int) -> list[torch.Tensor]:
        loader = build_train_stream(urls, TRAIN_PX, batch_per_rank=4, rank=rank, world_size=2,
                                    num_workers=0, seed=seed, shuffle_buffer=16)
        return first_batches(loader, 3)

    reference = batches(rank=0, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(reference, batches(rank=0, seed=7)))
    assert not any(torch.equal(a, b) for a, b in zip(reference, batches(rank=1, seed=7)))
    assert not any(torch.equal(a, b) for a, b in zip(reference, batches(rank=0, seed=8)))


def test_stream_with_two_workers_is_deterministic(synthetic_dir: Path) -> None:
    urls = resolve_shards(str(synthetic_dir))

    def batches() -> list[torch.Tensor]:
        loader = build_train_stream(urls, TRAIN_PX, batch_per_rank=4, rank=0, world_size=1,
                                    num_workers=2, seed=3, shuffle_buffer=16)
        return first_batches(loader, 4)

    first, second = batches(), batches()
    assert all(b.shape == (4, 3, TRAIN_PX, TRAIN_PX) for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # Batches 0 and 1 come from different workers, which must not replay the same stream.
    assert not torch.equal(first[0], first[1])


def test_stream_skips_corrupt_png(tmp_path: Path) -> None:
    good = [(f"{i:08d}", encode_png(render_image(i, STORED_PX)), "png") for i in range(5)]
    corrupt = ("00000099", b"\x89PNG\r\n\x1a\n this is not a png", "png")
    write_shards([*good[:2], corrupt, *good[2:]], tmp_path, "mixed", samples_per_shard=16)
    loader = build_train_stream(resolve_shards(str(tmp_path)), TRAIN_PX, batch_per_rank=4,
                                rank=0, world_size=1, num_workers=0, seed=0, shuffle_buffer=4)
    with pytest.warns(UserWarning, match="00000099"):
        batches = first_batches(loader, 3)
    assert [b.shape for b in batches] == [(4, 3, TRAIN_PX, TRAIN_PX)] * 3


def test_stream_of_only_corrupt_samples_raises(tmp_path: Path) -> None:
    write_shards([(f"{i:08d}", b"garbage", "png") for i in range(3)], tmp_path, "bad", samples_per_shard=8)
    loader = build_train_stream(resolve_shards(str(tmp_path)), TRAIN_PX, batch_per_rank=2,
                                rank=0, world_size=1, num_workers=0, seed=0)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="in a row failed to decode"):
        next(iter(loader))
