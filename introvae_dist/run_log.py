"""The training log: a JSONL file of per-step figures and a progress bar, on rank 0 only; and
the cut back of the run folder's per-step logs to the step a resume starts from."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from introvae_dist.files import write_text_atomic

#: The run folder's per-step logs; both are cut back to the resumed step on a resume.
METRICS_NAME = "metrics.jsonl"
EVAL_LOG_NAME = "eval.jsonl"
STEP_LOGS = (METRICS_NAME, EVAL_LOG_NAME)


class RunLog:
    """Appends one JSON object per step to `metrics.jsonl` and drives a tqdm bar.

    The bar shows images/s and the ETA; on a non-interactive stream (a SLURM or CI log) it
    refreshes at most every 30 s so the log stays readable.
    """

    def __init__(self, path: Path, total_steps: int, start_step: int, enabled: bool, stream: IO[str] = sys.stderr):
        self.enabled = enabled
        self._file = path.open("a", buffering=1) if enabled else None
        interactive = bool(getattr(stream, "isatty", lambda: False)())
        self._bar = (
            tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=stream,
                 mininterval=0.5 if interactive else 30.0, disable=not enabled)
            if enabled else None
        )
        self._last_time = time.perf_counter()

    def step(self, record: dict[str, Any], images: int) -> float:
        """Log one step's figures; returns the images/s since the previous call."""
        now = time.perf_counter()
        images_per_s = images / max(now - self._last_time, 1e-9)
        self._last_time = now
        if not self.enabled:
            return images_per_s
        record = {**record, "images_per_s": round(images_per_s, 3), "time": time.time()}
        assert self._file is not None and self._bar is not None
        self._file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        reconstruction = {"l_ae": record["l_ae"]} if "l_ae" in record else {"rec": record["rec_err"]}  # Soft-IntroVAE
        self._bar.set_postfix(img_s=f"{images_per_s:.1f}", **{k: f"{v:.1f}" for k, v in reconstruction.items()},
                              kl=f"{record['kl_real']:.1f}", refresh=False)
        self._bar.update(1)
        return images_per_s

    def message(self, text: str) -> None:
        if self.enabled and self._bar is not None:
            self._bar.write(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def trim_metrics(run_dir: Path, step: int, name: str = METRICS_NAME) -> int:
    """Keep a per-step JSONL log (metrics.jsonl, eval.jsonl) up to ``step`` (the resumed one) so
    it has no gap and no repeated step; the records after it (from steps that are redone) move
    to NAME.discarded.jsonl. Returns how many were moved."""
    path = run_dir / name
    if not path.is_file():
        return 0
    kept, moved = [], []
    for line in path.read_text().splitlines():
        try:
            later = json.loads(line).get("step", 0) > step
        except ValueError:
            later = True  # a line cut off by the kill
        (moved if later else kept).append(line)
    if moved:
        with (run_dir / name.replace(".jsonl", ".discarded.jsonl")).open("a") as f:
            f.write("\n".join(moved) + "\n")
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return len(moved)
