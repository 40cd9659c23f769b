"""Which loss.margin_factor gives Fig. 5's balance: trains one run per factor with
``loss.margin=auto`` and reports, over the adversarial phase, how KL(real), KL(x_r) and KL(x_p)
sit against the m each run chose (issue 16, item 4), and how often the health conditions of
introvae_dist/health.py held (item 5).

    python bench/margin_balance.py --factors 1.0 1.25 1.5 2.0 -- data.shards=shards/synthetic

Every run has the same seed, data and warm-up (m does not act during it), so the runs differ
only from the first adversarial step on. Arguments after ``--`` are overrides for every run
(on top of --config). Runs land in --root; an existing run folder is read, not retrained
(delete it to train again), so the table can be re-made from finished runs.

Fig. 5's balance, in numbers: KL(real) below m ("share real < m" near 1), and KL(x_r), KL(x_p)
near m both as E sees them and as G sees them (ratios to m near 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from introvae_dist.health import FAR_ABOVE_FACTOR
from introvae_dist.distributed import free_port

KL_TERMS = ("kl_rec_e", "kl_fake_e", "kl_rec_g", "kl_fake_g")


def train(config: Path, root: Path, name: str, factor: float, overrides: list[str]) -> Path:
    run_dir = root / name
    if (run_dir / "metrics.jsonl").is_file():
        return run_dir
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           "launchers/train.py", "--config", str(config), f"run.root={root}", f"run.name={name}",
           "loss.margin=auto", f"loss.margin_factor={factor}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        sys.exit(f"{name}: training failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return run_dir


def balance(run_dir: Path) -> dict[str, float]:
    """Fig. 5's balance over the adversarial steps of one run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    adv = [r for r in records if r["phase"] == "adversarial"]
    warm = [r for r in records if r["phase"] == "warmup"]
    m = adv[0]["margin"]
    late = adv[len(adv) // 2:]  # the second half: after the first adversarial transient
    out = {"m": m, "warmup_kl_real_last": statistics.mean(r["kl_real"] for r in warm[-20:]),
           "share_real_below_m": sum(r["kl_real"] < m for r in late) / len(late),
           "kl_real/m": statistics.mean(r["kl_real"] for r in late) / m}
    out.update({f"{k}/m": statistics.mean(r[k] for r in late) / m for k in KL_TERMS})
    out["share_fakes_escaped"] = sum(r["kl_fake_g"] > FAR_ABOVE_FACTOR * m and r["kl_fake_e"] >= m
                                     for r in adv) / len(adv)
    out["share_real_above_m"] = sum(r["kl_real"] > m for r in adv) / len(adv)
    out["l_ae_last"] = statistics.mean(r["l_ae"] for r in late)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/cpu_synthetic.yaml"))
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0])
    parser.add_argument("--root", type=Path, default=Path("runs/margin-balance"))
    parser.add_argument("--tag", default="demo", help="run names are TAG-fFACTOR")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    rows = {}
    for factor in args.factors:
        run_dir = train(args.config, args.root, f"{args.tag}-f{factor:g}", factor, args.overrides)
        rows[factor] = balance(run_dir)
    keys = list(next(iter(rows.values())))
    print("| factor | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for factor, row in rows.items():
        print(f"| {factor:g} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + " |")


if __name__ == "__main__":
    main()
