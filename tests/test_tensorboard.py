"""TensorBoardLog writes real event files; they are read back with TensorBoard's own reader
(EventAccumulator, the one `tensorboard --logdir` uses), including the purge of the redone
steps after a resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from introvae_dist.tensorboard_log import TENSORBOARD_DIR, TensorBoardLog, markdown_code_block, scalar_tag

#: A metrics.jsonl record as the trainer logs it (introvae_dist.maintenance).
RECORD = {"loss_e": 12.5, "loss_g": 3.25, "l_ae": 40.0, "kl_real": 20.0, "kl_rec_e": 90.0, "kl_fake_e": 95.0,
          "kl_rec_g": 88.0, "kl_fake_g": 93.0, "data_samples_read": 64, "data_shards_damaged": 0, "step": 3,
          "images_seen": 12, "epoch": 0, "phase": "adversarial", "margin": 110.0, "images_per_s": 51.5,
          "time": 1.7e9, "finished": True}


def _read(run_dir: Path) -> EventAccumulator:
    """Everything in the run's event files: size_guidance 0 keeps every event of every kind
    (the default keeps a sample of them)."""
    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={
        "scalars": 0, "images": 0, "tensors": 0, "histograms": 0, "compressedHistograms": 0, "audio": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_scalars_are_grouped_by_kind_with_their_steps_and_values(tmp_path: Path) -> None:
    with TensorBoardLog(tmp_path, start_step=0) as log:
        log.scalars(RECORD, step=3)
        log.scalars({**RECORD, "kl_real": 18.5, "loss_e": float("nan")}, step=4)
        log.eval_scalars({"step": 4, "fid": 123.25, "ms_ssim": 0.25, "source": "x", "time": 1.0}, step=4)
    acc = _read(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert tags == {
        "loss/loss_e", "loss/loss_g", "loss/l_ae",
        "kl/kl_real", "kl/kl_rec_e", "kl/kl_fake_e", "kl/kl_rec_g", "kl/kl_fake_g",
        "data/data_samples_read", "data/data_shards_damaged",
        "train/images_seen", "train/epoch", "train/margin", "speed/images_per_s",
        "eval/fid", "eval/ms_ssim",
    }  # not step, time, the phase (a string) or a bool
    assert _scalars(acc, "kl/kl_real") == [(3, 20.0), (4, 18.5)]
    assert _scalars(acc, "train/margin") == [(3, 110.0), (4, 110.0)]
    assert _scalars(acc, "data/data_samples_read") == [(3, 64.0), (4, 64.0)]
    assert _scalars(acc, "eval/fid") == [(4, 123.25)]
    (_, nan), = _scalars(acc, "loss/loss_e")[1:]
    assert np.isnan(nan)  # kept: TensorBoard shows it, and a gap would hide the failure


def test_scalar_tags_name_their_field() -> None:
    assert scalar_tag("kl_rec_e") == "kl/kl_rec_e"
    assert scalar_tag("l_ae") == "loss/l_ae"
    assert scalar_tag("data_samples_skipped") == "data/data_samples_skipped"
    assert scalar_tag("images_per_s") == "speed/images_per_s"
    assert scalar_tag("margin") == "train/margin"


def test_an_image_keeps_its_size_and_pixels(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(34, 98, 3), dtype=np.uint8)  # (H, W, 3)
    png = tmp_path / "grid.png"
    Image.fromarray(pixels).save(png)
    with TensorBoardLog(tmp_path, start_step=0) as log:
        log.image("samples", png, step=100)
    (event,) = _read(tmp_path).Images("samples")
    assert (event.step, event.width, event.height) == (100, 98, 34)
    from io import BytesIO

    assert np.array_equal(np.asarray(Image.open(BytesIO(event.encoded_image_string))), pixels)


def test_a_grid_wider_than_the_limit_is_shrunk_for_tensorboard_only(tmp_path: Path) -> None:
    png = tmp_path / "grid.png"
    Image.new("RGB", (3000, 600), (10, 200, 30)).save(png)
    with TensorBoardLog(tmp_path, start_step=0) as log:
        log.image("samples", png, step=5, max_side_px=1500)
    (event,) = _read(tmp_path).Images("samples")
    assert (event.width, event.height) == (1500, 300)
    assert Image.open(png).size == (3000, 600)  # the grid itself is left as it is


def test_text_is_a_markdown_code_block(tmp_path: Path) -> None:
    config = "model:\n  resolution_px: 16\nloss:\n  margin: 4.0\n"
    with TensorBoardLog(tmp_path, start_step=0) as log:
        log.text("config", config)
    acc = _read(tmp_path)
    (tag,) = acc.Tags()["tensors"]  # torch names it config/text_summary
    (event,) = acc.Tensors(tag)
    text = tensor_util.make_ndarray(event.tensor_proto).item().decode()
    assert text == "```\nmodel:\n  resolution_px: 16\nloss:\n  margin: 4.0\n```"
    assert markdown_code_block("a ``` b") == "````\na ``` b\n````"  # a fence the text cannot close


def test_a_resume_hides_the_events_of_the_redone_steps(tmp_path: Path) -> None:
    """Steps 1..10 written, the run killed and resumed from the checkpoint of step 5: steps
    6..8 are trained again. TensorBoard must show 1..8 once each, as metrics.jsonl does."""
    with TensorBoardLog(tmp_path, start_step=0) as log:
        for step in range(1, 11):
            log.scalars({"kl_real": float(step)}, step)
    with TensorBoardLog(tmp_path, start_step=5) as log:
        for step in range(6, 9):
            log.scalars({"kl_real": 100.0 + step}, step)
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    assert _scalars(_read(tmp_path), "kl/kl_real") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0),
                                                       (6, 106.0), (7, 107.0), (8, 108.0)]


def test_disabled_writes_nothing(tmp_path: Path) -> None:
    png = tmp_path / "grid.png"
    Image.new("RGB", (4, 4)).save(png)
    log = TensorBoardLog(tmp_path, start_step=0, enabled=False)
    log.scalars(RECORD, 1), log.image("samples", png, 1), log.text("config", "x"), log.flush(), log.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()


@pytest.mark.parametrize("start_step", [0, 7])
def test_flush_makes_the_events_readable_while_writing(tmp_path: Path, start_step: int) -> None:
    log = TensorBoardLog(tmp_path, start_step=start_step)
    log.scalars({"l_ae": 2.5}, start_step + 1)
    log.flush()
    assert _scalars(_read(tmp_path), "loss/l_ae") == [(start_step + 1, 2.5)]
    log.close()
