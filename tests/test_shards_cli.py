"""``introvae-dist shards``: real image folders and LSUN-layout lmdbs built in tmp_path, real
tar shards read back with :mod:`tarfile`, real subprocesses killed mid-run. No mocks.

Interruptions are made deterministic with a named pipe (FIFO) among the source images:
reading it blocks until someone writes to it, so the writer stops exactly at that image
while the shards before it are finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from introvae_dist.cli import main
from introvae_dist.data.shard_writer import read_manifest
from introvae_dist.data.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


# --- helpers ---------------------------------------------------------------------------------

def encoded_image(size_px: tuple[int, int], fmt: str, seed: int) -> bytes:
    """A small random RGB image of (width, height) ``size_px`` encoded as ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size_px[1], size_px[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, size_px: tuple[int, int], seed: int) -> bytes:
    data = encoded_image(size_px, FORMATS[path.suffix[1:].lower()], seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def read_samples(out_dir: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard the manifest lists: key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for entry in read_manifest(out_dir / "manifest.json")["shards"]:
        with tarfile.open(out_dir / entry["file"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def image_entry(sample: dict[str, bytes]) -> tuple[str, bytes]:
    (ext,) = [ext for ext in sample if ext != "src.txt"]
    return ext, sample[ext]


def shard_sha256s(out_dir: Path) -> list[str]:
    return [hashlib.sha256((out_dir / e["file"]).read_bytes()).hexdigest()
            for e in read_manifest(out_dir / "manifest.json")["shards"]]


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, size, mtime_ns) of every file: proves nothing was touched."""
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def shards(*args: object) -> int:
    return main(["shards", *map(str, args), "--no-progress"])


def cli_subprocess(*args: object, new_session: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "introvae_dist.cli", "shards", *map(str, args), "--no-progress"]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=new_session)


def wait_for_done_shards(
    progress_path: Path, count: int, proc: subprocess.Popen[str], blocked_tmp: Path | None = None
) -> dict[str, dict]:
    """Poll until the progress file lists ``count`` finished shards (and ``blocked_tmp`` exists)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"writer exited early: {proc.communicate()}"
        try:
            done = json.loads(progress_path.read_text())["done"]
        except (OSError, ValueError, KeyError):
            done = {}
        if len(done) >= count and (blocked_tmp is None or blocked_tmp.exists()):
            return done
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {count} finished shards in {progress_path} within 30 s")


def folder_with_fifo(root: Path, num_images: int, fifo_index: int) -> None:
    """``00.jpg`` ... with image ``fifo_index`` replaced by a FIFO that blocks its reader."""
    for index in range(num_images):
        path = root / f"{index:02d}.jpg"
        if index == fifo_index:
            root.mkdir(parents=True, exist_ok=True)
            os.mkfifo(path)
        else:
            write_image(path, (16, 16), seed=index)


def make_lmdb(path: Path, values: dict[bytes, bytes]) -> None:
    """An lmdb environment in LSUN's layout: a folder holding data.mdb, keys -> image bytes."""
    with lmdb.open(str(path), map_size=1 << 26) as env, env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key, value)


def lsun_values(count: int) -> dict[bytes, bytes]:
    """sha1-like hex keys (as LSUN's) with webp and jpeg values of two orientations."""
    values = {}
    for index in range(count):
        key = hashlib.sha1(str(index).encode()).hexdigest().encode("ascii")
        size_px = (24, 20) if index % 2 else (20, 24)
        values[key] = encoded_image(size_px, "WEBP" if index % 3 else "JPEG", seed=index)
    return values


# --- folder ----------------------------------------------------------------------------------

@pytest.fixture
def mixed_folder(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Nested folders of jpg/JPG/png/webp images of two shapes, one corrupt file, one text file."""
    root = tmp_path / "images"
    files = {}
    names = ["a.jpg", "b/c.png", "b/d/e.webp", "b/d/F.JPG", "g.jpeg", "h/i.png", "h/j.webp"]
    for index, rel in enumerate(names):
        files[rel] = write_image(root / rel, (24, 16) if index % 2 else (16, 24), seed=index)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root, files


def test_folder_keeps_original_bytes_in_order_and_lists_the_corrupt_file(
    mixed_folder: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, files = mixed_folder
    out = tmp_path / "out"
    assert shards("folder", root, "--out", out, "--samples-per-shard", 3, "--workers", 1) == 0

    manifest = read_manifest(out / "manifest.json")
    order = sorted([*files, "b/broken.png"])  # sorted relative POSIX paths
    broken_index = order.index("b/broken.png")
    assert manifest["format"] == "introvae-dist-shards/1" and manifest["name"] == "images"
    assert manifest["source"] == {"kind": "folder", "path": os.path.abspath(root), "num_items": 8}
    assert manifest["params"]["keep_original"] is True and manifest["params"]["samples_per_shard"] == 3
    assert [e["file"] for e in manifest["shards"]] == [f"images-{i:06d}.tar" for i in range(3)]
    # Shard i holds items [3i, 3i+3) minus the unreadable one.
    assert [e["num_samples"] for e in manifest["shards"]] == [
        len([j for j in range(3 * i, min(3 * i + 3, 8)) if j != broken_index]) for i in range(3)
    ]
    assert manifest["num_samples"] == 7 and manifest["num_skipped"] == 1
    (skipped,) = manifest["skipped"]
    assert skipped["index"] == broken_index and skipped["source"] == "b/broken.png" and skipped["reason"]
    assert manifest["resolution_px"] is None  # 24x16 and 16x24 images
    for entry in manifest["shards"]:
        shard = out / entry["file"]
        assert entry["num_bytes"] == shard.stat().st_size
        assert entry["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()

    samples = read_samples(out)
    assert sorted(samples) == [f"{i:08d}" for i in range(8) if i != broken_index]
    for key, sample in samples.items():
        rel = sample["src.txt"].decode()
        assert rel == order[int(key)]
        ext, data = image_entry(sample)
        assert data == files[rel]  # byte-identical
        assert ext == {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[Image.open(io.BytesIO(data)).format]
    assert "skipped 1 unreadable" in capsys.readouterr().err
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.progress.json"))


def test_folder_resize_keeps_aspect_and_center_crop_makes_squares(
    mixed_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, _ = mixed_folder
    assert shards("folder", root, "--out", tmp_path / "resized", "--resize-px", 12, "--workers", 1) == 0
    manifest = read_manifest(tmp_path / "resized" / "manifest.json")
    assert manifest["resolution_px"] is None and manifest["params"]["format"] == "jpeg"
    assert manifest["params"]["jpeg_quality"] == 95
    for sample in read_samples(tmp_path / "resized").values():
        ext, data = image_entry(sample)
        assert ext == "jpg" and sorted(Image.open(io.BytesIO(data)).size) == [12, 18]

    assert shards("folder", root, "--out", tmp_path / "square", "--center-crop", "--resize-px", 12,
                  "--format", "png", "--workers", 1) == 0
    manifest = read_manifest(tmp_path / "square" / "manifest.json")
    assert manifest["resolution_px"] == 12 and manifest["num_samples"] == 7 and manifest["num_skipped"] == 1
    for sample in read_samples(tmp_path / "square").values():
        ext, data = image_entry(sample)
        image = Image.open(io.BytesIO(data))
        assert ext == "png" and image.size == (12, 12) and image.mode == "RGB"


# --- lmdb ------------------------------------------------------------------------------------

def test_lmdb_keep_original_is_byte_identical_and_resize_gives_squares(tmp_path: Path) -> None:
    values = lsun_values(10)
    make_lmdb(tmp_path / "bedroom_train_lmdb", values)
    out = tmp_path / "lsun"
    assert shards("lmdb", tmp_path / "bedroom_train_lmdb", "--out", out, "--samples-per-shard", 4,
                  "--workers", 1) == 0
    manifest = read_manifest(out / "manifest.json")
    assert manifest["name"] == "lsun" and manifest["source"]["kind"] == "lmdb"
    assert [e["num_samples"] for e in manifest["shards"]] == [4, 4, 2] and manifest["num_skipped"] == 0
    samples = read_samples(out)
    keys = sorted(values)  # lmdb key order
    for key, sample in samples.items():
        lmdb_key = keys[int(key)]
        assert sample["src.txt"] == lmdb_key
        ext, data = image_entry(sample)
        assert data == values[lmdb_key] and ext in ("webp", "jpg")

    out = tmp_path / "lsun_16"
    assert shards("lmdb", tmp_path / "bedroom_train_lmdb", "--out", out, "--samples-per-shard", 4,
                  "--center-crop", "--resize-px", 16, "--limit", 6, "--workers", 1) == 0
    manifest = read_manifest(out / "manifest.json")
    assert manifest["resolution_px"] == 16 and manifest["num_samples"] == 6
    assert manifest["params"]["limit"] == 6
    for sample in read_samples(out).values():
        ext, data = image_entry(sample)
        assert ext == "jpg" and Image.open(io.BytesIO(data)).size == (16, 16)


def test_output_does_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    make_lmdb(tmp_path / "db", lsun_values(12))
    common = ("--samples-per-shard", 3, "--center-crop", "--resize-px", 8)
    assert shards("lmdb", tmp_path / "db", "--out", tmp_path / "one", *common, "--workers", 1) == 0
    assert shards("lmdb", tmp_path / "db", "--out", tmp_path / "two", *common, "--workers", 2) == 0
    assert len(shard_sha256s(tmp_path / "one")) == 4
    assert shard_sha256s(tmp_path / "one") == shard_sha256s(tmp_path / "two")
    manifests = [(tmp_path / run / "manifest.json").read_text() for run in ("one", "two")]
    assert manifests[0] == manifests[1]


# --- resume ----------------------------------------------------------------------------------

def test_resume_after_kill_keeps_finished_shards_and_completes(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    folder_with_fifo(src, num_images=12, fifo_index=6)  # shard 3 of 6 blocks on its first image
    proc = cli_subprocess("folder", src, "--out", out, "--samples-per-shard", 2, "--workers", 1)
    done = wait_for_done_shards(out / "images.progress.json", 3, proc, out / "images-000003.tar.tmp")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert sorted(done) == ["0", "1", "2"]
    assert (out / "images-000003.tar.tmp").exists() and not (out / "manifest.json").exists()
    finished = {name: stat for name, stat in snapshot(out).items() if name.endswith(".tar")}
    assert sorted(finished) == [f"images-{i:06d}.tar" for i in range(3)]

    (src / "06.jpg").unlink()
    write_image(src / "06.jpg", (16, 16), seed=6)
    assert shards("folder", src, "--out", out, "--samples-per-shard", 2, "--workers", 1) == 0
    after = snapshot(out)
    for name, stat in finished.items():
        assert after[name] == stat, f"{name} was rewritten"
    assert not list(out.glob("*.tmp")) and not (out / "images.progress.json").exists()
    manifest = read_manifest(out / "manifest.json")
    assert manifest["num_samples"] == 12 and len(manifest["shards"]) == 6
    assert sorted(read_samples(out)) == [f"{i:08d}" for i in range(12)]
    # Identical to an uninterrupted run.
    assert shards("folder", src, "--out", tmp_path / "fresh", "--samples-per-shard", 2, "--workers", 1) == 0
    assert shard_sha256s(out) == shard_sha256s(tmp_path / "fresh")


def test_ctrl_c_exits_130_removes_its_tmp_files_and_keeps_finished_shards(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    folder_with_fifo(src, num_images=8, fifo_index=2)  # shard 1 of 4 blocks; the other worker goes on
    proc = cli_subprocess("folder", src, "--out", out, "--samples-per-shard", 2, "--workers", 2,
                          new_session=True)
    try:
        wait_for_done_shards(out / "images.progress.json", 3, proc)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
        _, stderr = proc.communicate(timeout=30)
    finally:
        # Whatever happened, leave no process of that session behind (e.g. a worker still
        # blocked on the FIFO); the group is empty after a clean exit.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == [f"images-{i:06d}.tar" for i in (0, 2, 3)]


def test_existing_output_of_another_job_is_refused_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    for index in range(4):
        write_image(src / f"{index}.png", (16, 16), seed=index)
    out = tmp_path / "out"
    assert shards("folder", src, "--out", out, "--samples-per-shard", 2, "--workers", 1) == 0
    before = snapshot(out)
    capsys.readouterr()

    assert shards("folder", src, "--out", out, "--samples-per-shard", 2, "--workers", 1) == 0
    assert "already complete" in capsys.readouterr().out
    assert snapshot(out) == before

    assert shards("folder", src, "--out", out, "--samples-per-shard", 2, "--resize-px", 8,
                  "--workers", 1) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "params.resize_px: null recorded, 8 now" in err
    assert "params.keep_original: true recorded, false now" in err
    assert snapshot(out) == before

    user_made = tmp_path / "user"
    user_made.mkdir()
    (user_made / "images-000000.tar").write_bytes(b"mine")
    assert shards("folder", src, "--out", user_made, "--workers", 1) == 2
    assert "images-000000.tar" in capsys.readouterr().err
    assert (user_made / "images-000000.tar").read_bytes() == b"mine" and len(list(user_made.iterdir())) == 1


# --- bad input -------------------------------------------------------------------------------

def _bad_inputs(tmp: Path) -> dict[str, tuple[list[object], str]]:
    """case -> (arguments after `shards`, text the one-line message must contain)."""
    good = tmp / "good"
    write_image(good / "0.png", (8, 8), seed=0)
    (tmp / "texts").mkdir()
    (tmp / "texts" / "a.txt").write_text("x")
    (tmp / "a_file").write_text("x")
    (tmp / "plain_dir").mkdir()
    make_lmdb(tmp / "empty_lmdb", {})
    make_lmdb(tmp / "text_lmdb", {f"{i:04d}".encode(): b"hello" for i in range(10)})
    (tmp / "garbage.mdb").write_bytes(os.urandom(8192))
    out = tmp / "out"
    return {
        "missing folder": (["folder", tmp / "nope", "--out", out], str(tmp / "nope")),
        "missing celebahq": (["celebahq", tmp / "nope", "--out", out], str(tmp / "nope")),
        "folder is a file": (["folder", tmp / "a_file", "--out", out], str(tmp / "a_file")),
        "no images": (["folder", tmp / "texts", "--out", out], "*.jpg, *.jpeg, *.png, *.webp"),
        "missing lmdb": (["lmdb", tmp / "nope", "--out", out], str(tmp / "nope")),
        "not an lmdb folder": (["lmdb", tmp / "plain_dir", "--out", out], str(tmp / "plain_dir")),
        "not an lmdb file": (["lmdb", tmp / "garbage.mdb", "--out", out], str(tmp / "garbage.mdb")),
        "empty lmdb": (["lmdb", tmp / "empty_lmdb", "--out", out], "empty"),
        "lmdb of text": (["lmdb", tmp / "text_lmdb", "--out", out], "not an image database"),
        "out is a file": (["folder", good, "--out", tmp / "a_file"], str(tmp / "a_file")),
        "zero per shard": (["folder", good, "--out", out, "--samples-per-shard", "0"], "--samples-per-shard"),
        "keep and resize": (["folder", good, "--out", out, "--keep-original", "--resize-px", "8"],
                            "--resize-px"),
        "bad name": (["folder", good, "--out", out, "--name", "a/b"], "--name"),
    }


BAD_CASES = [
    "missing folder", "missing celebahq", "folder is a file", "no images", "missing lmdb",
    "not an lmdb folder", "not an lmdb file", "empty lmdb", "lmdb of text", "out is a file",
    "zero per shard", "keep and resize", "bad name",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_with_one_line_naming_it(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, expected = _bad_inputs(tmp_path)[case]
    capsys.readouterr()
    assert shards(*args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.rglob("manifest.json"))


# --- celebahq, help, synthetic ---------------------------------------------------------------

def test_celebahq_uses_natural_order_and_warns_about_count_and_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "CelebA-HQ-img"
    for index in range(12):
        write_image(src / f"{index}.jpg", (16, 16) if index != 5 else (16, 12), seed=index)
    assert shards("celebahq", src, "--out", tmp_path / "out", "--samples-per-shard", 5, "--workers", 1) == 0
    samples = read_samples(tmp_path / "out")
    assert [samples[key]["src.txt"].decode() for key in sorted(samples)] == [f"{i}.jpg" for i in range(12)]
    manifest = read_manifest(tmp_path / "out" / "manifest.json")
    assert manifest["name"] == "celebahq" and manifest["source"]["kind"] == "celebahq"
    assert manifest["params"]["samples_per_shard"] == 5
    err = capsys.readouterr().err
    assert "holds 12 images; celebahq has 30,000" in err
    assert "12 source image(s) are not 1024x1024 (e.g. 0.jpg is 16x16" in err


@pytest.mark.parametrize(
    "argv", [[], ["shards"], ["shards", "folder"], ["shards", "lmdb"], ["shards", "celebahq"]]
)
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: introvae-dist")
    if len(argv) == 2:
        assert "--out DIR" in out and "--resize-px N" in out and "--keep-original" in out


def test_help_as_a_module() -> None:
    command = [sys.executable, "-m", "introvae_dist.cli", "shards", "lmdb", "--help"]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "LSUN" in result.stdout


def test_synthetic_manifest_has_the_same_schema(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, num_images=4, size_px=8, images_per_shard=2)
    manifest = read_manifest(tmp_path / "manifest.json")
    assert manifest["format"] == "introvae-dist-shards/1" and manifest["source"]["kind"] == "synthetic"
    assert manifest["resolution_px"] == 8 and manifest["num_skipped"] == 0 and manifest["skipped"] == []
    assert all(set(e) == {"file", "num_samples", "num_bytes", "sha256"} for e in manifest["shards"])
