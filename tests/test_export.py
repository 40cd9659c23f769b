"""``introvae-dist export`` and :mod:`introvae_dist.weights`: real checkpoints written by real
2-rank DeepSpeed training (each built once per module), exported, and loaded back. No mocks.

The main check: the exported generator, loaded without DeepSpeed, draws the sample row of the
grid the trainer wrote at the checkpoint's step (same fixed z), to within PNG quantisation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import deepspeed_cmd, run, tail
from introvae_dist.cli import main
from introvae_dist.config import ModelConfig
from introvae_dist.images import cell_scale
from introvae_dist.models import build_networks
from introvae_dist.weights import (
    FORMAT, META_FORMAT, META_IMAGES_SEEN, META_MODEL, META_SHA256, META_STEP, WeightsError, load_exported,
    model_from_json, model_to_json, read_info, tensors_sha256,
)

STEPS = 4
# The tiny run of tests/test_train_e2e.py (TINY there), in fp32 so that the loaded fp32 weights
# compute what the trainer computed, and one checkpoint and one grid at step 4.
TINY = ["model.resolution_px=16", "model.widths=[8,16]", "model.latent_dim=8", "data.num_workers=1",
        "train.batch_global=4", "train.log_every_steps=2", "loss.warmup_images=8", "loss.margin=4",
        f"train.total_steps={STEPS}", f"train.save_every_steps={STEPS}", f"train.sample_every_steps={STEPS}"]
GRID_PAD_PX = 2  # introvae_dist.images.save_grid's default, which the trainer uses


def _train(shards: Path, root: Path, *extra: str) -> Path:
    """Train 2 ranks through the deepspeed launcher; the run folder."""
    proc = run(deepspeed_cmd(2, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                             f"data.shards={shards}", f"run.root={root}", *TINY, *extra))
    assert proc.returncode == 0, tail(proc)
    (run_dir,) = root.iterdir()
    return run_dir


def _step_folder(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step_{STEPS:08d}"


@pytest.fixture(scope="module")
def fp32_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32; E at ZeRO-2 (partitioned optimizer), G at ZeRO-3 (partitioned parameters)."""
    return _train(tiny_shards, tmp_path_factory.mktemp("fp32_runs"), "encoder.precision=fp32",
                  "generator.precision=fp32", "encoder.zero_stage=2", "generator.zero_stage=3")


