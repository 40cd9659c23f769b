"""Config validation in process: each bad value is refused by `load_config`, naming the key."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from introvae_dist.config import Config, ConfigError, EngineConfig, ModelConfig, TrainConfig, load_config


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
    ],
)
def test_bad_numbers_are_refused_with_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("configs/cpu_synthetic.yaml", [override])
    assert message in str(err.value)
    assert str(err.value).startswith("configs/cpu_synthetic.yaml + command-line overrides: ")


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
