#!/bin/bash
# Train IntroVAE under SLURM: one srun task (one rank) per GPU, on one or many nodes.
#
#   cd /path/to/introvae-dist                  # the repository root: logs/ and relative paths
#   sbatch launchers/slurm.sh configs/celebahq_256.yaml data.shards=/data/celebahq-256
#   sbatch --nodes=4 launchers/slurm.sh configs/celebahq_1024.yaml          # 4 x 8 = 32 ranks
#   sbatch --array=0-2 --output=logs/%x-%A_%a.out launchers/slurm.sh configs/celeba_128.yaml
#
# Arguments: the config file, then dotted overrides (key=value), as for launchers/train.py.
# `sbatch` options on the command line override the #SBATCH lines below. docs/CLUSTER.md
# explains every line; docs/CHECKPOINTS.md resuming and the exit codes.
#
#SBATCH --job-name=introvae
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@300
#SBATCH --requeue
#
# --ntasks-per-node = --gpus-per-node: one task per GPU. The tasks are the ranks: srun starts
#   them on every node and sets SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, which
#   introvae_dist/distributed.py turns into RANK/LOCAL_RANK/WORLD_SIZE. Each task sees all of its
#   node's GPUs and DeepSpeed picks cuda:LOCAL_RANK, so do not add --gpus-per-task or --gpu-bind
#   (a task that sees one GPU would still ask for device LOCAL_RANK). Chosen over one task per
#   node running a per-node launcher (torchrun/deepspeed --node_rank): SLURM itself then signals
#   every rank (the notice below, scancel, preemption) and reports each rank's exit status, with
#   no second launcher in between that may not forward signals (docs/CHECKPOINTS.md).
# --cpus-per-task: cores per rank: data.num_workers loader processes plus the rank itself.
# --output: the job's log, relative to the directory sbatch ran in; %x is the job name, %j the
#   job id (%A_%a: array job id and task index). stderr goes to the same file (no --error), so
#   a traceback sits under the lines that led to it. SLURM does not create folders: logs/ is
#   kept in the repository, and a folder of your own (logs/%x/%j.out) must exist before sbatch,
#   or the job fails without any log.
# --open-mode=append: a requeued job keeps the same job id, so the same log; append, not truncate.
# --signal=USR1@300: SIGUSR1 to every srun task ~300 s (SLURM: up to 60 s earlier) before the
#   time limit. The ranks finish their step, save a complete checkpoint and exit 75; this script
#   then requeues the job, which resumes from that checkpoint. No "B:": the notice must reach the
#   ranks (with B: only this script gets it; it passes it on, see below). Give it at least one
#   step plus one save: at the limit itself SLURM sends SIGTERM to everything, srun included,
#   and kills what is left KillWait (default 30) seconds later; a save that does not fit leaves
#   the run to resume from its last periodic save, and the job is not requeued.
# --requeue: allow `scontrol requeue` (and requeue on preemption or node failure).

set -euo pipefail

# --- site setup: edit for your cluster (docs/CLUSTER.md, "A new cluster") --------------------
# module load cuda/12.4
# source ~/miniforge3/bin/activate introvae
# export NCCL_SOCKET_IFNAME=ib0        # the interface between nodes, if NCCL picks a wrong one
# export NCCL_IB_HCA=mlx5              # InfiniBand adapters to use
PYTHON=${PYTHON:-python}
# ---------------------------------------------------------------------------------------------

# Exit codes: the values of introvae_dist/exit_codes.py, where each is defined and explained
# (bash cannot import them; tests/test_exit_codes.py checks these two against it).
EXIT_BAD_INPUT=2        # launchers/train.py: bad input, found before training
EXIT_SAVED=75           # launchers/train.py: saved on SIGTERM/SIGUSR1; run again to resume
NOTICE_S=300            # keep equal to the header's --signal=USR1@300

log() { printf '[slurm.sh %(%F %T)T] %s\n' -1 "$*"; }
fail() {  # bad input: the reason in the job log, the job ends now (nothing was started)
    log "error: $*" >&2
    exit "$EXIT_BAD_INPUT"
}

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "launchers/slurm.sh is a batch script: sbatch launchers/slurm.sh CONFIG [key=value ...]" >&2
    exit "$EXIT_BAD_INPUT"
fi
restart=${SLURM_RESTART_COUNT:-0}
log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) on $SLURM_JOB_NUM_NODES node(s) $SLURM_JOB_NODELIST," \
    "${SLURM_NTASKS:-?} task(s); restart $restart; batch host $(hostname -s); in $PWD"