@pytest.fixture(scope="module")
def fp32_export(fp32_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from introvae_dist.export import export_checkpoint

    out = tmp_path_factory.mktemp("export") / "weights.safetensors"
    assert export_checkpoint(_step_folder(fp32_run), out) == out
    return out


@pytest.fixture(scope="module")
def bf16_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bf16 (fp32 master weights); E at ZeRO stage 0, which DeepSpeed's zero_to_fp32 cannot read,
    G at ZeRO-1."""
    return _train(tiny_shards, tmp_path_factory.mktemp("bf16_runs"), "encoder.precision=bf16",
                  "generator.precision=bf16", "encoder.zero_stage=0", "generator.zero_stage=1")


def _grid_rows(png: Path, n: int, size_px: int, cell_px: int) -> list[np.ndarray]:
    """The rows of a sample grid (real | reconstruction | sample), each (n, H, W, 3) uint8;
    cells enlarged to ``cell_px`` (train.grid_cell_px) are read back at ``size_px``."""
    scale = cell_scale(size_px, cell_px)
    grid = np.asarray(Image.open(png).convert("RGB"))
    big = size_px * scale
    rows = []
    for r in range(3):
        top = GRID_PAD_PX + r * (big + GRID_PAD_PX)
        rows.append(np.stack([
            grid[top : top + big, GRID_PAD_PX + c * (big + GRID_PAD_PX):][:big:scale, :big:scale] for c in range(n)
        ]))
    return rows


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """As introvae_dist.images.to_uint8, laid out as save_grid writes it: (B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _saved_module(net_folder: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    """The module state dict one rank saved (ZeRO-3: partitioned parameters are empty)."""
    files = sorted((net_folder / "ds").glob("*model_states.pt"))
    return torch.load(files[rank], map_location="cpu", weights_only=False)["module"]


# --- export -> load reproduces training ------------------------------------------------------

@pytest.mark.slow
def test_loaded_weights_redraw_the_trainers_sample_grid(fp32_run: Path, fp32_export: Path) -> None:
    encoder, generator, model = load_exported(fp32_export)
    assert not encoder.training and not generator.training
    assert all(p.dtype == torch.float32 for p in [*encoder.parameters(), *generator.parameters()])
    cfg = json.loads((_step_folder(fp32_run) / "trainer_state.json").read_text())["config"]
    n = cfg["train"]["grid_images"]
    real, reconstruction, sample = _grid_rows(fp32_run / "samples" / f"step_{STEPS:08d}.png", n, model.resolution_px,
                                          cfg["train"]["grid_cell_px"])

    # Trainer._fixed_grid_inputs: the same z in every grid of the run.
    z = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(cfg["train"]["seed"]))
    x = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255  # the real row is the exact input
    with torch.no_grad():
        drawn = _to_uint8(generator(z))
        rebuilt = _to_uint8(generator(encoder(x)[0]))  # E's BatchNorm statistics matter here
    assert np.abs(drawn.astype(int) - sample).max() <= 1
    assert np.abs(rebuilt.astype(int) - reconstruction).max() <= 1
    assert drawn.std() > 0  # not a blank row that any weights would match


@pytest.mark.slow
def test_file_holds_both_state_dicts_with_batchnorm_statistics_and_the_model_config(
    fp32_run: Path, fp32_export: Path
) -> None:
    tensors = load_file(fp32_export)
    info = read_info(fp32_export)
    assert (info.step, info.images_seen) == (STEPS, STEPS * 4)
    assert info.model == ModelConfig(resolution_px=16, latent_dim=8, widths=[8, 16], norm="batch",
                                     checkpoint_blocks=True)
    encoder, generator = build_networks(info.model, "meta")
    expected = {f"encoder.{k}" for k in encoder.state_dict()} | {f"generator.{k}" for k in generator.state_dict()}
    # ema.* is on by default, for G (ema.encoder: false): its moving average follows, whole, under ema.generator.
    assert info.ema_networks == ("generator",) and info.ema["half_life_images"] > 0
    assert set(tensors) == expected | {f"ema.{k}" for k in expected if k.startswith("generator.")}
    assert {t.dtype for t in tensors.values()} == {torch.float32, torch.int64}  # int64: num_batches_tracked
    # Buffers are rank 0's, as saved (and as the grid used them); they moved during training.
    for net in ("encoder", "generator"):
        saved = _saved_module(_step_folder(fp32_run) / net)
        buffers = [k for k in saved if "running_" in k or "num_batches" in k]
        assert buffers and all(torch.equal(tensors[f"{net}.{k}"], saved[k]) for k in buffers)
        assert all(tensors[f"{net}.{k}"].item() > 0 for k in buffers if "num_batches" in k)
        assert any(not torch.equal(tensors[f"{net}.{k}"], torch.ones_like(saved[k])) for k in buffers if "var" in k)


@pytest.mark.slow
def test_the_file_carries_the_checkpoints_moving_average_and_loads_either(fp32_run: Path, fp32_export: Path) -> None:
    """The EMA tensors are the checkpoint's ema.pt with the live buffers; `weights="raw"` loads
    the networks' own weights, the default their average."""
    tensors = load_file(fp32_export)
    ema = torch.load(_step_folder(fp32_run) / "ema.pt", weights_only=True)
    assert set(ema) == {"format", "generator"}  # ema.encoder: false by default
    assert all(torch.equal(tensors[f"ema.generator.{k}"], v) for k, v in ema["generator"].items())
    buffers = [k for k in tensors if k.startswith("generator.") and ("running_" in k or "num_batches" in k)]
    assert buffers and all(torch.equal(tensors[f"ema.{k}"], tensors[k]) for k in buffers)
    enc_avg, averaged, _ = load_exported(fp32_export)
    enc_raw, raw, _ = load_exported(fp32_export, weights="raw")
    for k, v in raw.state_dict().items():
        assert torch.equal(v, tensors[f"generator.{k}"])
        assert torch.equal(averaged.state_dict()[k], tensors[f"ema.generator.{k}"])
    assert any(not torch.equal(averaged.state_dict()[k], v) for k, v in raw.state_dict().items())
    assert all(torch.equal(enc_avg.state_dict()[k], v) for k, v in enc_raw.state_dict().items())  # E: raw only


@pytest.mark.slow
def test_zero3_sharded_parameters_come_back_whole(fp32_run: Path, fp32_export: Path) -> None:
    generator_folder = _step_folder(fp32_run) / "generator"
    rank_files = sorted(p.name for p in (generator_folder / "ds").glob("*model_states.pt"))
    assert rank_files == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    saved = _saved_module(generator_folder)
    assert saved["fc.0.weight"].numel() == 0  # ZeRO-3: each rank holds only its partition
    tensors = load_file(fp32_export)
    _, generator = build_networks(read_info(fp32_export).model, "meta")
    for name, param in generator.named_parameters():
        assert tensors[f"generator.{name}"].shape == param.shape
    # The encoder ran at ZeRO-2: its rank 0 holds the whole (fp32) module, equal to the export.
    encoder_saved = _saved_module(_step_folder(fp32_run) / "encoder")
    assert all(torch.equal(tensors[f"encoder.{k}"], v) for k, v in encoder_saved.items())


@pytest.mark.slow
def test_bf16_runs_export_their_fp32_master_weights_also_at_zero_stage_0(bf16_run: Path, tmp_path: Path) -> None:
    from introvae_dist.export import export_checkpoint

    tensors = load_file(export_checkpoint(_step_folder(bf16_run), tmp_path / "bf16.safetensors"))
    for net in ("encoder", "generator"):  # ZeRO-0 (read by introvae-dist) and ZeRO-1 (by DeepSpeed)
        saved = _saved_module(_step_folder(bf16_run) / net)
        params = [k for k, v in saved.items() if v.dtype == torch.bfloat16]
        assert params, net
        for name, value in saved.items():
            exported = tensors[f"{net}.{name}"]
            assert exported.dtype == (torch.int64 if "num_batches" in name else torch.float32)
            assert torch.equal(exported.to(value.dtype), value), (net, name)  # bf16 = the masters rounded
        # fp32 masters, not the bf16 copies upcast: some hold bits bf16 has not.
        assert any(not torch.equal(tensors[f"{net}.{k}"], saved[k].float()) for k in params), net


@pytest.mark.slow
def test_exported_file_needs_only_torch_and_safetensors(fp32_export: Path) -> None:
    script = (
        "import sys\n"
        "from safetensors import safe_open\n"
        f"with safe_open({str(fp32_export)!r}, 'pt') as f:\n"
        f"    assert f.metadata()[{META_FORMAT!r}] == {FORMAT!r}, f.metadata()\n"
        "    assert len(list(f.keys())) > 0\n"
        "from introvae_dist.weights import load_exported\n"
        f"encoder, generator, model = load_exported({str(fp32_export)!r})\n"
        "import torch\n"
        "print(tuple(generator(torch.zeros(2, model.latent_dim)).shape))\n"
        "print(sorted(m for m in ('deepspeed', 'yaml', 'webdataset') if m in sys.modules))\n"
    )
    proc = run([sys.executable, "-c", script])
    assert proc.returncode == 0, tail(proc)
    assert proc.stdout.splitlines()[-2:] == ["(2, 3, 16, 16)", "[]"], tail(proc)


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["MANIFEST.json", "COMPLETE"])  # the current marker, and the older one
def test_either_marker_alone_makes_a_checkpoint_complete(fp32_run: Path, tmp_path: Path, marker: str) -> None:
    from introvae_dist.export import export_checkpoint

    folder = shutil.copytree(_step_folder(fp32_run), tmp_path / "step")
    for name in ("MANIFEST.json", "COMPLETE"):
        if name != marker:
            (folder / name).unlink(missing_ok=True)
    (folder / marker).touch()
    assert read_info(export_checkpoint(folder, tmp_path / "w.safetensors")).step == STEPS


# --- the command line ------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_exports_and_prints_the_path_and_sizes(fp32_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder" / "w.safetensors"
    proc = run([sys.executable, "-m", "introvae_dist.cli", "export", str(_step_folder(fp32_run)), "--out", str(out)])
    assert proc.returncode == 0, tail(proc)
    assert proc.stdout.splitlines() == [proc.stdout.strip()], tail(proc)  # one line, no DeepSpeed chatter
    assert proc.stdout.startswith(f"{out}: ") and "encoder 13,048 + generator 10,651 parameters" in proc.stdout
    assert "KiB" in proc.stdout and "step 4" in proc.stdout, proc.stdout
    first, first_info = load_file(out), read_info(out)
    proc = run([sys.executable, "-m", "introvae_dist.cli", "export", str(_step_folder(fp32_run)), "--out", str(out),
                "--overwrite"])
    assert proc.returncode == 0, tail(proc)
    # The same tensors and metadata (not the same bytes: safetensors orders metadata keys at random).
    again = load_file(out)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    assert read_info(out) == first_info
    assert sorted(p.name for p in out.parent.iterdir()) == ["w.safetensors"]


def _cli_error(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    capsys.readouterr()
    assert main(["export", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_bad_checkpoint_paths_exit_2_naming_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "w.safetensors"
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000002" / "encoder").mkdir(parents=True)
    for path, message in [
        (tmp_path / "nope", "no such checkpoint folder"),
        (tmp_path / "a_file", "not a checkpoint folder"),
        (tmp_path / "empty", "not a checkpoint folder"),
        (run_dir, f"e.g. {run_dir / 'checkpoints' / 'step_00000002'}"),  # a run folder: the hint names a step
    ]:
        err = _cli_error(capsys, path, "--out", out)
        assert f"{path}: " in err and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_incomplete_or_damaged_checkpoints_and_bad_outputs_exit_2_and_write_nothing(
    fp32_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _step_folder(fp32_run)
    incomplete = shutil.copytree(good, tmp_path / "incomplete")
    for marker in ("COMPLETE", "MANIFEST.json"):
        (incomplete / marker).unlink(missing_ok=True)
    one_rank_missing = shutil.copytree(good, tmp_path / "damaged")
    (one_rank_missing / "generator" / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    truncated = shutil.copytree(good, tmp_path / "truncated")
    optim = truncated / "encoder" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])
    legacy = shutil.copytree(good, tmp_path / "legacy")  # the old COMPLETE marker: no sizes to check
    (legacy / "MANIFEST.json").unlink()
    (legacy / "COMPLETE").write_text("")
    (legacy / "generator" / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (tmp_path / "existing.safetensors").write_bytes(b"keep me")
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "out" / "w.safetensors"
    for checkpoint, target, message in [
        (incomplete, out, f"{incomplete}: incomplete checkpoint"),
        # Caught by the manifest's sizes before DeepSpeed reads anything.
        (one_rank_missing, out, "damaged checkpoint: generator/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
        (truncated, out, "encoder/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt has 1000 bytes, the manifest says"),
        (legacy, out, f"{legacy / 'generator' / 'ds'}: cannot read"),
        (good, tmp_path / "existing.safetensors", "already exists; pass --overwrite"),
        (good, tmp_path, "is a folder"),
        (good, tmp_path / "a_file" / "w.safetensors", f"{tmp_path / 'a_file'}: cannot write"),
    ]:
        err = _cli_error(capsys, checkpoint, "--out", target)
        assert message in err, err
    assert (tmp_path / "existing.safetensors").read_bytes() == b"keep me"
    # Nothing was left behind, not even a temporary file.
    assert not (tmp_path / "out").exists() or sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_cli_export_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "CHECKPOINT" in help_text and "--out FILE" in help_text and "--overwrite" in help_text


# --- reading exported files: errors ----------------------------------------------------------

def _write_weights(path: Path, drop: str | None = None, **metadata: str) -> None:
    """A file in the export layout from freshly initialised networks."""
    model = ModelConfig(resolution_px=16, latent_dim=8, widths=[8, 16], norm="batch", checkpoint_blocks=True)
    encoder, generator = build_networks(model)
    tensors = {f"{prefix}.{k}": v.clone() for prefix, net in (("encoder", encoder), ("generator", generator))
               for k, v in net.state_dict().items()}
    tensors.pop(drop or "", None)
    meta = {META_FORMAT: FORMAT, META_MODEL: model_to_json(model), META_STEP: "7", META_IMAGES_SEEN: "28",
            META_SHA256: tensors_sha256(tensors), **metadata}
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if v})


def test_weights_roundtrip_without_deepspeed(tmp_path: Path) -> None:
    _write_weights(tmp_path / "w.safetensors")
    _, generator, model = load_exported(tmp_path / "w.safetensors")
    assert model.resolved_widths() == (8, 16) and read_info(tmp_path / "w.safetensors").step == 7
    reference = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(v, reference[f"generator.{k}"]) for k, v in generator.state_dict().items())


#: introvae_dist.model as every file exported so far holds it (a 16 px model).
EXPORTED_MODEL_JSON = '{"checkpoint_blocks": true, "latent_dim": 8, "norm": "batch", "resolution_px": 16, "widths": [8, 16]}'


def test_model_metadata_keeps_its_five_keys_and_bytes() -> None:
    # Files exported before the model section was a ModelConfig load, and new files hold the
    # same bytes: checkpoint_min_side_px (a training memory knob) is not recorded.
    model = ModelConfig(resolution_px=16, latent_dim=8, widths=[8, 16], checkpoint_min_side_px=8)
    assert model_to_json(model) == EXPORTED_MODEL_JSON
    assert model_from_json(EXPORTED_MODEL_JSON, "f") == ModelConfig(resolution_px=16, latent_dim=8, widths=[8, 16])
    # Table 3's widths are recorded resolved, and come back as the list
    table3 = model_from_json(model_to_json(ModelConfig(resolution_px=32)), "f")
    assert table3.widths == [512, 512, 512] and json.loads(model_to_json(table3))["widths"] == [512, 512, 512]


def test_model_metadata_that_fails_the_model_section_checks_names_the_file() -> None:
    text = EXPORTED_MODEL_JSON.replace('"widths": [8, 16]', '"widths": [8, 16, 32]')
    with pytest.raises(WeightsError, match=r"^w.safetensors: metadata introvae_dist.model is not a valid model "
                                           r"section \(model.widths=\[8, 16, 32\]: expected 2 positive widths"):
        model_from_json(text, "w.safetensors")


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"),
    ("not safetensors", "not a safetensors file"),
    ("no tag", "no introvae_dist.format in its metadata"),
    ("wrong tag", "format 'introvae-dist-weights/999'"),
    ("missing key", "Missing key(s) in state_dict: \"features.res1.norm1.running_var\""),
    ("bad model", "metadata introvae_dist.model must hold"),
])
def test_weights_errors_name_the_file(tmp_path: Path, case: str, message: str) -> None:
    path = tmp_path / "w.safetensors"
    if case == "not safetensors":
        path.write_bytes(b"\x00" * 64)
    elif case == "no tag":
        _write_weights(path, **{META_FORMAT: ""})
    elif case == "wrong tag":
        _write_weights(path, **{META_FORMAT: "introvae-dist-weights/999"})
    elif case == "missing key":
        _write_weights(path, drop="encoder.features.res1.norm1.running_var")
    elif case == "bad model":
        _write_weights(path, **{META_MODEL: '{"resolution_px": 16}'})
    with pytest.raises(WeightsError) as error:
        load_exported(path)
    assert isinstance(error.value, ValueError)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value), error.value


