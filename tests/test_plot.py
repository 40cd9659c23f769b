"""The Fig. 5 curves of a run: drawn from the metrics.jsonl of a real short training run and
from hand-written ones (among them a Soft-IntroVAE run's), and checked in the PNG's pixels; the
`plot` command and its bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import deepspeed_cmd, run, tail
from introvae_dist import cli
from introvae_dist.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from introvae_dist.plot import (COLOURS, DPI, FIGSIZE_IN, FIGSIZE_SOFT_IN, WARMUP_COLOUR, PlotError,
                                _configured_margin, default_smoothing_steps, is_soft_introvae, moving_average,
                                read_curves, render_curves, smooth_by_phase)

#: 12 steps of 4 images, the first 4 steps (16 images) the VAE warm-up.
TINY = ["model.resolution_px=16", "model.widths=[8,16]", "model.latent_dim=8", "train.batch_global=4",
        "train.log_every_steps=1", "loss.warmup_images=16", "loss.margin=4", "train.sample_every_steps=1000"]
STEPS, WARMUP_STEPS = 12, 4
SIZE_PX = (round(FIGSIZE_IN[0] * DPI), round(FIGSIZE_IN[1] * DPI))  # (W, H)
SOFT_SIZE_PX = (round(FIGSIZE_SOFT_IN[0] * DPI), round(FIGSIZE_SOFT_IN[1] * DPI))  # a fourth panel


@pytest.fixture(scope="module")
def trained_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real training run (deepspeed launcher, 1 rank) whose metrics.jsonl every test here reads."""
    root = tmp_path_factory.mktemp("runs")
    proc = run(deepspeed_cmd(1, "launchers/train.py", "--config", "configs/cpu_synthetic.yaml",
                             f"data.shards={tiny_shards}", f"run.root={root}", f"train.total_steps={STEPS}", *TINY))
    assert proc.returncode == 0, tail(proc)
    return root / "cpu-synthetic"


def _pixels(png: Path, size: tuple[int, int] = SIZE_PX) -> np.ndarray:
    with Image.open(png) as image:
        assert image.size == size
        return np.asarray(image.convert("RGB")).astype(np.int16)  # (H, W, 3)


def _mask(pixels: np.ndarray, colour: str, tolerance: int = 12) -> np.ndarray:
    """(H, W) bool: the pixels of ``colour`` ("#rrggbb"), within ``tolerance`` per channel (a thin
    line lies across two pixel rows, each of them a little blended with the background)."""
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return (np.abs(pixels - rgb) <= tolerance).all(axis=-1)


