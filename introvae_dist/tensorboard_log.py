"""TensorBoard event files of a run, on rank 0: the per-step figures of metrics.jsonl, the
sample grids and the resolved config, viewed with ``tensorboard --logdir runs``.

The figures to watch are those of the paper's Fig. 5 and Theorem 1: KL of real images settling
below the margin m while the KL of reconstructions and samples hovers around it (Sec. 4.3).

Written with ``torch.utils.tensorboard``: it is part of torch, which the trainer already
depends on, and it needs only the ``tensorboard`` package, the same package a user installs to
view the files (tensorboard does not depend on torch, so installing it leaves the pinned torch
alone). No event files or protobufs are written by hand here.

metrics.jsonl stays the record of the run; these files are a view of it, and a resume keeps
them consistent with it: metrics.jsonl is cut back to the resumed step N (run_log.trim_metrics),
and the writer here hides the events of the steps after N, which are trained again.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: The event files' folder inside the run folder.
TENSORBOARD_DIR = "tensorboard"
#: Fields of a record that are not figures to plot over steps.
NOT_SCALARS = frozenset({"step", "time"})
# Seconds between writes of the queued events to disk: a run that is watched shows its newest
# steps within this long (torch's default, 120 s, makes a fresh run look stalled).
_FLUSH_SECS = 30


def scalar_tag(name: str) -> str:
    """The TensorBoard tag of a metrics.jsonl field, grouped so that the scalars page shows one
    section per kind: the losses, the six KL terms of Algorithm 1 (real; reconstructions and
    samples as E sees them in its update, ``*_e``, and as the updated E sees them in G's,
    ``*_g``), Soft-IntroVAE's exponentiated ELBO terms, the loader's counters, the speed, and
    the rest (margin, images seen, epoch). The field's own name stays in the tag, so a tag
    names its metrics.jsonl field."""
    if name.startswith("kl_"):
        return f"kl/{name}"
    if name.startswith("exp_elbo_"):
        return f"exp_elbo/{name}"
    if name.startswith("loss_") or name in ("l_ae", "rec_err"):
        return f"loss/{name}"
    if name.startswith("data_"):
        return f"data/{name}"
    if name == "images_per_s":
        return f"speed/{name}"
    return f"train/{name}"


def numeric_fields(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a record (ints and floats, not bools, not "step"/"time"), NaN and inf
    included: TensorBoard draws them, and a curve that stops silently would hide a failure."""
    return {name: float(value) for name, value in record.items()
            if name not in NOT_SCALARS and isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))}


def markdown_code_block(text: str) -> str:
    """``text`` as a fenced markdown code block, which TensorBoard's text tab shows monospaced
    with its lines kept; the fence is longer than any run of backticks inside ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text.rstrip(chr(10))}\n{fence}"


#: The longest side of a grid as TensorBoard stores it (the PNG in RUN/samples/ is full size).
MAX_IMAGE_SIDE_PX = 2048


class TensorBoardLog:
    """Event files in ``run_dir/tensorboard/``. Constructed on rank 0 only, or with
    ``enabled=False`` (then every method does nothing and no folder is made)."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool = True) -> None:
        """``start_step``: the step the run resumes from (0 for a new run). Events of later steps
        already in the folder come from steps that are trained again; SummaryWriter's
        ``purge_step`` hides every event whose step is >= it, so it is ``start_step + 1``: the
        resumed step itself stays, as it does in metrics.jsonl."""
        self.enabled = enabled
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self._writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it is used

        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_step + 1 if start_step > 0 else None,
                                     flush_secs=_FLUSH_SECS)

    def scalars(self, record: Mapping[str, Any], step: int) -> None:
        """Every number of one metrics.jsonl record as a scalar at ``step``, tagged by
        :func:`scalar_tag`."""
        if self._writer is None:
            return
        for name, value in numeric_fields(record).items():
            self._writer.add_scalar(scalar_tag(name), value, global_step=step)

    def eval_scalars(self, record: Mapping[str, Any], step: int) -> None:
        """Every number of one eval.jsonl record (FID, MS-SSIM, RMSE/PSNR and their counts) as
        ``eval/<name>`` at ``step``."""
        if self._writer is None:
            return
        for name, value in numeric_fields(record).items():
            self._writer.add_scalar(f"eval/{name}", value, global_step=step)

    def image(self, tag: str, png_path: Path, step: int, max_side_px: int = MAX_IMAGE_SIDE_PX) -> None:
        """A PNG (a sample grid) as an image at ``step``, shrunk to at most ``max_side_px`` on
        its longer side: a 1024 px run's grid is 8192 px wide, tens of MB per event otherwise;
        the full grid stays in RUN/samples/."""
        if self._writer is None:
            return
        from PIL import Image

        with Image.open(png_path) as png:
            image = png.convert("RGB")
            if max(image.size) > max_side_px:
                scale = max_side_px / max(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BOX)
            pixels = np.asarray(image)  # (H, W, 3) uint8
        self._writer.add_image(tag, pixels, global_step=step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """``text`` (the resolved config YAML) in the text tab, monospaced."""
        if self._writer is None:
            return
        self._writer.add_text(tag, markdown_code_block(text), global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
