"""Data-parallel scaling on one machine: per-rank images/s of 1 rank against 2 ranks, ZeRO 2.

What: the 128 preset's training step (`algorithm.train_step`, Algorithm 1; Table 3 at 128 px,
latent 256, BatchNorm, bf16, channels-last, fused Adam, no checkpointing) at 8 images per rank,
through the two DeepSpeed engines with ZeRO stage 2 over gloo, started by the real deepspeed
launcher (`python -m deepspeed.launcher.runner --num_gpus N`), one intra-op thread per rank, so
each rank has one core of its own. Two ranks add the gradient reduce-scatter and the
all-gather of updated weights of both engines every step; data loading is left out (a fixed
random batch per rank), so the figure is what distribution costs the step.

How: launches alternate 1 rank, 2 ranks, 1 rank, 2 ranks, ... (`--repeats` pairs), each a fresh
launcher. In every launch each rank times `--steps` steps after one untimed warm-up step, with a
barrier before each step so ranks start together; the launch's figure is the slowest rank's
median step time. Scaling efficiency = per-rank images/s with 2 ranks / images/s with 1 rank,
from the medians over launches.

    python bench/scaling_ranks.py
    python bench/scaling_ranks.py --repeats 1 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from introvae_dist.distributed import free_port

RESOLUTION_PX, BATCH_PER_RANK, ZERO_STAGE = 128, 8, 2


def worker(steps: int, out: Path) -> None:
    """One rank: engines as training builds them, one warm-up step, `steps` timed steps."""
    from step_throughput import SEED, WEIGHTS, Setup, build_variant, step_inputs

    from introvae_dist import collectives, engine
    from introvae_dist.distributed import world_from_env

    world = world_from_env()
    engine.init_distributed()
    torch.set_num_threads(1)
    enc, gen = build_variant(Setup(RESOLUTION_PX, BATCH_PER_RANK, ZERO_STAGE, False), "bf16",
                             channels_last=True, fused_adam=True, world_size=world.world_size)
    from introvae_dist.algorithm import train_step

    x, noise = step_inputs(RESOLUTION_PX, BATCH_PER_RANK, SEED + 1 + world.rank)
    x = x.contiguous(memory_format=torch.channels_last)
    times, shares = [], []
    for i in range(1 + steps):
        collectives.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        train_step(enc, gen, x, noise, WEIGHTS, adopt=engine.adopt_outputs)["loss_g"].item()
        wall = time.perf_counter() - start
        if i:
            times.append(wall)
            shares.append((time.process_time() - cpu_start) / wall)
    mine = {"rank": world.rank, "median_step_s": statistics.median(times), "cpu_share": statistics.median(shares),
            "threads": torch.get_num_threads()}
    gathered = collectives.gather_object(mine)
    if world.is_main:
        out.write_text(json.dumps({"world_size": world.world_size, "ranks": gathered}))


def launch(ranks: int, steps: int, out: Path) -> dict[str, object]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), __file__, "--worker", "--steps", str(steps), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per launch")
    parser.add_argument("--repeats", type=int, default=2, help="pairs of launches (1 rank, 2 ranks)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(f"/tmp/scaling_ranks_{os.getpid()}.json"),
                        help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)  # the launcher adds --local_rank=N
    if args.worker:
        worker(args.steps, args.out)
        return 0
    print(f"# python bench/scaling_ranks.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
          f"# {RESOLUTION_PX} px, {BATCH_PER_RANK} images per rank, ZeRO {ZERO_STAGE}, bf16, 1 thread per rank, "
          f"{os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}", flush=True)
    step_s: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(args.repeats):
        for ranks in (1, 2):
            result = launch(ranks, args.steps, args.out)
            slowest = max(r["median_step_s"] for r in result["ranks"])  # type: ignore[union-attr,index]
            step_s[ranks].append(slowest)
            per_rank = ", ".join(f"rank {r['rank']} {r['median_step_s']:.2f} s (cpu share {r['cpu_share']:.2f})"  # type: ignore[index]
                                 for r in result["ranks"])  # type: ignore[union-attr]
            print(f"  launch {repeat + 1}, {ranks} rank(s): {per_rank}", flush=True)
    one, two = statistics.median(step_s[1]), statistics.median(step_s[2])
    print("| ranks | s/step | images/s per rank | images/s total | per-rank efficiency |")
    print("|---|---|---|---|---|")
    print(f"| 1 | {one:.2f} | {BATCH_PER_RANK / one:.3f} | {BATCH_PER_RANK / one:.3f} | 100% |")
    print(f"| 2 | {two:.2f} | {BATCH_PER_RANK / two:.3f} | {2 * BATCH_PER_RANK / two:.3f} | {one / two:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
