"""A run's training curves drawn as the paper's Fig. 5, from RUN/metrics.jsonl into a PNG.

Fig. 5 and Sec. 4.3 show what a healthy IntroVAE run looks like: L_AE falls and levels off,
and, as Theorem 1 predicts, the KL of real images settles at a constant below the margin m
while the KL of reconstructions and of samples fluctuates around m. This module draws those
curves for one run:

- two KL panels with a shared y-axis: the six KL terms of Algorithm 1 come in two sets of
  three, the encoder's view in its own update (Eq. 11: ``kl_rec_e``, ``kl_fake_e``) and the
  updated encoder's view in the generator's update (Eq. 12: ``kl_rec_g``, ``kl_fake_g``); one
  panel each keeps three curves per panel instead of six, with KL(real) in both as the
  reference Theorem 1 compares against, and the same colour for a kind of image in both;
- the margin m as a line (a step line where the records say it changed);
- L_AE (Eq. 10) on a panel of its own, on a log scale once it spans a factor of 10: it falls
  by orders of magnitude early in training;
- the VAE warm-up (alpha = 0, Sec. 4.1 and Appendix D) shaded: there the KL of
  reconstructions and samples is only watched, not pushed towards m;
- each curve a centred moving average, with its raw values drawn faint behind.

A Soft-IntroVAE run (``loss.objective: soft_introvae``, Daniel & Tamar 2021; soft_losses.py),
told from its records (they hold ``rec_err`` and ``exp_elbo_rec``, never ``l_ae``), is drawn
the same way with what differs in its objective:

- the two KL panels without an m line: Soft-IntroVAE has no margin (its records' ``margin``
  is null throughout);
- the reconstruction panel shows ``rec_err``, rec(x, x_r) as a sum of squared errors per
  image (no 0.5 factor), in place of L_AE;
- a fourth panel, in a taller figure, with E's exponentiated ELBO of x_r and x_p
  (``exp_elbo_rec``, ``exp_elbo_fake``: exp(-2 s ELBO), in (0, 1], with ELBO written as the
  loss beta_rec rec + beta_neg KL, as soft_losses.exp_neg_elbo has it) on a log scale: E
  minimises them, so they fall by orders of magnitude once the warm-up ends; drawn in the
  colours of reconstructions and samples in the KL panels.

Drawn with matplotlib's object-oriented API on an Agg canvas, never pyplot: no global figure
state, so the trainer can call :func:`render_curves` in the middle of a run without a display
and without touching any other figure.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from introvae_dist.files import write_atomic
from introvae_dist.run_log import METRICS_NAME

#: The default PNG inside the run folder.
CURVES_NAME = "curves.png"
#: The fields drawn; a field a file lacks is left out of the figure.
KL_FIELDS = ("kl_real", "kl_rec_e", "kl_fake_e", "kl_rec_g", "kl_fake_g")
#: E's exponentiated ELBO of x_r and x_p, only in Soft-IntroVAE's records.
EXP_ELBO_FIELDS = ("exp_elbo_rec", "exp_elbo_fake")
FIELDS = (*KL_FIELDS, "l_ae", "rec_err", *EXP_ELBO_FIELDS, "margin", "images_seen")

# 10 x 9 inches at 100 dpi: a 1000 x 900 px PNG, readable at a glance and small (~100 KB).
FIGSIZE_IN = (10.0, 9.0)
#: A Soft-IntroVAE run's figure: 2.5 inches taller for its fourth panel, so that the other three
#: keep about the size they have in an IntroVAE run's (1000 x 1150 px).
FIGSIZE_SOFT_IN = (10.0, 11.5)
DPI = 100
# Colours: one per kind of image in both KL panels and the exp-ELBO panel (matplotlib's tab10);
# Soft-IntroVAE's rec_err takes L_AE's, as it takes its panel. The warm-up shading is
# a pale yellow that no curve (drawn or faint) produces, so it stays recognisable.
COLOURS = {"real": "#1f77b4", "rec": "#ff7f0e", "fake": "#2ca02c", "margin": "#d62728", "l_ae": "#9467bd"}
WARMUP_COLOUR = "#fff3b0"
# Points drawn per curve at most: about two per pixel column of the axes. Beyond that a line's
# raw values are drawn as their min/max per column (the envelope looks the same, spikes
# included) and a smoothed curve is subsampled, so 100,000 steps draw as fast as 2,000.
MAX_POINTS = 2000
# Default smoothing: a moving average over this fraction of the run's steps.
SMOOTHING_FRACTION = 1 / 50


class PlotError(ValueError):
    """The input is not a run with training records; the message names the path."""


@dataclass(frozen=True)
class Curves:
    """metrics.jsonl as columns, one entry per step (in step order)."""

    steps: np.ndarray  # (N,) int64
    warmup: np.ndarray  # (N,) bool: the record's phase is "warmup"
    #: field -> (N,) float64; NaN where a record lacks the field or holds no number. Only
    #: fields some record has.
    values: dict[str, np.ndarray]
    #: (N,) bool: the record has a "margin" field (a null one means "not chosen yet").
    margin_recorded: np.ndarray


def render_curves(run_dir: Path, out: Path | None = None, smoothing_steps: int | None = None) -> Path:
    """Draw ``run_dir/metrics.jsonl`` as Fig. 5 into ``out`` (default ``run_dir/curves.png``),
    atomically: a reader (a browser, TensorBoard, a copy) never sees half a PNG. Returns the
    path written.

    ``smoothing_steps``: the moving-average window; default about 1/50 of the run's steps (at
    least 1, no smoothing). The margin comes from the records' ``margin`` field, or for records
    without one (files written before it existed) from ``loss.margin`` in ``run_dir/config.yaml``;
    a Soft-IntroVAE run (:func:`is_soft_introvae`) has none, and gets its own panels.

    Raises PlotError (naming the path) if ``run_dir`` is not a run folder with records, or
    ``out`` is a folder; OSError if writing fails.
    """
    run_dir = Path(run_dir)
    out = run_dir / CURVES_NAME if out is None else Path(out)
    if smoothing_steps is not None and smoothing_steps < 1:
        raise PlotError(f"smoothing_steps={smoothing_steps}: expected a positive number of steps")
    if out.is_dir():
        raise PlotError(f"{out}: is a folder; expected the PNG file to write, such as {out / CURVES_NAME}")
    curves = read_curves(_metrics_path(run_dir))
    margin = _margin(curves, run_dir)
    window = smoothing_steps or default_smoothing_steps(len(curves.steps))
    figure = _draw(curves, margin, window, _run_name(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per writer: the trainer and a user's `introvae-dist plot` may write the
    # same curves.png at once (files.write_atomic).
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    write_atomic(out, lambda stream: _save_png(figure, stream), tmp=tmp)
    return out


def is_soft_introvae(curves: Curves) -> bool:
    """Whether the records are a Soft-IntroVAE run's: they hold its figures (``rec_err``,
    ``exp_elbo_*``) where IntroVAE's hold ``l_ae``. Told from the records rather than
    config.yaml, which a copied metrics.jsonl may come without."""
    return "exp_elbo_rec" in curves.values or "rec_err" in curves.values


def default_smoothing_steps(num_steps: int) -> int:
    """About 1/50 of the run's steps, at least 1 (no smoothing): 14 for the 700-step demo."""
    return max(1, round(num_steps * SMOOTHING_FRACTION))