def _flip_bytes_inside(path: Path, tensor: str, count: int = 4) -> None:
    """Overwrite `count` bytes in the middle of `tensor`'s data with 0xff (an fp32 NaN), in
    place, leaving the safetensors header as it is."""
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + header_len])[tensor]["data_offsets"]
    at = 8 + header_len + (begin + end) // 2 // 4 * 4
    raw[at:at + count] = b"\xff" * count
    path.write_bytes(bytes(raw))


@pytest.mark.slow
def test_an_export_with_flipped_bytes_inside_a_tensor_is_refused(fp32_export: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.safetensors"
    shutil.copyfile(fp32_export, damaged)
    _flip_bytes_inside(damaged, "generator.features.to_rgb.weight")
    with pytest.raises(WeightsError, match=rf"{damaged}: its tensors do not match the checksum in its "
                                           r"metadata \(introvae_dist.tensors_sha256 [0-9a-f]{16}\.\.\., "):
        load_exported(damaged)
    assert "the file is damaged. Export it again" in str(_error_of(damaged))
    load_exported(fp32_export)  # the original still loads


def _error_of(path: Path) -> Exception:
    try:
        load_exported(path)
    except WeightsError as e:
        return e
    raise AssertionError(f"{path} loaded")


def test_an_export_without_a_checksum_loads_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    _write_weights(path, **{META_SHA256: ""})  # as written before the checksum existed
    with pytest.warns(UserWarning, match="no introvae_dist.tensors_sha256 in its metadata"):
        load_exported(path)


def test_weights_module_imports_no_training_dependencies() -> None:
    # config too: its dataclasses (the model section) are imported without YAML, which only
    # load_config and dump_config read or write
    proc = subprocess.run(
        [sys.executable, "-c", ("import sys, introvae_dist.weights, introvae_dist.config; "
                                "print(sorted(m for m in ('deepspeed', 'yaml', 'webdataset') if m in sys.modules))")],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
