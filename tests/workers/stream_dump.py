"""One rank of a real multi-process loader run: dump which images each batch held.

Started by the tests under torchrun, or as two "nodes" by the deepspeed launcher with a
hostfile, so the rank and world come from the environment exactly as in training
(introvae_dist.distributed.world_from_env). With more than one rank it joins the process
group and records every rank's (rank, node) as the group sees them: proof of one world.

    torchrun --nproc_per_node 2 tests/workers/stream_dump.py SHARDS MODE WORKERS BATCH STEPS SEED OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

# conftest is a test helper module, not a package: beside tests/, one level up from this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import image_indices  # noqa: E402

from introvae_dist.data.loader import build_train_stream  # noqa: E402
from introvae_dist.data.shard_set import resolve_shard_set  # noqa: E402
from introvae_dist.distributed import world_from_env  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # set by deepspeed
    shards, mode, workers, batch, steps, seed, out_dir = args[:7]
    torch.set_num_threads(1)  # two ranks on two cores
    world = world_from_env()
    members: list[object] = [[world.rank, os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK", "?"))]]
    if world.world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        members = [None] * world.world_size
        dist.all_gather_object(members, [world.rank, os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK", "?"))])
    shard_set = resolve_shard_set(shards)
    stream = build_train_stream(shard_set.shards, 8, int(batch), world.rank, world.world_size,
                                int(workers), int(seed), mode=mode, shuffle_buffer=8, hflip=False)
    batches = []
    for _ in range(int(steps)):
        images = next(stream)
        batches.append({"epoch": stream.epoch, "batch": stream.batch_in_epoch, "images": image_indices(images)})
    out = Path(out_dir) / f"rank{world.rank}.json"
    out.write_text(json.dumps({"rank": world.rank, "world_size": world.world_size, "members": members,
                               "batches": batches}))


if __name__ == "__main__":
    main()
