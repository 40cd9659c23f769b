"""Tests of the shard set and the training loader on real tar shards written in tmp_path."""

from __future__ import annotations

import io
import json
import random
import shutil
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, free_port, image_indices, run, tail, write_indexed_shards
from PIL import Image

from introvae_dist.data.decode import decode_and_resize
from introvae_dist.data.loader import (
    StreamSpec,
    TrainStream,
    batches_per_rank_epoch,
    batches_per_stream,
    position_after_layout_change,
    slices_of_stream,
    build_train_stream,
    check_stream_coverage,
    read_fixed_images,
)
from introvae_dist.data.shard_set import (
    DataError,
    resolve_shard_set,
    stored_image_size_px,
    verify_shards,
    with_sample_counts,
)
from introvae_dist.data.shard_writer import write_shards
from introvae_dist.data.synthetic import encode_png, render_image, write_synthetic_shards

STORED_PX = 32
TRAIN_PX = 16


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 synthetic 32px images in 4 shards of 12."""
    out_dir = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(out_dir, num_images=48, size_px=STORED_PX, images_per_shard=12, seed=0)
    return out_dir


@pytest.fixture(scope="module")
def indexed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """128 indexed 8px images in 8 shards of 16: divides evenly over 4 streams and batch 8."""
    out_dir = tmp_path_factory.mktemp("indexed")
    write_indexed_shards(out_dir, num_images=128, images_per_shard=16)
    return out_dir


def stream_of(directory: Path, **kwargs: object):
    args = dict(resolution_px=8, batch_per_rank=8, rank=0, world_size=1, num_workers=0, seed=0,
                shuffle_buffer=8, hflip=False)
    args.update(kwargs)
    return build_train_stream(resolve_shard_set(str(directory)).shards, **args)  # type: ignore[arg-type]


# --- the shard set -------------------------------------------------------------------------

def test_resolve_directory_manifest_brace_glob_file_and_pipe(synthetic_dir: Path) -> None:
    expected = [str(synthetic_dir / f"synthetic-{i:06d}.tar") for i in range(4)]
    from_dir = resolve_shard_set(str(synthetic_dir))
    assert from_dir.urls == expected
    assert [s.num_samples for s in from_dir.shards] == [12] * 4 and from_dir.num_samples == 48
    assert all(s.sha256 and s.num_bytes for s in from_dir.shards)
    assert resolve_shard_set(str(synthetic_dir / "manifest.json")).urls == expected
    assert resolve_shard_set(str(synthetic_dir / "synthetic-{000000..000003}.tar")).urls == expected
    assert resolve_shard_set(str(synthetic_dir / "synthetic-*.tar")).urls == expected
    assert resolve_shard_set(expected[1]).urls == [expected[1]]
    assert resolve_shard_set("pipe:cat x-{0..1}.tar").urls == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]
    joined = resolve_shard_set(f"{expected[0]}::{expected[2]}")
    assert joined.urls == [expected[0], expected[2]]


def test_remote_shards_take_counts_from_a_local_manifest(synthetic_dir: Path) -> None:
    spec = f"pipe:cat {synthetic_dir}/synthetic-{{000000..000003}}.tar"
    shard_set = resolve_shard_set(spec, manifest=str(synthetic_dir / "manifest.json"))
    assert [s.num_samples for s in shard_set.shards] == [12] * 4
    with pytest.raises(DataError, match="matches no file listed"):
        resolve_shard_set("pipe:cat other-000000.tar", manifest=str(synthetic_dir / "manifest.json"))
    with pytest.raises(DataError, match="epoch mode needs the counts of remote"):
        with_sample_counts(resolve_shard_set(spec))


def test_resolve_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        resolve_shard_set(str(missing))
    with pytest.raises(DataError, match="no \\*.tar"):
        resolve_shard_set(str(tmp_path))
    (tmp_path / "x-000000.tar").write_bytes(b"\0" * 512)
    with pytest.raises(DataError, match="x-000001.tar"):
        resolve_shard_set(str(tmp_path / "x-{000000..000001}.tar"))
    with pytest.raises(DataError, match="matches no files"):
        resolve_shard_set(str(tmp_path / "*.tgz"))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError, match="empty.tar.*0 bytes"):
        resolve_shard_set(str(tmp_path))


def test_manifest_listing_a_missing_shard_is_named(synthetic_dir: Path, tmp_path: Path) -> None:
    shutil.copy(synthetic_dir / "manifest.json", tmp_path / "manifest.json")
    with pytest.raises(DataError, match="synthetic-000000.tar"):
        resolve_shard_set(str(tmp_path))


def test_verify_names_shards_that_differ_from_the_manifest(synthetic_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_dir, copy)
    assert verify_shards(list(resolve_shard_set(str(copy)).shards), "sha256") == []
    # Same size, different bytes: only the checksum can tell.
    shard = copy / "synthetic-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    shards = list(resolve_shard_set(str(copy)).shards)
    assert verify_shards(shards, "size") == []
    (problem,) = verify_shards(shards, "sha256")
    assert "synthetic-000001.tar" in problem and "sha256" in problem
    # A truncated shard fails the cheap size check already.
    shard.write_bytes(bytes(data[:2048]))
    (problem,) = verify_shards(shards, "size")
    assert "2048 bytes" in problem
    assert verify_shards(shards, "none") == []


def test_counts_of_local_tars_without_manifest(synthetic_dir: Path, tmp_path: Path) -> None:
    for shard in synthetic_dir.glob("*.tar"):
        shutil.copy(shard, tmp_path / shard.name)
    bare = resolve_shard_set(str(tmp_path))
    assert bare.num_samples is None
    assert with_sample_counts(bare).num_samples == 48


def test_stored_image_size_px(synthetic_dir: Path, tmp_path: Path) -> None:
    assert stored_image_size_px(resolve_shard_set(str(synthetic_dir))) == STORED_PX
    shutil.copy(synthetic_dir / "synthetic-000000.tar", tmp_path / "a.tar")  # no manifest: peeks
    assert stored_image_size_px(resolve_shard_set(str(tmp_path / "a.tar"))) == STORED_PX
    assert stored_image_size_px(resolve_shard_set("pipe:cat x.tar")) is None
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(DataError, match="junk.tar"):
        stored_image_size_px(resolve_shard_set(str(tmp_path / "junk.tar")))


# --- decoding -------------------------------------------------------------------------------

def test_decode_and_resize_crops_resizes_and_flips() -> None:
    # A non-square JPEG much larger than needed exercises the draft (reduced decode) path.
    wide = Image.new("RGB", (400, 200), (255, 0, 0))
    wide.paste((0, 0, 255), (200, 0, 400, 200))  # right half blue
    buffer = io.BytesIO()
    wide.save(buffer, format="JPEG", quality=95)
    pixels = decode_and_resize(buffer.getvalue(), 16, hflip=False, rng=random.Random(0))
    assert pixels.shape == (3, 16, 16) and pixels.dtype == np.uint8
    # Centre crop of a red|blue split: left half red, right half blue.
    assert pixels[0, :, :4].mean() > 200 and pixels[2, :, -4:].mean() > 200

    flips = [decode_and_resize(buffer.getvalue(), 16, hflip=True, rng=random.Random(s)) for s in range(8)]
    assert any(np.array_equal(f, pixels) for f in flips)
    assert any(np.array_equal(f, pixels[:, :, ::-1]) for f in flips)


def test_draft_decode_matches_full_decode_closely() -> None:
    """Reduced-size JPEG decoding is an approximation of decode-then-shrink, not a different image."""
    image = render_image(3, 512).resize((1024, 1024), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    fast = decode_and_resize(buffer.getvalue(), 256, hflip=False, rng=random.Random(0))
    full = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").resize((256, 256), Image.BICUBIC))
    assert np.abs(fast.astype(np.float32) - full.transpose(2, 0, 1)).mean() < 0.02 * 255


# --- streams: coverage, epochs, determinism -------------------------------------------------

def test_too_few_shards_for_ranks_times_workers_says_how_many(indexed_dir: Path) -> None:
    check_stream_coverage(num_shards=8, world_size=2, num_workers=4)
    with pytest.raises(DataError, match="8 shard.*2 rank.*8 loader worker.*16 streams.*at least 16 shards.*num_workers <= 4"):
        check_stream_coverage(num_shards=8, world_size=2, num_workers=8)
    with pytest.raises(DataError, match="at least 16 shards"):
        stream_of(indexed_dir, world_size=4, num_workers=4)


def test_epoch_mode_in_process_sees_every_image_once_per_epoch(indexed_dir: Path) -> None:
    """2 ranks x 2 DataLoader workers = 4 streams, in this process (the real ranks are below)."""
    seen: list[int] = []
    for rank in range(2):
        stream = stream_of(indexed_dir, rank=rank, world_size=2, num_workers=2)
        batches = list(islice(stream, 8))  # 128 images / 2 ranks / 8 per batch
        assert stream.epoch == 0 and stream.batch_in_epoch == 3
        seen += [i for b in batches for i in image_indices(b)]
        next(stream)
        assert stream.epoch == 1
    assert sorted(seen) == list(range(128))


def test_epoch_mode_balances_streams_whatever_the_shard_sizes(tmp_path: Path) -> None:
    write_indexed_shards(tmp_path, num_images=117, images_per_shard=16)  # 7 x 16 + 1 x 5
    shards = resolve_shard_set(str(tmp_path)).shards
    for epoch in range(3):
        spec = StreamSpec(shards, 8, 4, 0, 2, 3, seed=1)  # 6 streams over 8 shards of unequal size
        slices = [slices_of_stream(spec, epoch, stream) for stream in range(6)]
        sizes = [sum(piece.take for piece in pieces) for pieces in slices]
        assert sum(sizes) == 117 and max(sizes) - min(sizes) <= 1  # 19 or 20 each
        assert batches_per_stream(spec, epoch) == 4  # floor(19 / 4)
    seen = []
    for rank in range(2):
        stream = stream_of(tmp_path, rank=rank, world_size=2, num_workers=3, batch_per_rank=4, seed=1)
        epoch_0 = list(islice(stream, 12))  # 3 workers x 4 batches
        assert stream.epoch == 0
        next(stream)
        assert stream.epoch == 1  # both ranks turn to epoch 1 after the same 12 batches
        seen += [i for b in epoch_0 for i in image_indices(b)]
    assert len(seen) == len(set(seen)) == 96  # 96 of 117 images, none twice


def test_stream_is_deterministic_per_seed_and_differs_per_rank(synthetic_dir: Path) -> None:
    def batches(rank: int, seed: int) -> list[torch.Tensor]:
        stream = stream_of(synthetic_dir, resolution_px=TRAIN_PX, batch_per_rank=4, rank=rank, world_size=2,
                           seed=seed, hflip=True)
        return list(islice(stream, 3))

    reference = batches(rank=0, seed=7)
    assert all(b.shape == (4, 3, TRAIN_PX, TRAIN_PX) and b.dtype == torch.uint8 for b in reference)
    assert all(b.float().std() > 0.05 * 255 for b in reference)  # real, varied images
    assert all(torch.equal(a, b) for a, b in zip(reference, batches(rank=0, seed=7)))
    assert not any(torch.equal(a, b) for a, b in zip(reference, batches(rank=1, seed=7)))
    assert not any(torch.equal(a, b) for a, b in zip(reference, batches(rank=0, seed=8)))


def test_stream_with_two_workers_is_deterministic(indexed_dir: Path) -> None:
    def indices() -> list[list[int]]:
        return [image_indices(b) for b in islice(stream_of(indexed_dir, num_workers=2, seed=3), 40)]

    first = indices()
    assert first == indices()
    # Workers read disjoint shards, so no image repeats within an epoch of 16 batches.
    assert sorted(i for b in first[:16] for i in b) == list(range(128))


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_stream_resumed_at_a_position_continues_exactly(synthetic_dir: Path, mode: str) -> None:
    """Stopping after k batches and starting a new stream at k gives the batches an
    uninterrupted stream gives, flips included: mid-epoch, on an epoch boundary and with the
    DataLoader's worker turn in the middle (odd k with 2 workers)."""
    spec = StreamSpec(resolve_shard_set(str(synthetic_dir)).shards, 16, 4, 0, 1, 2, 5, mode, 8, True)  # type: ignore[arg-type]
    per_epoch = spec.streams_per_rank * batches_per_stream(spec, 0)
    assert per_epoch == 12  # 48 images / 2 streams / batch 4 = 6 batches per worker
    full = list(islice(TrainStream(spec), 30))
    for k in (5, 12, 17):
        resumed = TrainStream(spec, consumed=k)
        for i, batch in enumerate(islice(resumed, 30 - k)):
            assert torch.equal(batch, full[k + i]), (mode, k, i)
        assert resumed.consumed == 30 and resumed.epoch == 29 // 12


