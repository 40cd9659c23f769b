"""The weights' moving average (introvae_dist.ema): StyleGAN2-ADA's decay and ramp-up, and the
average of partitioned weights under ZeRO 1-3 against a plain average of whole weights, at 2
real ranks (tests/workers/ema_check.py under the deepspeed launcher, gloo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import deepspeed_cmd, run, tail
from introvae_dist.ema import ema_beta


def test_the_decay_halves_a_weights_share_every_half_life() -> None:
    beta = ema_beta(batch_images=32, images_seen=10**9, half_life_images=10_000, rampup=0.05)
    assert beta ** (10_000 / 32) == pytest.approx(0.5)


def test_the_ramp_up_shortens_the_half_life_early_as_stylegan_does() -> None:
    # StyleGAN2-ADA: ema_nimg = min(ema_kimg * 1000, cur_nimg * ema_rampup); beta = 0.5 ** (batch / ema_nimg)
    assert ema_beta(16, 20_000, 10_000, 0.05) == pytest.approx(0.5 ** (16 / 1_000))
    assert ema_beta(16, 400_000, 10_000, 0.05) == pytest.approx(0.5 ** (16 / 10_000))
    assert ema_beta(16, 0, 10_000, 0.05) == 0.0  # the first step copies the weights
    assert ema_beta(16, 0, 10_000, 0.0) == pytest.approx(0.5 ** (16 / 10_000))  # no ramp-up


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("ema") / "ema.pt"
    proc = run(deepspeed_cmd(2, "tests/workers/ema_check.py", str(path)))
    assert proc.returncode == 0, tail(proc)
    return torch.load(path, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", [f"{p}_zero{s}" for p in ("fp32", "bf16") for s in (1, 2, 3)])
def test_the_average_of_each_ranks_share_is_the_average_of_the_whole_weights(report: dict[str, Any], case: str) -> None:
    """Partitions averaged apart and reassembled == whole weights averaged: the same numbers
    (bitwise: the same fp32 lerp on the same elements), whatever the stage; kept in fp32."""
    got, want = report[case]["state"], report[case]["reference"]
    for net in ("encoder", "generator"):
        assert got[net].keys() == want[net].keys()
        for k in want[net]:
            assert got[net][k].dtype == torch.float32
            assert torch.equal(got[net][k], want[net][k]), (case, net, k)


@pytest.mark.slow
@pytest.mark.parametrize("case", [f"{p}_zero{s}" for p in ("fp32", "bf16") for s in (1, 2, 3)])
def test_a_saved_average_loads_back_exactly_and_builds_the_networks_it_holds(report: dict[str, Any], case: str) -> None:
    r = report[case]
    for net in ("encoder", "generator"):
        for k, v in r["state"][net].items():
            assert torch.equal(r["reloaded"][net][k], v), (case, net, k)
    torch.testing.assert_close(r["out_ema"], r["out_ref"], rtol=0, atol=0)


@pytest.mark.slow
def test_switching_on_the_encoders_average_at_a_resume_starts_it_and_says_so(tiny_shards: Path, tmp_path: Path) -> None:
    """ema.encoder is a change a resume accepts: the generator's saved average is restored, the
    encoder's starts at the resumed weights, and the next checkpoint holds both."""
    args = ["launchers/train.py", "--config", "configs/cpu_synthetic.yaml", f"data.shards={tiny_shards}",
            f"run.root={tmp_path}", "model.resolution_px=16", "model.widths=[8,16]", "model.latent_dim=8",
            "train.batch_global=4", "train.sample_every_steps=1000", "loss.warmup_images=8", "loss.margin=4",
            "train.save_every_steps=3"]
    first = run(deepspeed_cmd(1, *args, "train.total_steps=3"))
    assert first.returncode == 0, tail(first)
    second = run(deepspeed_cmd(1, *args, "train.total_steps=6", "ema.encoder=true"))
    assert second.returncode == 0, tail(second)
    assert "holds no average of the encoder; it starts at the resumed weights" in second.stdout, tail(second)
    saved = torch.load(tmp_path / "cpu-synthetic" / "checkpoints" / "step_00000006" / "ema.pt", weights_only=True)
    assert set(saved) == {"format", "encoder", "generator"}
