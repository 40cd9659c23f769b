"""loss.margin: auto (introvae_dist.margin) and the training-health warnings
(introvae_dist.health): the choice at the end of the warm-up, its window, its state on resume,
and a real run that chooses m, resumes after the warm-up and keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import deepspeed_cmd, run, tail
from introvae_dist.config import ConfigError, LossConfig
from introvae_dist.health import TrainingHealth
from introvae_dist.margin import Margin


def _auto(warmup_images: int = 40, window_images: int = 16, factor: float = 1.5) -> Margin:
    cfg = LossConfig(margin="auto", warmup_images=warmup_images, margin_window_images=window_images,
                     margin_factor=factor)
    return Margin(cfg, batch_global=8)


def test_m_is_the_factor_times_the_mean_kl_of_the_warmups_last_window() -> None:
    margin = _auto()  # 5 warm-up steps of 8 images; the window is the last 2
    lines = [margin.observe(images_before, kl) for images_before, kl in zip(range(0, 40, 8), [9, 7, 5, 3, 1])]
    assert lines[:4] == [None] * 4 and margin.window_kl == [3, 1]
    assert margin.chosen == pytest.approx(1.5 * 2.0) and margin.value == margin.chosen
    assert "m = 3.000 = loss.margin_factor 1.5 x the mean KL(real) 2.000 of the warm-up's last 16 images" in lines[4]
    assert margin.observe(40, 100.0) is None and margin.chosen == pytest.approx(3.0)  # never re-chosen


def test_a_fixed_margin_is_used_from_the_start_and_never_chosen() -> None:
    margin = Margin(LossConfig(margin=110.0, warmup_images=40), batch_global=8)
    assert margin.value == 110.0 and margin.observe(32, 5.0) is None and margin.value == 110.0


def test_soft_introvae_has_no_margin_to_choose_or_require() -> None:
    margin = Margin(LossConfig(objective="soft_introvae", warmup_images=64), batch_global=16)
    assert not margin.active and margin.chosen is None and margin.value == 0.0
    assert all(margin.observe(images, 20.0) is None for images in range(0, 96, 16))
    margin.require_chosen_after_warmup(images_seen=1000)  # no m is needed: nothing raised
    assert margin.state_dict() == {"auto": False, "chosen": None, "window_kl": []}


def test_the_state_resumes_the_window_inside_the_warmup_and_keeps_m_after_it() -> None:
    first = _auto()
    for images_before, kl in zip(range(0, 32, 8), [9, 7, 5, 3]):
        first.observe(images_before, kl)
    resumed = _auto()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # through trainer_state.json
    resumed.observe(32, 1.0)
    first.observe(32, 1.0)
    assert resumed.chosen == first.chosen == pytest.approx(3.0)


def test_auto_on_a_resume_past_the_warmup_of_a_fixed_margin_run_is_refused() -> None:
    margin = _auto()
    margin.load_state_dict({"auto": False, "chosen": 110.0, "window_kl": []})
    with pytest.raises(ConfigError, match="trained with a fixed loss.margin"):
        margin.require_chosen_after_warmup(images_seen=64)
    margin.require_chosen_after_warmup(images_seen=8)  # inside the warm-up it can still measure


@pytest.mark.parametrize("override, message", [
    ({"warmup_images": 0}, "loss.margin=auto chooses m from the VAE warm-up's KL(real), but loss.warmup_images=0"),
    ({"margin_window_images": 100}, "loss.margin_window_images=100 is more than loss.warmup_images=40"),
    ({"margin_factor": -1.0}, "loss.margin_factor=-1.0: expected a positive value"),
    ({"margin_factor": float("nan")}, "loss.margin_factor=nan: expected a finite number"),
])
def test_bad_auto_margin_settings_name_the_key(override: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LossConfig(**{"margin": "auto", "warmup_images": 40, "margin_window_images": 16, **override})  # type: ignore[arg-type]


# -- health -------------------------------------------------------------------------------------

def _record(kl_real: float, kl_fake_e: float, kl_fake_g: float, phase: str = "adversarial") -> dict[str, object]:
    return {"phase": phase, "kl_real": kl_real, "kl_fake_e": kl_fake_e, "kl_fake_g": kl_fake_g}


def test_a_condition_is_reported_after_its_window_and_then_rate_limited() -> None:
    health = TrainingHealth(window_steps=3, repeat_steps=10)
    said = [health.check(step, _record(kl_real=12, kl_fake_e=5, kl_fake_g=5), margin=10) for step in range(1, 15)]
    steps = [step for step, lines in enumerate(said, start=1) if lines]
    assert steps == [3, 13]
    assert "KL(real) 12.0 has been above m = 10 for 3 steps" in said[2][0]


def test_escaped_fakes_need_es_hinge_inactive_and_any_break_restarts_the_count() -> None:
    health = TrainingHealth(window_steps=2, repeat_steps=100)
    assert health.check(1, _record(5, kl_fake_e=9, kl_fake_g=30), margin=10) == []  # E's hinge still active
    assert health.check(2, _record(5, kl_fake_e=11, kl_fake_g=30), margin=10) == []
    assert health.check(3, _record(5, kl_fake_e=11, kl_fake_g=15), margin=10) == []  # not far above: count restarts
    assert health.check(4, _record(5, kl_fake_e=11, kl_fake_g=30), margin=10) == []
    (line,) = health.check(5, _record(5, kl_fake_e=11, kl_fake_g=30), margin=10)
    assert "KL(x_p) as G sees it 30.0 has been above 2 x m = 20" in line
    assert health.check(6, _record(50, 50, 50, phase="warmup"), margin=10) == []  # the warm-up is a VAE


# -- a real run ---------------------------------------------------------------------------------

TINY = ["model.resolution_px=16", "model.widths=[8,16]", "model.latent_dim=8", "train.batch_global=4",
        "train.log_every_steps=1", "train.sample_every_steps=1000", "loss.margin=auto", "loss.warmup_images=16",
        "loss.margin_window_images=8", "loss.margin_factor=1.5", "train.save_every_steps=6"]


@pytest.mark.slow
def test_a_run_chooses_m_after_its_warmup_and_a_resume_keeps_it(tiny_shards: Path, tmp_path: Path) -> None:
    def train(steps: int):  # type: ignore[no-untyped-def]
        return run(deepspeed_cmd(1, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                                 f"data.shards={tiny_shards}", f"run.root={tmp_path}", f"train.total_steps={steps}",
                                 *TINY))
    first = train(6)
    assert first.returncode == 0, tail(first)
    assert first.stdout.count("loss.margin=auto: m = ") == 1, tail(first)
    run_dir = tmp_path / "cpu-synthetic"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    m = 1.5 * (records[2]["kl_real"] + records[3]["kl_real"]) / 2  # steps 3-4 hold the warm-up's last 8 images
    assert [r["margin"] for r in records] == [None] * 4 + [pytest.approx(m)] * 2
    state = json.loads((run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["margin"]["chosen"] == pytest.approx(m)

    second = train(9)
    assert second.returncode == 0, tail(second)
    assert "loss.margin=auto: m = " not in second.stdout  # kept, not chosen again
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["margin"] for r in records[4:]] == [pytest.approx(m)] * 5
