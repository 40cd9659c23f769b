"""Config validation in process: each bad value is refused by `load_config`, or by `plan_run`
against the world and the data, naming the key. Milliseconds each; the launcher's side of a
refusal (exit 2, the "error: ..." line) is tested once, in tests/test_train_e2e.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from introvae_dist.config import Config, ConfigError, EngineConfig, ModelConfig, TrainConfig, load_config
from introvae_dist.data.shard_set import DataError
from introvae_dist.distributed import World
from introvae_dist.run_plan import plan_run

#: A one-process world, as the launcher run with plain python sees it.
ONE_PROCESS = World(rank=0, local_rank=0, world_size=1)
#: The tiny run the end-to-end tests train (tests/test_train_e2e.py).
TINY = ["model.resolution_px=16", "model.widths=[8,16]", "model.latent_dim=8", "data.num_workers=1",
        "train.batch_global=4", "train.total_steps=2"]


def _refusal(shards: Path, root: Path, *overrides: str) -> str:
    """What the launcher would print after "error: " for this command line, found as it finds
    it (launchers/train.py: load_config, then plan_run), without starting a process."""
    with pytest.raises((ConfigError, DataError, ValueError)) as err:
        cfg = load_config("configs/cpu_synthetic.yaml", [f"data.shards={shards}", f"run.root={root}", *TINY,
                                                         *overrides])
        plan_run(cfg, ONE_PROCESS)
    assert not root.exists()  # nothing started, nothing written
    return str(err.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("encoder.lr=.nan", "encoder.lr=nan: expected a finite number"),
        ("generator.lr=.inf", "generator.lr=inf: expected a finite number"),
        ("encoder.adam_eps=-1", "encoder.adam_eps=-1.0: expected a positive value"),
        ("encoder.adam_eps=0", "encoder.adam_eps=0.0: expected a positive value"),
        ("encoder.betas=[0.9, .nan]", "encoder.betas=[0.9, nan]: expected a finite number"),
        ("loss.margin=.inf", "loss.margin=inf: expected a finite number"),
        ("loss.alpha=-.inf", "loss.alpha=-inf: expected a finite number"),
        ("loss.l_ae_factor=0", "loss.l_ae_factor=0.0: expected a positive value"),
        ("train.seed=-1", "train.seed=-1: expected an integer in [0, 2**32)"),
        ("train.seed=4294967296", "train.seed=4294967296"),
        ("train.save_every_minutes=.nan", "train.save_every_minutes=nan: expected a finite number"),
        ("run.collective_timeout_s=.inf", "run.collective_timeout_s=inf: expected a finite number"),
        ("generator.grad_clip_norm=-1", "generator.grad_clip_norm=-1.0: expected a value >= 0 (0 turns it off)"),
        ("encoder.grad_clip_norm=.nan", "encoder.grad_clip_norm=nan: expected a finite number"),
        ("encoder.grad_reduce_dtype=fp16", "encoder.grad_reduce_dtype='fp16': expected one of 'fp32', 'bf16'"),
        ("train.grid_cell_px=-1", "train.grid_cell_px=-1: expected a value >= 0 (0 keeps the images' own size)"),
        ("train.channels_last=maybe", "train.channels_last='maybe': expected bool or 'auto'"),
        # issue 16: the EMA, the automatic margin, TensorBoard
        ("ema.half_life_images=-1", "ema.half_life_images=-1.0: expected a value >= 0 (0 turns the EMA off)"),
        ("ema.rampup=.nan", "ema.rampup=nan: expected a finite number"),
        ("ema.decay=0.999", "unknown key 'ema.decay'; known keys here: half_life_images, rampup, encoder"),
        ("loss.margin=often", "loss.margin='often': expected float or 'auto'"),
        ("loss.margin_factor=-1.5", "loss.margin_factor=-1.5: expected a positive value"),
        ("loss.margin_window_images=0", "loss.margin_window_images=0: expected a positive value"),
        ("train.tensorboard=maybe", "train.tensorboard='maybe': expected bool, got str"),
        ("train.tensorbord=true", "unknown key 'train.tensorbord'"),
    ],
)
def test_bad_numbers_are_refused_with_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("configs/cpu_synthetic.yaml", [override])
    assert message in str(err.value), str(err.value)
    assert str(err.value).startswith("configs/cpu_synthetic.yaml + command-line overrides: ")


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.shards={missing}", "x-000000.tar' from brace pattern"),
        ("data.shards={empty}", "holds no *.tar files"),
        ("train.batch_gobal=4", "unknown key 'train.batch_gobal'"),
        ("model.resolution_px=32", "stored at 16 px, smaller than model.resolution_px=32"),
        ("model.resolution_px=24", "resolution_px=24"),
        ("train.batch_global=abc", "train.batch_global='abc': expected int"),
        ("data.num_workers=8", "4 shard(s) for 1 rank(s) x 8 loader worker(s) = 8 streams"),
        ("data.mode=sequential", "data.mode='sequential'"),
        ("train.step_order=fastest", "train.step_order='fastest'"),
        ("model.checkpoint_min_side_px=-1", "model.checkpoint_min_side_px=-1: expected >= 0"),
        ("run.resume={missing}", "no such file or folder"),
        ("run.resume={shards}", "not a checkpoint"),
    ],
)
def test_bad_input_is_refused_before_any_engine_starts(
    tiny_shards: Path, tmp_path: Path, override: str, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    override = override.format(missing=tmp_path / "nope" / "x-{000000..000003}.tar", empty=tmp_path / "empty",
                               shards=tiny_shards)
    extra = ["model.widths=[8,16,32]"] if override.startswith("model.resolution_px=32") else []
    assert message in _refusal(tiny_shards, tmp_path / "runs", *extra, override)


def test_fp16_in_a_config_is_refused_naming_the_key_and_the_device(tiny_shards: Path, tmp_path: Path) -> None:
    import torch

    from introvae_dist.precision import fp16_support

    refusal = _refusal(tiny_shards, tmp_path / "runs", "generator.precision=fp16")
    # Which refusal depends on this machine's CPU: oneDNN runs fp16 on AVX-512 FP16 or AMX FP16
    # (a Sapphire Rapids Xeon), not on the AMD EPYCs seen so far.
    if fp16_support(torch.device("cpu")):
        assert "generator.precision=fp16: introvae-dist does not train in fp16 on the CPU " in refusal
    else:
        assert "generator.precision=fp16: the CPU " in refusal and "cannot run fp16" in refusal


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_bf16_reduction_of_fp32_gradients_is_refused() -> None:
    with pytest.raises(ConfigError, match="encoder.grad_reduce_dtype=bf16 with encoder.precision=fp32"):
        load_config(None, ["encoder.precision=fp32", "encoder.grad_reduce_dtype=bf16"])


def test_configs_built_in_code_are_checked_too() -> None:
    cfg = Config()
    cfg.encoder.lr = float("nan")
    with pytest.raises(ConfigError, match="encoder.lr=nan"):
        cfg.validate()


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: EngineConfig(lr=0), "lr=0: expected a positive value"),
        (lambda: EngineConfig(lr=float("nan")), "lr=nan: expected a finite number"),
        (lambda: EngineConfig(precision="fp32", grad_reduce_dtype="bf16", section="generator"),
         "generator.grad_reduce_dtype=bf16 with generator.precision=fp32"),
        (lambda: Config(train=TrainConfig(batch_global=0)), "train.batch_global=0: expected a positive value"),
        (lambda: ModelConfig(resolution_px=16, widths=[8]), "model.widths=[8]: expected 2 positive widths"),
    ],
)
def test_sections_built_in_code_check_themselves(build: Callable[[], object], message: str) -> None:
    # a test or a benchmark that builds its config in code gets the checks of a YAML file
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value).startswith(message), err.value


def test_an_engine_built_in_code_names_its_keys_bare() -> None:
    # EngineConfig fills two sections: alone it does not know which, so "lr", not "encoder.lr"
    with pytest.raises(ConfigError) as err:
        EngineConfig(adam_eps=0)
    assert str(err.value) == "adam_eps=0: expected a positive value"


def test_a_replaced_section_is_checked_again() -> None:
    with pytest.raises(ConfigError, match="zero_stage=4: expected 0, 1, 2 or 3"):
        dataclasses.replace(EngineConfig(), zero_stage=4)


def test_a_binary_config_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"PK\x03\x04\xa2\x00" + bytes(range(256)))
    with pytest.raises(ConfigError, match=rf"{path}: not a text file \(expected UTF-8 YAML; byte 4 is b'\\xa2'\)"):
        load_config(path)


def test_every_preset_loads() -> None:
    for path in sorted(Path("configs").glob("*.yaml")):
        load_config(path)


# --- what reaches DeepSpeed: the step's arithmetic is set, not left to its defaults --------------


def test_deepspeed_never_clips_unless_asked() -> None:
    from introvae_dist.engine import deepspeed_config

    assert deepspeed_config(EngineConfig(precision="fp32"), 4, 2)["gradient_clipping"] == 0.0
    assert deepspeed_config(EngineConfig(precision="bf16", grad_clip_norm=1.5), 4, 2)["gradient_clipping"] == 1.5


def test_gradient_reduction_dtype_and_scaling_are_explicit() -> None:
    from introvae_dist.engine import deepspeed_config

    bf16 = deepspeed_config(EngineConfig(precision="bf16"), 4, 2)
    assert bf16["communication_data_type"] == "fp32"
    assert deepspeed_config(EngineConfig(precision="bf16", grad_reduce_dtype="bf16"), 4, 2)[
        "communication_data_type"] == "bf16"
    assert deepspeed_config(EngineConfig(precision="fp32"), 4, 2)["communication_data_type"] == "fp32"
    assert bf16["prescale_gradients"] is False and bf16["gradient_predivide_factor"] == 1.0


# --- loss.objective: each objective's own keys (issue 17) -----------------------------------------

SOFT = "loss.objective=soft_introvae"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["loss.beta_neg=256"], "loss.beta_neg=256.0 is a key of loss.objective=soft_introvae, but "
                                "loss.objective=introvae: remove loss.beta_neg or set loss.objective=soft_introvae"),
        (["loss.gamma_r=0"], "loss.gamma_r=0.0 is a key of loss.objective=soft_introvae"),
        ([SOFT, "loss.alpha=0.25"], "loss.alpha=0.25 is a key of loss.objective=introvae, but "
                                    "loss.objective=soft_introvae"),
        ([SOFT, "loss.margin=auto"], "loss.margin='auto' is a key of loss.objective=introvae"),
        ([SOFT, "loss.beta_rec=0"], "loss.beta_rec=0.0: expected a positive value"),
        ([SOFT, "loss.beta_kl=-1"], "loss.beta_kl=-1.0: expected a value >= 0"),
        ([SOFT, "loss.beta_neg=-256"], "loss.beta_neg=-256.0: expected a value >= 0"),
        ([SOFT, "loss.gamma_r=.nan"], "loss.gamma_r=nan: expected a finite number"),
        ([SOFT, "loss.beta_neg=.inf"], "loss.beta_neg=inf: expected a finite number"),
        (["loss.objective=soft"], "loss.objective='soft': expected one of 'introvae', 'soft_introvae'"),
        ([SOFT, "train.step_order=shared_encoder"], "train.step_order=shared_encoder is a fast path of "
                                                    "loss.objective=introvae"),
    ],
)
def test_a_key_of_the_other_objective_or_a_bad_weight_is_refused_by_name(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("configs/cpu_synthetic.yaml", overrides)
    assert message in str(err.value), str(err.value)


def test_a_preset_of_the_other_objective_names_its_key(tmp_path: Path) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_text("loss:\n  objective: soft_introvae\n  beta: 0.5\n")
    with pytest.raises(ConfigError, match=rf"^{path}: loss.beta=0.5 is a key of loss.objective=introvae"):
        load_config(path)


def test_each_objective_fills_only_its_own_defaults() -> None:
    intro = load_config(None).loss
    assert (intro.objective, intro.alpha, intro.margin, intro.beta_neg) == ("introvae", 0.25, 110.0, None)
    soft = load_config(None, [SOFT]).loss
    assert (soft.beta_rec, soft.beta_kl, soft.beta_neg, soft.gamma_r) == (1.0, 1.0, 256.0, 1e-8)
    assert soft.alpha is None and soft.margin is None and soft.l_ae_factor is None


def test_switching_the_objective_on_the_command_line_drops_the_presets_own_keys_with_a_note() -> None:
    notes: list[str] = []
    cfg = load_config("configs/cpu_synthetic.yaml", [SOFT, "loss.beta_neg=64"], notes)
    assert cfg.loss.objective == "soft_introvae" and cfg.loss.beta_neg == 64.0 and cfg.loss.alpha is None
    assert cfg.loss.warmup_images == 5600  # shared keys stay
    assert notes == ["loss.objective=soft_introvae on the command line: configs/cpu_synthetic.yaml's keys of "
                     "introvae (loss.alpha, loss.beta, loss.margin) are not used"]
    back = load_config("configs/celebahq_256_soft.yaml", ["loss.objective=introvae"], notes)
    assert back.loss.beta_neg is None and back.loss.alpha == 0.25


def test_the_resolved_config_reads_back_with_the_other_objectives_keys_null(tmp_path: Path) -> None:
    from introvae_dist.config import dump_config

    for overrides in ([], [SOFT]):
        cfg = load_config("configs/cpu_synthetic.yaml", overrides)
        path = tmp_path / "config.yaml"
        path.write_text(dump_config(cfg))
        assert load_config(path) == cfg
