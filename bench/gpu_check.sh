#!/usr/bin/env bash
# The one prepared check for the lent GPU machine (issue 14): CUDA tests, the demo trained and
# resumed on the GPU, a ZeRO-3 run, the loader, step throughput / MFU, and 1024 px memory.
#
#   bash bench/gpu_wheels.sh            # here, once: the wheels the GPU machine lacks, in .whl/
#   bash bench/gpu_check.sh OUT_DIR     # there (DEVELOPERS.md has the device-tool recipe)
#
# Why it is shaped like this: time on the GPU is short and paid for even when a step hangs, so
# every step has its own `timeout` and all of them share one deadline (BUDGET_S, under 8
# minutes); a step that no longer fits is skipped and listed as such. A failed step does not
# stop the ones after it; the exit status is 1 if any step failed or was skipped. At most 8
# flat files come back in OUT_DIR:
#   summary.txt       each step, its exit status and seconds (also printed at the end)
#   gpu_check.log     the script's own lines and the output of the steps below without a log
#   pytest_cuda.log   pytest -m cuda tests/ (tests/test_cuda.py, tests/test_bench_device.py)
#   demo.log          the demo at half its steps, resumed to the end, and a ZeRO-3 run
#   demo_grid.png     the demo's last sample grid
#   throughput.json   bench/step_throughput.py (128, 256, 1024 px; images/s, MFU, peak GPU memory)
#                     and bench/vs_authors.py runs, keyed by step name
#   memory_1024.json  bench/memory_1024.py at 1024 px, batches 8 16 32, checkpointing side>=512
#   loader.json       bench/loader_throughput.py at 256 and 1024 px
# Without a CUDA GPU it checks its input, prints one line and exits 0, having measured nothing.
set -euo pipefail