def test_position_after_layout_change_keeps_epoch_and_share() -> None:
    from introvae_dist.data.shard_set import ShardInfo

    shards = tuple(ShardInfo(f"s{i}.tar", 100, None, None) for i in range(8))
    two = StreamSpec(shards, 16, 10, 0, 2, 2, 0)  # 4 streams of 200 images: 20 batches per worker
    one = StreamSpec(shards, 16, 10, 0, 1, 2, 0)  # 2 streams of 400 images: 40 batches per worker
    # 2 ranks: epoch 3 plus 10 of its 40 batches per rank (25%) -> 1 rank: 25% of 80 in epoch 3.
    assert batches_per_rank_epoch(two) == 40 and batches_per_rank_epoch(one) == 80
    assert position_after_layout_change(3 * 40 + 10, 40, one) == 3 * 80 + 20


def test_resampled_mode_never_stops(indexed_dir: Path) -> None:
    stream = stream_of(indexed_dir, mode="resampled", world_size=2, num_workers=2)
    batches = list(islice(stream, 60))  # 480 images: many times the 64 of this rank's shards
    assert len(batches) == 60 and stream.epoch >= 7
    counts = Counter(i for b in batches for i in image_indices(b))
    assert max(counts.values()) > 1  # drawn with replacement


def test_read_fixed_images_takes_the_first_images_in_order(indexed_dir: Path) -> None:
    images = read_fixed_images(resolve_shard_set(str(indexed_dir)).shards, 20, 8)
    assert images.dtype == torch.float32 and 0.0 <= images.min() and images.max() <= 1.0
    assert image_indices(images) == list(range(20))
    with pytest.raises(DataError, match="fewer than the 999"):
        read_fixed_images(resolve_shard_set(str(indexed_dir)).shards[:1], 999, 8)


