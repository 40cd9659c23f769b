"""Which network's moving average helps reconstructions: held-out RMSE/PSNR of a run's newest
checkpoint with E and G each raw or averaged (ema.*), the four combinations side by side
(issue 16, item 1: average E too only if reconstructions through it measure better).

    python bench/ema_reconstruction.py runs/margin-balance/photos-f1.5 --heldout shards/photos/heldout

One process, the CPU; the networks are those `introvae-dist evaluate` loads (fp32, eval mode,
rank 0's BatchNorm statistics, which the averaged networks share with the raw ones).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from introvae_dist.evaluation import evaluate, plan_evaluation
from introvae_dist.inference import find_source, load_models
from introvae_dist.rank_work import Workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    source = find_source(args.run)
    plan = plan_evaluation(["rmse"], source.model.resolution_px, heldout=args.heldout, batch=args.batch,
                           num_generated=1, ms_ssim_pairs=1, ms_ssim_px=16, num_real=1, num_heldout=None, seed=0)
    workers = Workers.from_env("cpu")
    nets = {w: load_models(source, "cpu", w) for w in ("raw", "ema")}  # type: ignore[arg-type]
    print(f"# {source.describe()}; held-out {args.heldout}")
    print("| E | G | RMSE | PSNR (dB) |\n|---|---|---|---|")
    for e in ("raw", "ema"):
        for g in ("raw", "ema"):
            figures = evaluate(nets[e].encoder, nets[g].generator, plan, workers, progress=False)
            assert figures is not None
            print(f"| {e} | {g} | {figures['rmse']:.4f} | {figures['psnr_db']:.2f} |")
    workers.close()


if __name__ == "__main__":
    main()
