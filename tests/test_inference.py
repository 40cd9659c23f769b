"""``introvae-dist sample | reconstruct | interpolate | evaluate`` and training-time evaluation,
through the real command line, real shards, real launchers (torchrun, 2 ranks over gloo) and a
real checkpoint written by a 2-rank DeepSpeed training run. No mocks.

Without the standard Inception file, FID runs end to end on a file of the same network with
random weights (its BatchNorm statistics calibrated so features do not vanish): every code
path of the real one, figures that mean nothing; the FID tests proper are in test_metrics.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from conftest import deepspeed_cmd, free_port, run, tail
from introvae_dist.cli import main
from introvae_dist.config import ModelConfig
from introvae_dist.data.synthetic import render_image, write_synthetic_shards
from introvae_dist.inference import generated_batches, interpolate_latents, latents, load_models
from introvae_dist.metrics.inception import FID_INCEPTION_URL, FIDInceptionV3
from introvae_dist.models import build_networks
from introvae_dist.weights import FORMAT, META_FORMAT, META_IMAGES_SEEN, META_MODEL, META_STEP, model_to_json

MODEL = ModelConfig(resolution_px=16, latent_dim=8, widths=[8, 16], norm="batch", checkpoint_blocks=True)
PAD_PX = 2  # introvae_dist.images.save_grid's gap
CLI = [sys.executable, "-m", "introvae_dist.cli"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the same thread count in 1- and 2-rank runs: bitwise equal sums


@pytest.fixture(autouse=True)
def _restore_environment():
    """The commands, run in-process, export RANK/WORLD_SIZE/MASTER_* as a lone process does."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported weights file of a 16 px model with fixed random weights and BN statistics."""
    torch.manual_seed(0)
    encoder, generator = build_networks(MODEL)
    for net in (encoder, generator):
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    tensors = {f"{prefix}.{k}": v.clone() for prefix, net in (("encoder", encoder), ("generator", generator))
               for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    save_file(tensors, str(path), metadata={META_FORMAT: FORMAT, META_MODEL: model_to_json(MODEL), META_STEP: "7",
                                            META_IMAGES_SEEN: "28"})
    return path


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("heldout") / "synthetic"
    write_synthetic_shards(out, num_images=16, size_px=16, images_per_shard=8, seed=1)
    return out


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three real images of 24 px (centre-cropped and resized to 16 on reading)."""
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / f"face_{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        render_image(i + 5, 24).save(path)
    return paths


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FID network with random weights, BN statistics measured on noise images."""
    torch.manual_seed(0)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # running statistics = the plain average over the batches
    with torch.no_grad():
        network.train()(torch.rand(4, 3, 32, 32))
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(network.state_dict(), path)
    return path


def _tiles(png: Path, size_px: int = 16) -> np.ndarray:
    """A save_grid PNG as (rows, columns, H, W, 3) uint8 tiles."""
    grid = np.asarray(Image.open(png).convert("RGB"))
    rows, cols = (grid.shape[0] - PAD_PX) // (size_px + PAD_PX), (grid.shape[1] - PAD_PX) // (size_px + PAD_PX)
    return np.stack([np.stack([grid[PAD_PX + r * (size_px + PAD_PX):][:size_px, PAD_PX + c * (size_px + PAD_PX):][:, :size_px]
                               for c in range(cols)]) for r in range(rows)])


def _bad_input(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- seeded generation -----------------------------------------------------------------------

def test_image_i_does_not_depend_on_the_range_it_is_drawn_in(weights: Path) -> None:
    generator = load_models(weights).generator
    whole = torch.cat([images for _, images in generated_batches(generator, 0, 16, 3, 4, "cpu")])
    part = list(generated_batches(generator, 5, 11, 3, 4, "cpu"))
    assert [first for first, _ in part] == [5, 8]
    assert torch.equal(torch.cat([images for _, images in part]), whole[5:11])  # bit for bit
    assert torch.equal(latents(3, range(5, 6), 8), latents(3, range(0, 16), 8)[5:6])
    assert not torch.equal(latents(4, range(16), 8), latents(3, range(16), 8))


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_interpolation_paths_start_and_end_exactly_at_the_codes(mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    path = interpolate_latents(a, b, 7, mode)  # type: ignore[arg-type]
    assert path.shape == (7, 64) and torch.equal(path[0], a) and torch.equal(path[-1], b)
    if mode == "linear":
        torch.testing.assert_close(path[3], (a + b) / 2)
    else:  # along the great circle: the norm stays between the ends' instead of sagging
        norms = path.norm(dim=1)
        assert norms.min() >= min(a.norm(), b.norm()) * 0.99 > (a + b).norm() / 2


# --- reconstruct and interpolate -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_interpolation_endpoints_are_the_reconstructions_of_the_inputs(
    weights: Path, image_files: list[Path], tmp_path: Path, mode: str
) -> None:
    assert main(["reconstruct", str(weights), *map(str, image_files), "--out", str(tmp_path / "rec.png"),
                 "--pairs-per-row", "3"]) == 0
    assert main(["interpolate", str(weights), *map(str, image_files), "--out", str(tmp_path / "strips.png"),
                 "--steps", "5", "--mode", mode]) == 0
    rec = _tiles(tmp_path / "rec.png")[0]  # x0 r0 x1 r1 x2 r2
    strips = _tiles(tmp_path / "strips.png")  # 2 rows: real | rec | 3 inner | rec | real
    assert strips.shape[:2] == (2, 7) and rec.shape[0] == 6
    for row, (a, b) in enumerate([(0, 1), (1, 2)]):
        assert np.array_equal(strips[row, 0], rec[2 * a]) and np.array_equal(strips[row, 6], rec[2 * b])  # reals
        assert np.array_equal(strips[row, 1], rec[2 * a + 1]) and np.array_equal(strips[row, 5], rec[2 * b + 1])
        assert not np.array_equal(strips[row, 3], strips[row, 1])  # the inside moves
    # ... and those reconstructions are G(mu) of the inputs, computed here directly.
    models = load_models(weights)
    x = torch.from_numpy(rec[0::2]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        direct = models.generator(models.encoder(x)[0]).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert np.abs(direct.permute(0, 2, 3, 1).numpy().astype(int) - rec[1::2]).max() <= 1


def test_reconstruct_reads_folders_and_shards_and_stochastic_differs(
    weights: Path, image_files: list[Path], tiny_shards: Path, tmp_path: Path
) -> None:
    assert main(["reconstruct", str(weights), str(image_files[0].parent), str(tiny_shards), "-n", "5",
                 "--out", str(tmp_path / "mu.png"), "--pairs-per-row", "5"]) == 0
    tiles = _tiles(tmp_path / "mu.png")
    assert tiles.shape[:2] == (1, 10)  # 3 from the folder, then 2 from the shards
    assert main(["reconstruct", str(weights), str(tiny_shards), "-n", "4", "--stochastic", "--seed", "1",
                 "--out", str(tmp_path / "z.png")]) == 0
    assert main(["reconstruct", str(weights), str(tiny_shards), "-n", "4", "--out", str(tmp_path / "mu4.png")]) == 0
    stochastic, from_mu = _tiles(tmp_path / "z.png")[0], _tiles(tmp_path / "mu4.png")[0]
    assert np.array_equal(stochastic[0::2], from_mu[0::2]) and not np.array_equal(stochastic[1::2], from_mu[1::2])


# --- evaluate in one process -----------------------------------------------------------------

def test_evaluate_ms_ssim_and_rmse_need_no_inception_file(weights: Path, heldout: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    os.environ.pop("INTROVAE_DIST_INCEPTION", None)
    local = tmp_path / "w.safetensors"
    local.write_bytes(weights.read_bytes())
    assert main(["evaluate", str(local), "--metrics", "ms_ssim,rmse", "--heldout", str(heldout),
                 "--ms-ssim-pairs", "12", "--batch", "8"]) == 0
    assert "appended to" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert record["source"] == str(local) and record["step"] == 7 and record["ms_ssim_pairs"] == 12
    assert 0 < record["ms_ssim"] < 1 and record["ms_ssim_px"] == 16 and "fid" not in record
    assert record["recon_num_images"] == 16 and 0 < record["rmse"] < 1
    assert record["psnr_db"] == pytest.approx(-20 * np.log10(record["rmse"]), abs=3)  # per-image mean vs overall


def test_evaluate_sharpness_of_the_sample_stream_and_of_the_real_set(weights: Path, tiny_shards: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The figures are the means of the metric over the samples the other metrics draw (8-bit,
    as saved) and over the first --num-real images of --real, decoded as training decodes them."""
    from introvae_dist.data.loader import read_image_range
    from introvae_dist.data.shard_set import resolve_shard_set
    from introvae_dist.data.tar_reader import ReadStats
    from introvae_dist.images import to_uint8
    from introvae_dist.metrics.sharpness import high_frequency_share, laplacian_variance

    out = tmp_path / "eval.jsonl"
    assert main(["evaluate", str(weights), "--metrics", "sharpness", "--real", str(tiny_shards), "--num-images", "10",
                 "--num-real", "20", "--batch", "4", "--seed", "3", "--out", str(out)]) == 0
    assert "sharpness: Laplacian var" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["sharpness_num_samples"], record["sharpness_num_real"]) == (10, 20)
    assert record["sharpness_real"] == str(tiny_shards / "manifest.json") and "fid" not in record
    generator = load_models(weights).generator
    samples = torch.cat([to_uint8(x) for _, x in generated_batches(generator, 0, 10, 3, 4, "cpu")]).double() / 255
    real = torch.cat(list(read_image_range(resolve_shard_set(str(tiny_shards)).shards, 0, 20, 16, 8, ReadStats())))
    real = real.double() / 255
    for name, images in (("samples", samples), ("real", real)):
        assert record[f"laplacian_var_{name}"] == pytest.approx(laplacian_variance(images).mean().item(), rel=1e-9)
        assert record[f"hf_share_{name}"] == pytest.approx(high_frequency_share(images).mean().item(), rel=1e-9)
    assert 0 < record["hf_share_samples"] < 1 and 0 < record["hf_share_real"] < 1


# --- bad input -------------------------------------------------------------------------------

def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command, options in [("sample", ["--seed", "--grid", "--shards"]),
                             ("reconstruct", ["--stochastic", "INPUT"]),
                             ("interpolate", ["--steps", "--mode"]),
                             ("evaluate", ["--num-images", "--inception", "--metrics", "--heldout", "sharpness"])]:
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "SOURCE" in text and all(option in text for option in options), (command, text)


def test_evaluate_refuses_an_output_it_cannot_write_before_any_work(weights: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("x")
    err = _bad_input(capsys, "evaluate", weights, "--metrics", "ms_ssim", "--out", tmp_path / "a_file" / "eval.jsonl")
    assert f"{tmp_path / 'a_file' / 'eval.jsonl'}: cannot append the results there" in err


def test_missing_weights_file_is_named(tmp_path: Path, image_files: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.safetensors"
    for argv in (["sample", missing, "--grid", tmp_path / "g.png"],
                 ["reconstruct", missing, image_files[0], "--out", tmp_path / "r.png"],
                 ["interpolate", missing, *image_files[:2], "--out", tmp_path / "i.png"],
                 ["evaluate", missing, "--metrics", "ms_ssim"]):
        assert f"{missing}: no such file or folder" in _bad_input(capsys, *argv)
    (tmp_path / "run" / "checkpoints" / "step_00000002").mkdir(parents=True)  # a save that never finished
    assert "no complete checkpoint" in _bad_input(capsys, "sample", tmp_path / "run", "--grid", tmp_path / "g.png")
    assert not any(tmp_path.glob("*.png"))


def test_unreadable_or_too_small_images_are_named(weights: Path, image_files: list[Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    err = _bad_input(capsys, "reconstruct", weights, image_files[0], broken, "--out", tmp_path / "r.png")
    assert f"{broken}: cannot read the image" in err
    small = tmp_path / "small.png"
    render_image(0, 8).save(small)
    err = _bad_input(capsys, "interpolate", weights, image_files[0], small, "--out", tmp_path / "i.png")
    assert f"{small}: 8x8 px, smaller than the model's 16 px" in err
    err = _bad_input(capsys, "interpolate", weights, image_files[0], "--out", tmp_path / "i.png")
    assert "two or more images" in err
    assert not (tmp_path / "r.png").exists() and not (tmp_path / "i.png").exists()


def test_shards_of_another_resolution_than_the_checkpoint_are_named(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = tmp_path / "shards_8px"
    write_synthetic_shards(small, num_images=8, size_px=8, images_per_shard=4)
    for argv in (["evaluate", weights, "--metrics", "rmse", "--heldout", small],
                 ["evaluate", weights, "--metrics", "fid", "--real", small],
                 ["reconstruct", weights, small, "--out", tmp_path / "r.png"]):
        err = _bad_input(capsys, *argv)
        assert f"{small / 'manifest.json'}: images are stored at 8 px, but the model generates 16 px" in err, err


def test_truncated_shards_are_named(weights: Path, heldout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    damaged = shutil.copytree(heldout, tmp_path / "damaged")
    shard = sorted(damaged.glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:2048])
    err = _bad_input(capsys, "evaluate", weights, "--metrics", "rmse", "--heldout", damaged)
    assert f"{damaged / 'manifest.json'}: shards do not match the manifest: {shard}: 2048 bytes" in err, err


def test_evaluate_without_the_inception_file_fails_at_once_saying_where_to_get_it(
    weights: Path, tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.environ.pop("INTROVAE_DIST_INCEPTION", None)
    err = _bad_input(capsys, "evaluate", weights, "--real", tiny_shards)
    assert FID_INCEPTION_URL in err and "--inception PATH" in err and "--metrics ms_ssim,rmse" in err
    os.environ["INTROVAE_DIST_INCEPTION"] = str(tmp_path / "absent.pth")
    err = _bad_input(capsys, "evaluate", weights, "--real", tiny_shards)
    assert f"{tmp_path / 'absent.pth'}: no such file" in err and FID_INCEPTION_URL in err
    for argv, message in [(["--metrics", "fid,bogus", "--real", tiny_shards],
                           "metrics fid,bogus: expected some of fid,ms_ssim,rmse,sharpness"),
                          (["--metrics", "fid"], "--real SHARDS"), (["--metrics", "rmse"], "--heldout SHARDS"),
                          (["--metrics", "sharpness"], "sharpness compares samples with real images"),
                          (["--metrics", "ms_ssim", "--batch", "7"], "must be even")]:
        assert message in _bad_input(capsys, "evaluate", weights, *argv)
    assert not (weights.parent / "eval.jsonl").exists()


# --- across ranks, and from a real training run -----------------------------------------------

def _torchrun(*args: object, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "introvae_dist.cli", *map(str, args)]


@pytest.mark.slow
def test_sample_with_a_seed_is_the_same_on_one_and_two_ranks(weights: Path, tmp_path: Path) -> None:
    one = run([*CLI, "sample", str(weights), "--out", str(tmp_path / "one"), "-n", "13", "--batch", "4",
               "--seed", "5"], env=ONE_THREAD)
    assert one.returncode == 0, tail(one)
    two = run(_torchrun("sample", weights, "--out", tmp_path / "two", "-n", "13", "--batch", "4", "--seed", "5"),
              env=ONE_THREAD)
    assert two.returncode == 0, tail(two)
    assert "2 rank(s)" in two.stdout
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == [f"sample_{i:08d}.png" for i in range(13)] == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in names)
    # Shards written by two ranks hold the same images (same bytes, same checksums) as PNG files.
    # ... also under the deepspeed launcher, which puts --local_rank=N before the command.
    shards = run(deepspeed_cmd(2, "--module", "introvae_dist.cli", "sample", str(weights), "--shards",
                               str(tmp_path / "shards"), "-n", "13", "--batch", "4", "--seed", "5",
                               "--samples-per-shard", "5"), env=ONE_THREAD)
    assert shards.returncode == 0, tail(shards)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [5, 5, 3] and manifest["resolution_px"] == 16
    from introvae_dist.data.shard_set import resolve_shard_set
    from introvae_dist.data.tar_reader import ReadStats, shard_samples

    stored = [s for shard in resolve_shard_set(str(tmp_path / "shards")).shards for s in shard_samples(shard, ReadStats())]
    assert [s["__key__"] for s in stored] == [f"{i:08d}" for i in range(13)]
    assert all(np.array_equal(np.asarray(Image.open(tmp_path / "one" / names[i])),
                              np.asarray(Image.open(__import__("io").BytesIO(s["png"])))) for i, s in enumerate(stored))


TRAIN_STEPS = 4
TINY_RUN = ["model.resolution_px=16", "model.widths=[8,16]", "model.latent_dim=8", "data.num_workers=1",
            "train.batch_global=4", "loss.warmup_images=8", "loss.margin=4", f"train.total_steps={TRAIN_STEPS}",
            f"train.save_every_steps={TRAIN_STEPS}", f"train.sample_every_steps={TRAIN_STEPS}",
            "encoder.precision=fp32", "generator.precision=fp32", "encoder.zero_stage=2", "generator.zero_stage=3"]
# 10 samples in batches of 4 are 3 batches: one rank decodes 1, the other 2, so under ZeRO-3
# (a collective forward) the evaluation must pad the shorter share or hang.
EVAL = {"num_images": 10, "ms_ssim_pairs": 5, "num_real": 16, "num_heldout": 6, "batch": 4}


@pytest.fixture(scope="module")
def evaluated_run(tiny_shards: Path, heldout: Path, inception_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks (torchrun), E at ZeRO-2 and G at ZeRO-3, evaluating at steps 2 and 4."""
    root = tmp_path_factory.mktemp("eval_runs")
    evaluation = ["eval.every_steps=2", "eval.metrics=[fid,ms_ssim,rmse,sharpness]", f"eval.heldout_shards={heldout}",
                  f"eval.inception={inception_file}", f"eval.cache_dir={root / 'cache'}",
                  f"eval.num_images={EVAL['num_images']}", f"eval.ms_ssim_pairs={EVAL['ms_ssim_pairs']}",
                  f"eval.num_real={EVAL['num_real']}", f"eval.num_heldout={EVAL['num_heldout']}",
                  f"eval.batch_per_rank={EVAL['batch']}"]
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                f"data.shards={tiny_shards}", f"run.root={root / 'runs'}", *TINY_RUN, *evaluation])
    assert proc.returncode == 0, tail(proc)
    assert "step 4: eval FID" in proc.stderr + proc.stdout, tail(proc)
    (run_dir,) = (root / "runs").iterdir()
    return run_dir


def _eval_args(source: Path, tiny_shards: Path, heldout: Path, inception_file: Path, out: Path) -> list[object]:
    return ["evaluate", source, "--metrics", "fid,ms_ssim,rmse,sharpness", "--real", tiny_shards, "--heldout", heldout,
            "--inception", inception_file, "--cache", out.parent / "cache", "--out", out, "--num-images", EVAL["num_images"],
            "--ms-ssim-pairs", EVAL["ms_ssim_pairs"], "--num-real", EVAL["num_real"],
            "--num-heldout", EVAL["num_heldout"], "--batch", EVAL["batch"]]


@pytest.mark.slow
def test_training_with_eval_but_no_inception_file_stops_before_the_engines(tiny_shards: Path, tmp_path: Path) -> None:
    proc = run([sys.executable, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml", f"data.shards={tiny_shards}",
                f"run.root={tmp_path}", *TINY_RUN, "eval.every_steps=2"], env={"INTROVAE_DIST_INCEPTION": ""})
    assert proc.returncode == 2, tail(proc)
    assert "error: eval: FID needs the Inception weights" in proc.stderr and FID_INCEPTION_URL in proc.stderr
    assert not list(tmp_path.rglob("step_*"))


@pytest.mark.slow
def test_training_evaluates_every_n_steps_into_eval_jsonl(evaluated_run: Path) -> None:
    records = [json.loads(line) for line in (evaluated_run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["world_size"] == 2 for r in records)
    for record in records:
        assert np.isfinite(record["fid"]) and 0 < record["ms_ssim"] <= 1 and 0 < record["rmse"] < 1
        assert (record["fid_num_generated"], record["fid_num_real"], record["ms_ssim_pairs"],
                record["recon_num_images"]) == (10, 16, 5, 6)
    assert [r["fid_real_cached"] for r in records] == [False, True]  # the real set was read once
    assert records[0]["ms_ssim"] != records[1]["ms_ssim"]  # the networks trained in between


@pytest.mark.slow
def test_evaluate_on_the_checkpoint_gives_the_figures_training_logged(
    evaluated_run: Path, tiny_shards: Path, heldout: Path, inception_file: Path, tmp_path: Path
) -> None:
    """The training-time evaluation (2 ranks, rank 0's BatchNorm statistics) equals `evaluate`
    on that step's checkpoint, on one rank and on two."""
    logged = json.loads((evaluated_run / "eval.jsonl").read_text().splitlines()[-1])
    one = run([*CLI, *map(str, _eval_args(evaluated_run, tiny_shards, heldout, inception_file, tmp_path / "one.jsonl"))],
              env=ONE_THREAD)
    assert one.returncode == 0, tail(one)
    two = run(_torchrun(*_eval_args(evaluated_run / "checkpoints" / f"step_{TRAIN_STEPS:08d}", tiny_shards, heldout,
                                    inception_file, tmp_path / "two.jsonl")), env=ONE_THREAD)
    assert two.returncode == 0, tail(two)
    for out, world_size in (("one.jsonl", 1), ("two.jsonl", 2)):
        (record,) = [json.loads(line) for line in (tmp_path / out).read_text().splitlines()]
        assert record["world_size"] == world_size and record["step"] == TRAIN_STEPS
        assert record["source"] == str(evaluated_run / "checkpoints" / f"step_{TRAIN_STEPS:08d}")
        assert record["ms_ssim"] == pytest.approx(logged["ms_ssim"], abs=1e-9)
        assert record["rmse"] == pytest.approx(logged["rmse"], rel=1e-6)
        assert record["fid"] == pytest.approx(logged["fid"], rel=1e-6)
        for key in ("laplacian_var_samples", "hf_share_samples", "laplacian_var_real", "hf_share_real"):
            assert record[key] == pytest.approx(logged[key], rel=1e-6), key
        assert (record["sharpness_num_samples"], record["sharpness_num_real"]) == (10, 16)


@pytest.mark.slow
def test_checkpoint_run_folder_and_exported_file_give_the_same_samples(evaluated_run: Path, tmp_path: Path) -> None:
    from introvae_dist.export import export_checkpoint

    step_folder = evaluated_run / "checkpoints" / f"step_{TRAIN_STEPS:08d}"
    exported = export_checkpoint(step_folder, tmp_path / "w.safetensors")
    grids = {}
    for name, source in (("run", evaluated_run), ("step", step_folder), ("file", exported)):
        assert main(["sample", str(source), "--grid", str(tmp_path / f"{name}.png"), "-n", "6", "--seed", "2"]) == 0
        grids[name] = (tmp_path / f"{name}.png").read_bytes()
    assert grids["run"] == grids["step"] == grids["file"]


# --- sampling temperature and the weights' moving average (issue 16) -------------------------

def test_temperature_scales_the_prior_draws(weights: Path) -> None:
    """--temperature T decodes z_p ~ N(0, T^2 I): the seed's latents times T."""
    models = load_models(weights)
    (first, cooled), = generated_batches(models.generator, 0, 4, seed=3, batch=4, device="cpu", temperature=0.5)
    with torch.no_grad():
        want = models.generator(latents(3, range(4), MODEL.latent_dim) * 0.5).clamp(0, 1)
    assert first == 0 and torch.equal(cooled, want)
    (_, plain), = generated_batches(models.generator, 0, 4, seed=3, batch=4, device="cpu")
    assert not torch.equal(cooled, plain)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "warm"])
def test_a_temperature_that_is_not_positive_and_finite_is_refused(weights: Path, tmp_path: Path, value: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", str(weights), "--grid", str(tmp_path / "g.png"), "--temperature", value]) == 2
    assert f"--temperature: expected a positive finite number, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.slow
def test_commands_use_the_moving_average_unless_told_raw(evaluated_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The run trained with ema.* on (the default): sample draws with the EMA weights, and
    --raw-weights with the networks' own, the same from the checkpoint as from its export."""
    from introvae_dist.export import export_checkpoint

    step_folder = evaluated_run / "checkpoints" / f"step_{TRAIN_STEPS:08d}"
    exported = export_checkpoint(step_folder, tmp_path / "w.safetensors")
    grids = {}
    for name, source, extra in (("ema", step_folder, []), ("raw", step_folder, ["--raw-weights"]),
                                ("raw_file", exported, ["--raw-weights"]), ("ema_file", exported, [])):
        capsys.readouterr()
        assert main(["sample", str(source), "--grid", str(tmp_path / f"{name}.png"), "-n", "6", *extra]) == 0
        assert ("raw weights" if "raw" in name else "EMA weights") in capsys.readouterr().out
        grids[name] = (tmp_path / f"{name}.png").read_bytes()
    assert grids["raw"] == grids["raw_file"] and grids["ema"] == grids["ema_file"]
    assert grids["ema"] != grids["raw"]