def read_curves(path: Path) -> Curves:
    """The records of a metrics.jsonl file as columns. A line that is not a JSON object with an
    integer ``step`` is skipped (the last line of a killed run can be cut off); if a step comes
    twice, the later record wins. Non-finite numbers, which the log writes as "nan"/"inf"
    strings (JSON has none), are read back as such."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise PlotError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    by_step: dict[int, dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            by_step[step] = record
    if not by_step:
        raise PlotError(f"{path}: no training records; expected one JSON object per step with a 'step' field, "
                        "as the trainer writes")
    steps = sorted(by_step)
    records = [by_step[s] for s in steps]
    values = {name: np.array([_number(r.get(name)) for r in records], dtype=np.float64)
              for name in FIELDS if any(name in r for r in records)}
    return Curves(steps=np.array(steps, dtype=np.int64),
                  warmup=np.array([r.get("phase") == "warmup" for r in records], dtype=bool),
                  values=values, margin_recorded=np.array(["margin" in r for r in records], dtype=bool))


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points, shorter at the ends; NaN and inf values
    are left out of every window (a window of them alone gives NaN). (N,) -> (N,)."""
    if window <= 1 or len(values) == 0:
        return values.astype(np.float64, copy=True)
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    index = np.arange(len(values))
    low = np.clip(index - window // 2, 0, len(values))
    high = np.clip(index - window // 2 + window, 0, len(values))
    count = counts[high] - counts[low]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums[high] - sums[low]) / count
    mean[count == 0] = np.nan
    return mean


def smooth_by_phase(values: np.ndarray, warmup: np.ndarray, window: int) -> np.ndarray:
    """:func:`moving_average` within each run of steps of one phase, so that the jump of the
    KL terms where the adversarial phase starts is not smeared over the window."""
    out = np.empty(len(values), dtype=np.float64)
    for start, stop in _runs(warmup):
        out[start:stop] = moving_average(values[start:stop], window)
    return out


# --- reading ---------------------------------------------------------------------------------

def _metrics_path(run_dir: Path) -> Path:
    expected = f"expected a run folder holding {METRICS_NAME} (runs/NAME, as printed by the trainer)"
    if not run_dir.exists():
        raise PlotError(f"{run_dir}: no such folder; {expected}")
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: not a folder; {expected}")
    path = run_dir / METRICS_NAME
    if not path.is_file():
        raise PlotError(f"{run_dir}: no {METRICS_NAME} in it; {expected}")
    return path


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # run_log writes non-finite numbers as "nan", "inf", "-inf"
        try:
            return float(value)
        except ValueError:
            pass
    return math.nan


def _margin(curves: Curves, run_dir: Path) -> np.ndarray | None:
    """m per step, (N,): the records' own; for records without the field (a file written before
    it existed, or a run begun before and resumed after) loss.margin of config.yaml. NaN where
    a record's margin is null; None when no record has one and config.yaml says nothing, and for
    a Soft-IntroVAE run, which has no m (its records' null margin would otherwise still put
    "margin m" in the legend)."""
    if is_soft_introvae(curves):
        return None
    recorded = curves.margin_recorded
    if recorded.all():
        return curves.values["margin"]
    configured = _configured_margin(run_dir)
    if configured is None and not recorded.any():
        return None
    from_records = curves.values.get("margin", np.full(len(recorded), math.nan))
    return np.where(recorded, from_records, math.nan if configured is None else configured)


def _configured_margin(run_dir: Path) -> float | None:
    # Imported here: both import torch (the config through models, the run folder through the
    # training stack), needed only for files written before the records carried the margin.
    from introvae_dist.config import ConfigError, load_config
    from introvae_dist.run_folder import CONFIG_NAME

    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        margin = load_config(path).loss.margin
    except ConfigError:  # a config.yaml of another version: the curves are still worth drawing
        return None
    # Only a number is a line to draw: null (Soft-IntroVAE) and "auto" (chosen during the run,
    # which such old records do not say) are no m at all.
    return float(margin) if isinstance(margin, (int, float)) and not isinstance(margin, bool) else None


def _run_name(run_dir: Path) -> str:
    return run_dir.name or run_dir.resolve().name


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal values in a (N,) array."""
    if len(flags) == 0:
        return []
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    bounds = [0, *edges.tolist(), len(flags)]
    return list(zip(bounds[:-1], bounds[1:]))


# --- drawing ---------------------------------------------------------------------------------

def _draw(curves: Curves, margin: np.ndarray | None, window: int, name: str) -> Figure:
    soft = is_soft_introvae(curves)
    figure = Figure(figsize=FIGSIZE_SOFT_IN if soft else FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    ratios = [1, 1, 0.8, 0.8] if soft else [1, 1, 0.8]
    panels_axes = figure.subplots(len(ratios), 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    kl_e, kl_g, reconstruction = panels_axes[:3]
    kl_g.sharey(kl_e)
    steps = curves.steps.astype(np.float64)
    x = _decimation(len(steps))
    for axes in panels_axes:
        _shade_warmup(axes, steps, curves.warmup)
        axes.grid(True, linewidth=0.5, alpha=0.4)
    # The equations each view belongs to: IntroVAE's, or Soft-IntroVAE's L_E and L_G (soft_losses.py).
    eq_e, eq_g = ("L_E of Soft-IntroVAE", "L_G of Soft-IntroVAE") if soft else ("Eq. 11", "Eq. 12")
    panels = ((kl_e, f"KL as E sees them, in its update ({eq_e})", ("kl_real", "kl_rec_e", "kl_fake_e")),
              (kl_g, f"KL as G sees them, through the updated E ({eq_g})", ("kl_real", "kl_rec_g", "kl_fake_g")))
    for axes, title, fields in panels:
        axes.set_title(title, fontsize=10, loc="left")
        axes.set_ylabel("KL (nats per image)")
        for field in fields:
            _curve(axes, curves, field, COLOURS[field.split("_")[1]], window, x)
        if margin is not None:
            # above the curves: the KL of reconstructions and samples hovers right on it
            axes.plot(steps[x.smooth], margin[x.smooth], color=COLOURS["margin"], linestyle="--", linewidth=1.4,
                      drawstyle="steps-post", zorder=3)
    _kl_limits(kl_e, curves, margin)
    _reconstruction_panel(reconstruction, curves, window, x, soft)
    if soft:
        _exp_elbo_panel(panels_axes[3], curves, window, x)
    panels_axes[-1].set_xlabel("step")
    panels_axes[-1].set_xlim(steps[0] - 0.5, steps[-1] + 0.5)
    _images_axis(kl_e, curves)
    figure.suptitle(_title(curves, name, window))
    figure.legend(handles=_legend(curves, margin, soft), loc="outside lower center", ncols=7, fontsize=9,
                  frameon=False)
    return figure


def _reconstruction_panel(axes: Any, curves: Curves, window: int, x: _Decimation, soft: bool) -> None:
    """L_AE (Eq. 10), or for Soft-IntroVAE its reconstruction term rec(x, x_r): a sum of squared
    errors per image without L_AE's factor (loss.l_ae_factor, 0.5 by default), so the same
    reconstruction reads twice as high, and the title says which of the two it is. Log scale
    once it spans a factor of 10."""
    if soft:
        field = "rec_err"
        axes.set_title("reconstruction error rec(x, x_r) (Soft-IntroVAE: sum of squared errors per image)",
                       fontsize=10, loc="left")
        axes.set_ylabel("rec_err per image")
    else:
        field = "l_ae"
        axes.set_title("reconstruction error L_AE (Eq. 10)", fontsize=10, loc="left")
        axes.set_ylabel("L_AE per image")
    if field in curves.values:
        _curve(axes, curves, field, COLOURS["l_ae"], window, x)
        finite = curves.values[field][np.isfinite(curves.values[field])]
        if len(finite) and finite.min() > 0 and finite.max() >= 10 * finite.min():
            axes.set_yscale("log")


def _exp_elbo_panel(axes: Any, curves: Curves, window: int, x: _Decimation) -> None:
    """Soft-IntroVAE's E minimises exp(-2 s ELBO) of x_r and x_p (their batch means in E's
    update), pushing their ELBO loss up: values in (0, 1] that fall by orders of magnitude,
    hence a log scale (where any value is positive: a log axis of nothing but zeros and NaN is
    an error)."""
    axes.set_title("E's exp(-2 s ELBO) of x_r and x_p (Soft-IntroVAE)", fontsize=10, loc="left")
    axes.set_ylabel("exp(-2 s ELBO)")
    for field, kind in zip(EXP_ELBO_FIELDS, ("rec", "fake")):
        _curve(axes, curves, field, COLOURS[kind], window, x)
    values = np.concatenate([curves.values[f] for f in EXP_ELBO_FIELDS if f in curves.values] or [np.array([])])
    if (values[np.isfinite(values)] > 0).any():
        axes.set_yscale("log")


@dataclass(frozen=True)
class _Decimation:
    smooth: np.ndarray | slice  # the indices of smoothed curves drawn
    buckets: np.ndarray | None  # start index of each raw min/max bucket; None: draw every point


def _decimation(n: int) -> _Decimation:
    if n <= MAX_POINTS:
        return _Decimation(slice(None), None)
    smooth = np.unique(np.linspace(0, n - 1, MAX_POINTS).round().astype(np.int64))
    return _Decimation(smooth, np.linspace(0, n, MAX_POINTS // 2 + 1).astype(np.int64)[:-1])


def _curve(axes: Any, curves: Curves, field: str, colour: str, window: int, x: _Decimation) -> None:
    values = curves.values.get(field)
    if values is None:
        return
    steps = curves.steps.astype(np.float64)
    raw_x, raw_y = _envelope(steps, values, x.buckets)
    if window <= 1:  # not smoothed: the raw values are the curve
        axes.plot(raw_x, raw_y, color=colour, linewidth=1.6)
        return
    axes.plot(raw_x, raw_y, color=colour, alpha=0.25, linewidth=0.7)  # faint, behind their average
    smooth = smooth_by_phase(values, curves.warmup, window)
    axes.plot(steps[x.smooth], smooth[x.smooth], color=colour, linewidth=1.6)


def _envelope(steps: np.ndarray, values: np.ndarray, buckets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Every point, or per bucket its min and max (NaN-ignoring) at the bucket's middle step:
    drawn as a line, the same envelope a pixel column would show of all points."""
    if buckets is None:
        return steps, values
    with np.errstate(invalid="ignore"):
        low = np.fmin.reduceat(values, buckets)
        high = np.fmax.reduceat(values, buckets)
    middle = steps[(buckets + np.append(buckets[1:], len(steps))) // 2]
    return np.repeat(middle, 2), np.column_stack([low, high]).ravel()


def _shade_warmup(axes: Any, steps: np.ndarray, warmup: np.ndarray) -> None:
    for start, stop in _runs(warmup):
        if warmup[start]:
            axes.axvspan(steps[start] - 0.5, steps[stop - 1] + 0.5, facecolor=WARMUP_COLOUR, edgecolor="none", zorder=0)


def _kl_limits(axes: Any, curves: Curves, margin: np.ndarray | None) -> None:
    """From 0 to a little above m and above nearly all KL values: the first steps' KL can be
    orders of magnitude above m and would flatten the equilibrium Fig. 5 is about."""
    kl = np.concatenate([curves.values[f] for f in KL_FIELDS if f in curves.values] or [np.array([])])
    kl = kl[np.isfinite(kl)]
    tops = [1.05 * float(np.quantile(kl, 0.99))] if len(kl) else []
    if margin is not None and np.isfinite(margin).any():
        tops.append(1.2 * float(np.nanmax(margin)))
    if tops and max(tops) > 0:
        axes.set_ylim(0.0, max(tops))


def _images_axis(axes: Any, curves: Curves) -> None:
    """A second x-axis on top in images seen, which the warm-up (loss.warmup_images) and the
    paper's epochs are counted in."""
    images = curves.values.get("images_seen")
    if images is None or not np.isfinite(images).all():
        return
    # step 0 has seen 0 images; beyond the ends, extend the end segments' rates
    steps = np.concatenate([[0.0], curves.steps.astype(np.float64)])
    seen = np.concatenate([[0.0], images])
    if len(steps) < 2 or not (np.diff(steps) > 0).all() or not (np.diff(seen) > 0).all():
        return
    secondary = axes.secondary_xaxis("top", functions=(lambda s: _extrapolate(s, steps, seen),
                                                       lambda i: _extrapolate(i, seen, steps)))
    secondary.set_xlabel("images seen")


def _extrapolate(x: Any, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """np.interp, continued linearly beyond the ends."""
    x = np.asarray(x, dtype=np.float64)
    y = np.interp(x, xp, fp)
    slope_low, slope_high = (fp[1] - fp[0]) / (xp[1] - xp[0]), (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    y = np.where(x < xp[0], fp[0] + (x - xp[0]) * slope_low, y)
    return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * slope_high, y)


def _title(curves: Curves, name: str, window: int) -> str:
    last = int(curves.steps[-1])
    images = curves.values.get("images_seen")
    seen = f", {int(images[-1]):,} images" if images is not None and np.isfinite(images[-1]) else ""
    smoothing = f"moving average over {window} steps" if window > 1 else "not smoothed"
    return f"{name}: step {last:,}{seen} ({smoothing})"


def _legend(curves: Curves, margin: np.ndarray | None, soft: bool) -> Sequence[Any]:
    # Soft-IntroVAE's colours stand for a kind of image in the KL and the exp-ELBO panels alike,
    # so its labels name the images; its warm-up has no alpha, but drops the same terms.
    kinds = ((("real", "real x"), ("rec", "reconstructions x_r"), ("fake", "samples x_p")) if soft else
             (("real", "KL real"), ("rec", "KL reconstructions"), ("fake", "KL samples")))
    handles: list[Any] = [Line2D([], [], color=COLOURS[k], linewidth=1.6, label=label) for k, label in kinds]
    if margin is not None:
        handles.append(Line2D([], [], color=COLOURS["margin"], linestyle="--", linewidth=1.4, label="margin m"))
    reconstruction = ("rec_err", "rec_err (sum of squares)") if soft else ("l_ae", "L_AE")
    if reconstruction[0] in curves.values:
        handles.append(Line2D([], [], color=COLOURS["l_ae"], linewidth=1.6, label=reconstruction[1]))
    if curves.warmup.any():
        label = "VAE warm-up (no adversarial terms)" if soft else "VAE warm-up (alpha = 0)"
        handles.append(Patch(facecolor=WARMUP_COLOUR, label=label))
    return handles


def _save_png(figure: Figure, stream: IO[bytes]) -> None:
    figure.savefig(stream, format="png", dpi=DPI)