# --- preflight, on the batch host before any task starts: bad input fails here, at once -----
(( $# >= 1 )) || fail "no config: sbatch launchers/slurm.sh CONFIG [key=value ...]"
config=$1
shift
overrides=("$@")
[[ -f launchers/train.py ]] ||
    fail "no launchers/train.py in $PWD: run sbatch from the repository root (or pass --chdir)"
[[ -f $config ]] || fail "config file not found: $config (relative to $PWD)"
[[ -n ${SLURM_NTASKS:-} ]] || fail "no task count: keep --ntasks-per-node (= GPUs per node) in the job's options"
command -v "$PYTHON" > /dev/null ||
    fail "python not found ($PYTHON): activate your environment in the site setup block"

# sbatch exports the submitting shell's environment: a RANK or WORLD_SIZE left over from an
# earlier torchrun/deepspeed session would override SLURM's task variables in every rank.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE LOCAL_SIZE

if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    # Array tasks get their own run folder (run folders are locked: two jobs never share one).
    run_name=$("$PYTHON" - "$config" "${overrides[@]}" <<'PY'
import sys
from introvae_dist.config import ConfigError, load_config
try:
    print(load_config(sys.argv[1], sys.argv[2:]).run.name)
except (ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
PY
) || fail "the config does not load (reason above)"
    overrides+=("run.name=${run_name}_${SLURM_ARRAY_TASK_ID}")
    log "array task $SLURM_ARRAY_TASK_ID of job ${SLURM_ARRAY_JOB_ID}: run.name=${run_name}_${SLURM_ARRAY_TASK_ID}"
fi

# Tasks on this (the first) node: SLURM_NTASKS_PER_NODE, else the first entry of e.g. "8(x4)".
tasks_per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%[(,]*}}

# GPUs: only when the job asked for some (a CPU job asks for none and skips this).
gpus_asked=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus_asked=${gpus_asked##*:}                     # "a100:4" -> 4
if [[ $gpus_asked =~ ^[0-9]+$ ]] && (( gpus_asked > 0 )); then
    if command -v nvidia-smi > /dev/null; then
        gpus_seen=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)
        how="nvidia-smi -L"
    else
        gpus_seen=0
        how="no nvidia-smi: no NVIDIA driver here"
    fi
    (( gpus_seen >= tasks_per_node )) ||
        fail "$(hostname -s) shows $gpus_seen GPU(s) ($how) but the job runs $tasks_per_node task(s)" \
             "per node, one per GPU (asked: $gpus_asked GPU(s) per node); ask for GPUs the nodes have," \
             "with --ntasks-per-node equal to --gpus-per-node"
    (( gpus_asked == tasks_per_node )) ||
        log "warning: $gpus_asked GPU(s) per node but $tasks_per_node task(s) per node; each task uses one GPU"
    log "GPUs on $(hostname -s): $gpus_seen ($how)"
fi

# A time limit not above the notice: the notice comes right after the start, every run saves
# and requeues after a few steps (seen with --time=1: a requeue every ~20 s).
limit=$(scontrol show job "$SLURM_JOB_ID" | grep -o 'TimeLimit=[^ ]*' | cut -d= -f2- || true)
if [[ $limit =~ ^(([0-9]+)-)?([0-9]+):([0-9]+):([0-9]+)$ ]]; then
    limit_s=$(( 10#${BASH_REMATCH[2]:-0} * 86400 + 10#${BASH_REMATCH[3]} * 3600 + 10#${BASH_REMATCH[4]} * 60 + 10#${BASH_REMATCH[5]} ))
    (( limit_s > NOTICE_S + 60 )) ||
        log "warning: time limit $limit is not above the ${NOTICE_S} s notice (--signal=USR1@$NOTICE_S) plus SLURM's" \
            "60 s of slack: unless --signal was changed, each run saves and requeues soon after it starts"
fi

# The trainer's own checks (config, shards, run folder) for this job's world, without
# starting any engine; prints the resolved config into the log.
log "preflight: $PYTHON launchers/train.py --config $config --dry-run ${overrides[*]}"
dry=0
RANK=0 LOCAL_RANK=0 WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE=$tasks_per_node \
    "$PYTHON" launchers/train.py --config "$config" --dry-run "${overrides[@]}" || dry=$?
(( dry == 0 )) || fail "preflight failed (launchers/train.py --dry-run exit $dry, reason above); no task started"

# --- rendezvous: the first host of the allocation, a port fixed by the job id ----------------
# Every task derives the same values (distributed.py does the same when these are unset);
# jobs sharing a node get different ports (unless their ids differ by a multiple of 20000),
# and a requeued job (same id) the same one.
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
(( ${#hosts[@]} > 0 )) || fail "scontrol show hostnames $SLURM_JOB_NODELIST gave no host"
export MASTER_ADDR=${hosts[0]}
export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
log_file=$(scontrol show job "$SLURM_JOB_ID" | grep -o 'StdOut=[^ ]*' | cut -d= -f2- || true)
log "rendezvous $MASTER_ADDR:$MASTER_PORT; this log: ${log_file:-?}"

# --- the ranks --------------------------------------------------------------------------------
# --kill-on-bad-exit=1: one task ending non-zero (or killed) ends the step, instead of leaving
#   the others waiting in a collective until its timeout.
# --cpus-per-task: passed on explicitly (since SLURM 22.05 srun does not inherit sbatch's).
# --label: each line starts with its rank.
# `trap "" TERM USR1` in each task, before Python starts: after a save on a stop signal every
# rank exits 75, and the first to exit makes srun (--kill-on-bad-exit: 75 is non-zero) send
# SIGTERM to the others, which may still be shutting down: killed, they would turn the step's
# status into 143 and the job would not requeue; ignoring it, they finish and exit 75 too. And a
# USR1 arriving while a rank is still starting (before the trainer's handler exists) would kill
# it (seen: --time=5 with USR1@300 killed both ranks during startup). The trainer installs its
# own handler (finish the step, save, exit 75) when training starts, replacing the ignore;
# a stuck rank still gets SLURM's SIGKILL, KillWait seconds after the SIGTERM.
srun_args=(--kill-on-bad-exit=1 --label)
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
log "srun ${srun_args[*]} $PYTHON -u launchers/train.py --config $config ${overrides[*]}"
srun "${srun_args[@]}" bash -c 'trap "" TERM USR1; exec "$@"' rank \
    "$PYTHON" -u launchers/train.py --config "$config" "${overrides[@]}" &
srun_pid=$!

# A notice sent to this script only (--signal=B:USR1@N, scancel --batch) is passed on to srun,
# which forwards it to every task. SIGTERM to this script means SLURM is ending the job: the
# time limit, `scancel ID`, a shutdown (the notice and preemption's SIGTERM go to the tasks
# only). The tasks get it too and save if they can before SLURM's SIGKILL; the job is then
# requeued only at the time limit, never after a scancel (seen on SLURM 22.05: `scontrol
# requeue` accepts a cancelled job and brings it back).
got_term=0
trap 'log "SIGUSR1 to the batch script: passing it to the ranks"; kill -USR1 "$srun_pid" 2> /dev/null || true' USR1
trap 'got_term=1; log "SIGTERM to the batch script: SLURM is ending this job (time limit, scancel or shutdown)"' TERM

status=0
while :; do
    status=0
    wait "$srun_pid" || status=$?
    (( status > 128 )) && kill -0 "$srun_pid" 2> /dev/null && continue  # a trap interrupted wait
    if (( status > 128 )); then  # srun may have ended while the trap ran: its own status
        again=0
        wait "$srun_pid" 2> /dev/null || again=$?
        (( again == 127 )) || status=$again
    fi
    break
done
trap - USR1 TERM

case $status in
    0) log "done: training finished (srun exit 0)" ;;
    "$EXIT_SAVED")
        reason=
        if (( got_term )); then
            reason=$(scontrol show job "$SLURM_JOB_ID" | grep -o 'Reason=[^ ]*' | cut -d= -f2- || true)
        fi
        if (( got_term )) && [[ $reason != TimeLimit ]]; then
            log "the ranks saved a complete checkpoint (exit $EXIT_SAVED), but the job was cancelled" \
                "(reason: ${reason:-?}): not requeued; submit the same command again to resume"
        else
            log "the ranks saved a complete checkpoint on a stop signal (exit $EXIT_SAVED):" \
                "requeueing job $SLURM_JOB_ID (restart $(( restart + 1 ))); it resumes from that checkpoint"
            if ! scontrol requeue "$SLURM_JOB_ID"; then
                log "error: scontrol requeue $SLURM_JOB_ID failed; submit the same command again to resume"
            fi
        fi
        ;;
    "$EXIT_BAD_INPUT") log "error: bad input (exit $status); see the rank's message above" ;;
    *)
        why="1: an error, 3: a non-finite loss"
        (( status > 128 )) && why="killed by signal $(( status - 128 ))"
        log "error: srun exit $status ($why; the ranks' messages are above);" \
            "submitting the same command again resumes from the last complete checkpoint"
        ;;
esac
exit "$status"