usage="usage: bash bench/gpu_check.sh OUT_DIR  (a folder for at most 8 result files; created if absent)"
if (( $# != 1 )) || [[ -z $1 ]]; then
    echo "$usage" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
REPO=$PWD

has_gpu=$(python3 -c 'import torch; print(int(torch.cuda.is_available()))') || {
    echo "bench/gpu_check.sh: python3 cannot import torch; nothing was measured" >&2
    exit 1
}
if [[ $has_gpu == 1 ]] && ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "bench/gpu_check.sh: no wheels in $REPO/.whl: run bash bench/gpu_wheels.sh on the CPU machine and carry .whl" >&2
    exit 2
fi
if [[ $has_gpu != 1 ]]; then
    echo "bench/gpu_check.sh: no CUDA GPU here (torch.cuda.is_available() is False); nothing was measured"
    exit 0
fi

BUDGET_S=${BUDGET_S:-465}  # every step together; the device tool's timeout_s should leave a minute more
MIN_STEP_S=20              # a step with less time left than this is skipped, not started
DEADLINE=$((SECONDS + BUDGET_S))
SITE=/tmp/site
SCRATCH=$(mktemp -d /tmp/gpu_check.XXXXXX)
RUNS=$SCRATCH/runs
failed=0

say() { echo "$*" | tee -a "$OUT/gpu_check.log"; }

record() {  # NAME STATUS SECONDS LOG: one line of summary.txt
    printf '%-26s %-5s %5s s  %s\n' "$1" "$2" "$3" "$4" >> "$OUT/summary.txt"
}

step() {  # NAME TIMEOUT_S LOG COMMAND...: run COMMAND under its own timeout, output appended to OUT/LOG
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((DEADLINE - SECONDS))
    if (( left < MIN_STEP_S )); then
        say "== $name: skipped, ${left} s of the budget left"
        record "$name" skip 0 "$log"
        failed=1
        return 0
    fi
    if (( limit > left )); then
        limit=$left
    fi
    say "== $name (timeout ${limit} s): $*"
    local start=$SECONDS rc=0
    # timeout signals its whole process group, so launcher children (deepspeed, DataLoader
    # workers) go with the command; -k: SIGKILL 10 s after SIGTERM if something ignores it.
    timeout -k 10 "$limit" "$@" > "$SCRATCH/$name.log" 2>&1 || rc=$?
    cat "$SCRATCH/$name.log" >> "$OUT/$log"
    say "== $name: exit $rc after $((SECONDS - start)) s"
    record "$name" "$rc" "$((SECONDS - start))" "$log"
    if (( rc != 0 )); then
        failed=1
        echo "--- last lines of $name ---"
        tail -n 25 "$SCRATCH/$name.log"
    fi
}

# shellcheck disable=SC2317  # run through `bash -c` (export -f), which shellcheck cannot follow
install_wheels() {
    # --target leaves the machine's environment alone; PYTHONPATH puts it in front. Where the
    # interpreter has no pip, a wheel is a zip: unpacking it is enough to import it (no
    # console scripts are used: the launchers run as `python3 -m ...`).
    rm -rf "$SITE"
    if python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    else
        python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" .whl/*.whl
    fi
    python3 -c 'import deepspeed, webdataset, pydantic, lmdb, torch; print("deepspeed", deepspeed.__version__, "webdataset",
webdataset.__version__, "torch", torch.__version__, torch.cuda.get_device_name(0))'
}

# shellcheck disable=SC2317  # run through `bash -c` (export -f), which shellcheck cannot follow
demo_resumed() {  # the full demo run resumed from the half run's checkpoint, not started over
    local half total
    half=$(printf 'step_%08d' "$DEMO_HALF_STEPS") total=$(printf 'step_%08d' "$DEMO_TOTAL_STEPS")
    grep -q "resuming from .*$half" "$SCRATCH/demo_full.log" || {
        echo "demo_full did not resume from $half"; return 1; }
    python3 -c 'import json, sys; steps = [json.loads(l)["step"] for l in open(sys.argv[1])]; n = int(sys.argv[2])
assert steps == list(range(1, n + 1)), (steps[:3], steps[-3:], len(steps))
print(f"metrics.jsonl: steps 1..{n}, continuous across the resume at", sys.argv[3])' \
        "$RUNS/cpu-synthetic/metrics.jsonl" "$DEMO_TOTAL_STEPS" "$DEMO_HALF_STEPS"
    cp "$RUNS/cpu-synthetic/samples/$total.png" "$OUT/demo_grid.png"
}

merge_json() {  # OUT_FILE NAME...: {NAME: SCRATCH/NAME.json} for those written
    python3 -c 'import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
found = {n: json.load(open(os.path.join(os.environ["SCRATCH"], n + ".json"))) for n in names
         if os.path.exists(os.path.join(os.environ["SCRATCH"], n + ".json"))}
json.dump(found, open(out, "w"), indent=1)
print(out, "holds", sorted(found))' "$@"
}

export PYTHONPATH=$SITE:$REPO PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda SCRATCH SITE RUNS OUT
# `timeout` runs programs, not shell functions: the function steps run in a child bash.
export -f install_wheels demo_resumed
: > "$OUT/summary.txt"
say "bench/gpu_check.sh $OUT; budget ${BUDGET_S} s; scratch $SCRATCH; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"

step install 120 gpu_check.log bash -c 'set -euo pipefail; install_wheels'
if (( failed )); then
    say "the wheels did not install; nothing else was run"
    cat "$OUT/summary.txt"
    exit 1
fi

# a. The CUDA tests: step equivalence under ZeRO 0-3, resume, sampling, the benchmarks' GPU path.
# A test module that cannot be imported on this machine's torch must not stop the others.
step pytest_cuda 240 pytest_cuda.log python3 -m pytest -q -rP -m cuda --continue-on-collection-errors tests/

# b. The demo on the GPU: half its steps, then the whole run, which must resume from there.
# Its length is the config's (train.total_steps), read rather than repeated here.
DEMO_TOTAL_STEPS=$(python3 -c 'import yaml; print(yaml.safe_load(open("configs/cpu_synthetic.yaml"))["train"]["total_steps"])')
DEMO_HALF_STEPS=$((DEMO_TOTAL_STEPS / 2))
export DEMO_TOTAL_STEPS DEMO_HALF_STEPS
step demo_shards 60 demo.log python3 -m introvae_dist.data.synthetic --out shards/synthetic
DEMO=(python3 -m deepspeed.launcher.runner --num_gpus 1 launchers/train.py --config configs/cpu_synthetic.yaml
      "run.root=$RUNS")
step demo_half 120 demo.log "${DEMO[@]}" "train.total_steps=$DEMO_HALF_STEPS"
step demo_full 120 demo.log "${DEMO[@]}"
step demo_resumed 30 demo.log bash -c 'set -euo pipefail; demo_resumed'

# c. ZeRO 3 in a real training run (the tests cover its arithmetic): 100 steps, 50 of them
# adversarial, one checkpoint.
step zero3 90 demo.log "${DEMO[@]}" run.name=zero3 encoder.zero_stage=3 generator.zero_stage=3 \
    train.total_steps=100 train.save_every_steps=100 train.sample_every_steps=100 loss.warmup_images=800

# e. The loader, on the host's CPU: images/s per worker at 256 and 1024 px.
step loader 90 gpu_check.log python3 bench/loader_throughput.py --images 32 --rounds 3 \
    --resolutions 256 1024 --json "$OUT/loader.json"

# d. Step throughput and MFU (bf16 against fp32), then memory at 1024 px. The 128 preset runs
# without checkpointing, the 256 preset with it (the script's default); torch's cuDNN default
# first, the autotuner (--cudnn-benchmark) last, as the first step to drop if time runs short.
# Channels-last, as the presets train (train.channels_last); vs_authors_128 below has it off.
step step_128 100 gpu_check.log python3 bench/step_throughput.py --device cuda --resolution-px 128 --batch 64 \
    --no-checkpointing --channels-last --steps 3 --json "$SCRATCH/step_128.json"
step step_256 100 gpu_check.log python3 bench/step_throughput.py --device cuda --resolution-px 256 --batch 32 \
    --channels-last --steps 3 --json "$SCRATCH/step_256.json"
# MFU at 1024 measured, not extrapolated from the memory run: the preset's threshold of 512.
step step_1024 120 gpu_check.log python3 bench/step_throughput.py --device cuda --resolution-px 1024 --batch 16 \
    --channels-last --checkpoint-min-side-px 512 --steps 2 --json "$SCRATCH/step_1024.json"
step memory_1024 240 gpu_check.log python3 bench/memory_1024.py --device cuda --batches 8 16 32 \
    --min-side-px 512 --steps 1 --json "$OUT/memory_1024.json"
# channels-last on and off, and the authors' fp32 step, at the 128 preset's batch
step vs_authors_128 100 gpu_check.log python3 bench/vs_authors.py --device cuda --resolution-px 128 --batch 64 \
    --steps 3 --peak-repeats 2 --variants bf16+cl+fused bf16+fused --json "$SCRATCH/vs_authors_128.json"
step step_128_cudnn_bench 100 gpu_check.log python3 bench/step_throughput.py --device cuda --resolution-px 128 \
    --batch 64 --no-checkpointing --channels-last --steps 3 --cudnn-benchmark --json "$SCRATCH/step_128_cudnn_bench.json"
merge_json "$OUT/throughput.json" step_128 step_256 step_1024 vs_authors_128 step_128_cudnn_bench 2>&1 \
    | tee -a "$OUT/gpu_check.log" || failed=1

say "== summary ($((SECONDS)) s in all)"
tee -a "$OUT/gpu_check.log" < "$OUT/summary.txt"
rm -rf "$SCRATCH"
exit "$failed"