def _write_metrics(run_dir: Path, records: list[dict[str, object]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow
def test_a_real_runs_curves_show_every_curve_and_the_warmup(trained_run: Path) -> None:
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warmup"] * WARMUP_STEPS + ["adversarial"] * (STEPS - WARMUP_STEPS)

    out = render_curves(trained_run)

    assert out == trained_run / "curves.png"
    assert not list(trained_run.glob("*.tmp"))
    pixels = _pixels(out)
    assert pixels.std() > 20  # not blank
    width = pixels.shape[1]
    # The warm-up, steps 1-4 of 12, is shaded on the left of the axes; on the right there is
    # only the legend's swatch.
    shaded = _mask(pixels, WARMUP_COLOUR)
    left, right = shaded[:, : int(0.45 * width)].sum(), shaded[:, width // 2:].sum()
    assert left > 20_000 and right < 0.02 * left, (left, right)
    # Each kind's curve spans the axes (about 900 px per curve and panel), far more than its
    # legend sample: KL real, reconstructions, samples, L_AE, and the margin m every record holds.
    assert {r["margin"] for r in records} == {4.0}
    for kind in ("real", "rec", "fake", "l_ae", "margin"):
        assert _mask(pixels, COLOURS[kind]).sum() > 400, kind


@pytest.mark.slow
def test_records_written_before_the_margin_field_take_m_from_config_yaml(trained_run: Path, tmp_path: Path) -> None:
    """A log from before records held m: the line comes from config.yaml's loss.margin, and
    without that file there is none."""
    old = [{k: v for k, v in json.loads(line).items() if k != "margin"}
           for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert _mask(_pixels(render_curves(tmp_path)), COLOURS["margin"]).sum() == 0
    shutil.copy(trained_run / "config.yaml", tmp_path / "config.yaml")
    pixels = _pixels(render_curves(tmp_path))
    assert _mask(pixels, COLOURS["margin"]).sum() > 400
    assert _mask(pixels, COLOURS["real"]).sum() > 400


@pytest.mark.slow
def test_the_plot_command_writes_the_png_and_says_where(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures" / "fig5.png"
    proc = run([sys.executable, "-m", "introvae_dist.cli", "plot", str(trained_run), "--out", str(out),
                "--smoothing-steps", "3"])
    assert proc.returncode == EXIT_OK, tail(proc)
    assert proc.stdout.strip() == f"{out}: training curves of {trained_run}"
    assert _pixels(out).std() > 20


def test_a_margin_chosen_at_the_end_of_the_warmup_is_a_step_line(tmp_path: Path) -> None:
    """Records that carry m: 50 through the warm-up (steps 1-40), then 80, as a margin chosen
    from the warm-up's KL would be. The dashed m line steps up where the adversarial phase starts."""
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, 101):
        warmup = step <= 40
        m = 50.0 if warmup else 80.0
        records.append({"step": step, "images_seen": 16 * step, "phase": "warmup" if warmup else "adversarial",
                        "l_ae": 1000.0 / step, "kl_real": 30 + rng.normal(), "kl_rec_e": m + 5 * rng.normal(),
                        "kl_fake_e": m + 5 * rng.normal(), "kl_rec_g": m + 5 * rng.normal(),
                        "kl_fake_g": m + 5 * rng.normal(), "margin": m})
    _write_metrics(tmp_path, records)
    (tmp_path / "config.yaml").write_text("loss: {margin: 999.0}\n")  # the records' own m comes first

    pixels = _pixels(render_curves(tmp_path, smoothing_steps=5))

    red = _mask(pixels, COLOURS["margin"])
    width = pixels.shape[1]
    # the axes span about 8-98 % of the width: steps 1-40 are left of 40 %, 41-100 right of 50 %
    rows = [np.flatnonzero(red[:, columns].any(axis=1)) for columns in (slice(int(0.15 * width), int(0.4 * width)),
                                                                         slice(int(0.55 * width), int(0.9 * width)))]
    assert all(len(r) for r in rows)
    # the topmost red rows are the upper panel's m line (the legend is at the bottom): m = 80
    # is drawn higher up than m = 50, by 30 of the panel's ~96 KL units (~250 px)
    assert rows[0].min() - rows[1].min() > 40, (rows[0].min(), rows[1].min())
    # drawn above the curves that hover on it
    assert red.sum() > 1000


def _soft_records(objective: str = "soft_introvae") -> list[dict[str, object]]:
    """100 steps of a Soft-IntroVAE run's records (the fields of a real one; written by hand, as
    a real soft run is trained elsewhere in the suite), the first 40 the VAE warm-up: margin
    null throughout, rec_err falling, E's exp(-2 s ELBO) of x_r and x_p falling from 0.3 to
    1e-4 at a constant rate, a straight line on a log axis. With objective "introvae", the same
    KL values as an IntroVAE run's records instead: l_ae for rec_err, no exp-ELBO, m = 60."""
    rng = np.random.default_rng(0)
    records: list[dict[str, object]] = []
    for step in range(1, 101):
        warmup = step <= 40
        record: dict[str, object] = {
            "step": step, "images_seen": 16 * step, "epoch": 0, "phase": "warmup" if warmup else "adversarial",
            "kl_real": 40 + rng.normal(), "kl_rec_e": 45 + 3 * rng.normal(), "kl_fake_e": 50 + 3 * rng.normal(),
            "kl_rec_g": 45 + 3 * rng.normal(), "kl_fake_g": 50 + 3 * rng.normal()}
        if objective == "soft_introvae":
            exp_elbo = 0.3 * (1e-4 / 0.3) ** ((step - 1) / 99)
            record.update(rec_err=2000.0 / step, exp_elbo_rec=exp_elbo * np.exp(0.1 * rng.normal()),
                          exp_elbo_fake=0.7 * exp_elbo * np.exp(0.1 * rng.normal()), margin=None)
        else:
            record.update(l_ae=1000.0 / step, margin=60.0)
        records.append(record)
    return records


def test_a_soft_introvae_runs_curves_have_no_m_and_a_log_panel_of_es_exp_elbo(tmp_path: Path) -> None:
    """A Soft-IntroVAE run (told from its records alone: no config.yaml here) is drawn taller,
    with a fourth panel of exp_elbo_rec / exp_elbo_fake in the colours of reconstructions and
    samples, rec_err where L_AE would be, and no m line; the same KL values as IntroVAE
    records keep IntroVAE's three panels and their m."""
    _write_metrics(tmp_path / "soft", _soft_records())
    _write_metrics(tmp_path / "introvae", _soft_records("introvae"))
    assert is_soft_introvae(read_curves(tmp_path / "soft" / "metrics.jsonl"))
    assert not is_soft_introvae(read_curves(tmp_path / "introvae" / "metrics.jsonl"))

    pixels = _pixels(render_curves(tmp_path / "soft", smoothing_steps=5), SOFT_SIZE_PX)

    height, width = pixels.shape[:2]
    assert _mask(pixels, COLOURS["margin"]).sum() == 0  # Soft-IntroVAE has no m: no line, no legend entry
    assert _mask(pixels, COLOURS["l_ae"]).sum() > 400  # rec_err, in L_AE's panel and colour
    # The fourth panel spans about 75-93 % of the height, between the third and the legend:
    # exp_elbo_rec and exp_elbo_fake across it (some 900 px each).
    panel = slice(int(0.74 * height), int(0.94 * height))
    orange, green = (_mask(pixels[panel], COLOURS[kind]) for kind in ("rec", "fake"))
    assert orange.sum() > 400 and green.sum() > 400, (orange.sum(), green.sum())
    # A log axis: falling at a constant rate, exp_elbo_rec is a straight line, ~80 px lower at
    # 75 % of the width (step ~75) than at 30 % (step ~26); on a linear axis up to 0.3 both of
    # its values there (0.04 and 0.0007) would lie within ~25 px of the floor.
    early, late = (np.flatnonzero(orange[:, int(f * width)]) for f in (0.3, 0.75))
    assert len(early) and len(late)
    assert late.mean() - early.mean() > 60, (early.mean(), late.mean())

    pixels = _pixels(render_curves(tmp_path / "introvae", smoothing_steps=5))  # IntroVAE's 1000 x 900 px
    assert _mask(pixels, COLOURS["margin"]).sum() > 400


def test_a_soft_introvae_config_yaml_gives_no_margin(tmp_path: Path) -> None:
    """loss.margin null (Soft-IntroVAE's config.yaml) and "auto" (chosen during the run, which
    records without the margin field do not say) are no m line; a number is one."""
    for text, expected in (("loss: {objective: soft_introvae, margin: null}\n", None),
                           ("loss: {margin: auto, warmup_images: 64, margin_window_images: 64}\n", None),
                           ("loss: {margin: 42}\n", 42.0)):
        (tmp_path / "config.yaml").write_text(text)
        assert _configured_margin(tmp_path) == expected, text
    # a soft run's records without the margin field, beside such a config.yaml: no m either
    _write_metrics(tmp_path, [{k: v for k, v in r.items() if k != "margin"} for r in _soft_records()])
    (tmp_path / "config.yaml").write_text("loss: {objective: soft_introvae, margin: null}\n")
    assert _mask(_pixels(render_curves(tmp_path), SOFT_SIZE_PX), COLOURS["margin"]).sum() == 0


def test_smoothing_is_centred_ignores_nan_and_stops_at_the_phase_change() -> None:
    values = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 100.0, 100.0])
    assert np.allclose(moving_average(values, 3), [1.5, 1.5, 3.0, 4.5, 36.333333, 68.333333, 100.0])
    assert np.array_equal(moving_average(values, 1), values, equal_nan=True)
    warmup = np.array([True] * 5 + [False] * 2)
    assert np.allclose(smooth_by_phase(values, warmup, 3), [1.5, 1.5, 3.0, 4.5, 4.5, 100.0, 100.0])
    assert np.isnan(moving_average(np.array([np.nan, np.nan]), 2)).all()
    assert [default_smoothing_steps(n) for n in (1, 12, 700, 100_000)] == [1, 1, 14, 2000]


def test_records_are_read_in_step_order_past_a_cut_off_line(tmp_path: Path) -> None:
    text = ('{"step": 2, "kl_real": "nan", "phase": "adversarial"}\n{"step": 1, "kl_real": 3.5, "phase": "warmup"}\n'
            '{"step": 3, "kl_re')
    (tmp_path / "metrics.jsonl").write_text(text)
    curves = read_curves(tmp_path / "metrics.jsonl")
    assert curves.steps.tolist() == [1, 2] and curves.warmup.tolist() == [True, False]
    assert curves.values["kl_real"][0] == 3.5 and np.isnan(curves.values["kl_real"][1])
    assert set(curves.values) == {"kl_real"} and not curves.margin_recorded.any()


@pytest.mark.parametrize("case", ["missing", "file", "not_a_run", "empty", "no_records"])
def test_bad_input_exits_2_naming_the_path(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run"
    expected = {"missing": "no such folder", "file": "not a folder", "not_a_run": "no metrics.jsonl in it",
                "empty": "no training records", "no_records": "no training records"}[case]
    if case == "file":
        path.write_text("")
    elif case != "missing":
        path.mkdir()
    if case == "empty":
        (path / "metrics.jsonl").write_text("")
    if case == "no_records":
        (path / "metrics.jsonl").write_text('{"note": "no step"}\n[1, 2]\n')

    with pytest.raises(PlotError, match=expected):
        render_curves(path)
    assert cli.main(["plot", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("introvae-dist: error: ") and str(path) in err and expected in err
    assert len(err.splitlines()) == 1
    assert not (path / "curves.png").exists()


def test_out_that_is_a_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_metrics(tmp_path / "run", [{"step": 1, "kl_real": 1.0, "phase": "warmup"}])
    assert cli.main(["plot", str(tmp_path / "run"), "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    assert f"{tmp_path}: is a folder" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path / "run"), "--smoothing-steps", "0"]) == EXIT_BAD_INPUT