# --- damaged data -------------------------------------------------------------------------

def test_corrupt_sample_is_skipped_and_counted(tmp_path: Path) -> None:
    good = [(f"{i:08d}", encode_png(render_image(i, STORED_PX)), "png") for i in range(7)]
    corrupt = ("00000099", b"\xff\xd8\xff\xe0 this is not a jpeg", "jpg")
    write_shards([*good[:2], corrupt, *good[2:]], tmp_path, "mixed", samples_per_shard=16)
    stream = stream_of(tmp_path, resolution_px=TRAIN_PX, batch_per_rank=4)
    with pytest.warns(UserWarning, match="00000099"):
        batches = list(islice(stream, 3))
    assert [b.shape for b in batches] == [(4, 3, TRAIN_PX, TRAIN_PX)] * 3
    assert stream.stats()["samples_skipped"] >= 1
    assert stream.stats()["shards_damaged"] == 0


def test_truncated_tar_is_skipped_and_counted(indexed_dir: Path, tmp_path: Path) -> None:
    for shard in indexed_dir.glob("*.tar"):
        shutil.copy(shard, tmp_path / shard.name)
    damaged = tmp_path / "indexed-000003.tar"
    damaged.write_bytes(damaged.read_bytes()[:3000])  # cut inside a member's data
    # A manifest-less folder (counts read from tar headers) trains on; the cut shard is counted.
    stream = stream_of(tmp_path, mode="resampled")
    with pytest.warns(UserWarning, match="indexed-000003.tar"):
        list(islice(stream, 40))
    assert stream.stats()["shards_damaged"] >= 1


