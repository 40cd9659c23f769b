"""Seconds to draw RUN/curves.png (introvae_dist.plot.render_curves), which the trainer redraws
at every sample grid on rank 0: a demo-length log and a long one (issue 16, item 3).

    python bench/plot_render.py --steps 700 100000 --repeats 3

Each log is written with every field the trainer logs (KL terms near a fixed m, L_AE falling,
the first half the warm-up), then rendered --repeats times; the median and the reading time
(json.loads of the file alone) are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

from introvae_dist.plot import read_curves, render_curves


def write_log(run_dir: Path, steps: int) -> None:
    rng = random.Random(0)
    lines = []
    for step in range(1, steps + 1):
        warm = step <= steps // 2
        kl = 100 * (1 - math.exp(-step / (steps / 10))) + rng.gauss(0, 3)
        record = {"loss_e": 500.0, "loss_g": 480.0, "l_ae": 400 * math.exp(-step / steps) + 30 + rng.gauss(0, 2),
                  "kl_real": kl, "kl_rec_e": kl + 3, "kl_fake_e": kl + 1, "kl_rec_g": kl + 3, "kl_fake_g": kl + 1,
                  "data_samples_read": 16 * step, "data_samples_skipped": 0, "data_shards_read": step // 64,
                  "data_shards_damaged": 0, "step": step, "images_seen": 16 * step, "epoch": step // 128,
                  "phase": "warmup" if warm else "adversarial", "margin": None if warm else 110.0,
                  "images_per_s": 120.0, "time": 1.7e9 + step}
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[700, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for steps in args.steps:
        with tempfile.TemporaryDirectory() as folder:
            run_dir = Path(folder) / f"run-{steps}"
            run_dir.mkdir()
            write_log(run_dir, steps)
            start = time.perf_counter()
            read_curves(run_dir / "metrics.jsonl")
            read_s = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                render_curves(run_dir)
                times.append(time.perf_counter() - start)
            size_mb = (run_dir / "metrics.jsonl").stat().st_size / 1e6
            print(f"{steps} steps ({size_mb:.1f} MB log): render_curves median {statistics.median(times):.2f} s "
                  f"over {args.repeats}, of which reading {read_s:.2f} s")


if __name__ == "__main__":
    main()