def test_shard_shorter_than_its_manifest_counts_as_damaged(indexed_dir: Path, tmp_path: Path) -> None:
    """A tar cut at a member boundary reads cleanly; only the manifest's count reveals it."""
    shutil.copytree(indexed_dir, tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] = 17  # one more than it holds
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    stream = stream_of(tmp_path / "s")
    with pytest.warns(UserWarning, match="ended after 16 of the 17"):
        list(islice(stream, 16))
    assert stream.stats()["shards_damaged"] == 1


def test_stream_of_only_corrupt_samples_raises(tmp_path: Path) -> None:
    write_shards([(f"{i:08d}", b"garbage", "png") for i in range(3)], tmp_path, "bad", samples_per_shard=8)
    stream = stream_of(tmp_path, mode="resampled", batch_per_rank=2)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="in a row failed to decode"):
        next(stream)


def test_stream_of_only_unreadable_tars_raises_instead_of_spinning(tmp_path: Path) -> None:
    for name in ("a.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"this is not a tar archive " * 100)
    stream = stream_of(tmp_path, mode="resampled")
    with pytest.warns(UserWarning, match="damaged"), pytest.raises(DataError, match="yielded no samples"):
        next(stream)


def test_pipe_urls_are_read(indexed_dir: Path) -> None:
    spec = f"pipe:cat {indexed_dir}/indexed-{{000000..000007}}.tar"
    shards = resolve_shard_set(spec, manifest=str(indexed_dir / "manifest.json")).shards
    stream = build_train_stream(shards, 8, 8, 0, 1, 0, seed=0, shuffle_buffer=8, hflip=False)
    assert sorted(i for b in islice(stream, 16) for i in image_indices(b)) == list(range(128))


# --- real ranks -----------------------------------------------------------------------------

@pytest.mark.slow
def test_two_ranks_two_workers_see_every_image_once_per_epoch(indexed_dir: Path, tmp_path: Path) -> None:
    """2 ranks (torchrun, world from the environment) x 2 DataLoader worker processes."""

    def dump(mode: str, seed: int, steps: int, out: Path) -> list[dict]:
        out.mkdir()
        proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), str(REPO / "tests/workers/stream_dump.py"),
                    str(indexed_dir), mode, "2", "8", str(steps), str(seed), str(out)], timeout_s=300)
        assert proc.returncode == 0, tail(proc)
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    ranks = dump("epoch", seed=5, steps=24, out=tmp_path / "a")  # 3 epochs of 8 batches per rank
    for epoch in range(3):
        per_rank = [[b for b in r["batches"] if b["epoch"] == epoch] for r in ranks]
        assert [len(batches) for batches in per_rank] == [8, 8]  # equal batch counts
        images = [i for batches in per_rank for b in batches for i in b["images"]]
        assert sorted(images) == list(range(128)), f"epoch {epoch}"
    epoch0 = [i for r in ranks for b in r["batches"][:8] for i in b["images"]]
    epoch1 = [i for r in ranks for b in r["batches"][8:16] for i in b["images"]]
    assert epoch0 != epoch1  # reshuffled every epoch

    again = dump("epoch", seed=5, steps=24, out=tmp_path / "b")
    assert again == ranks  # same seed, same stream
    other = dump("epoch", seed=6, steps=8, out=tmp_path / "c")
    assert [b["images"] for b in other[0]["batches"]] != [b["images"] for b in ranks[0]["batches"][:8]]

    resampled = dump("resampled", seed=5, steps=40, out=tmp_path / "d")  # 2.5x the data per rank
    assert [len(r["batches"]) for r in resampled] == [40, 40]
    # Ranks read disjoint shards in every (nominal) epoch.
    for epoch in range(5):
        rank_sets = [{i // 16 for b in r["batches"] if b["epoch"] == epoch for i in b["images"]} for r in resampled]
        assert not rank_sets[0] & rank_sets[1]
