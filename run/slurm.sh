#!/usr/bin/env bash
# Any trainer's main.py on a Slurm cluster: N nodes x G GPUs through torchrun's c10d rendezvous,
# stopped cleanly before the job's time runs out and requeued, continued from its own checkpoint.
#
#   sbatch --nodes 2 --gpus-per-node 8 --time 24:00:00 run/slurm.sh ToE/deit/main.py \
#       --model deit_small_patch16_224 --data-path /data/imagenet --output_dir /runs/small [flags]
#
# What it does:
# - one srun task per node runs torchrun (--nnodes = the job's nodes, --nproc_per_node = its GPUs
#   per node, rendezvous on the first node);
# - every (re)start of the job continues OUTPUT/checkpoint.pth, the job's own checkpoint:
#   * plain flags: --auto-resume is added (a start without that file starts the run);
#   * --resume FILE: the first start continues FILE; a requeued start (SLURM_RESTART_COUNT 1 or more)
#     continues OUTPUT/checkpoint.pth instead once the job has written one (--output_dir must be on
#     the command line), so that a requeue never goes back to FILE;
#   * --eval: nothing is added (a requeue evaluates again); --auto-resume given: kept as it is;
#   * --overwrite is refused: every requeue would delete the run again;
# - Slurm sends this script SIGUSR1 SIGNAL_LEAD seconds before the time limit (--signal below);
#   it passes SIGUSR1 on (scancel --signal=USR1: the job's steps) to each node's torchrun, which
#   forwards it to its training processes (ToE/common/torchrun.py: torchrun starts them in sessions
#   of their own, which Slurm's pgid process tracking does not signal; under cgroup tracking they get
#   it directly as well, and a second one changes nothing). They finish their current steps, write a
#   checkpoint with their position inside the epoch and exit 3, which torchrun passes on; on exit 3
#   the job requeues itself (scontrol requeue; needs a partition that allows it), and the next start
#   continues. A SIGTERM without that USR1 before it (scancel, a preemption) stops the run the same way
#   but does not requeue: a cancel stays a cancel (Slurm requeues a job preempted with
#   PreemptMode=REQUEUE itself). The checkpoint must be written within Slurm's KillWait after a SIGTERM
#   (scontrol show config | grep KillWait; 30 s by default): the stop comes at the next --log-interval step;
# - a node whose torchrun fails ends the job (srun --kill-on-bad-exit=1): the other nodes would
#   otherwise wait in their next collective call until its timeout;
# - with GPUs the trainer gets --device cuda (unless the flags name a device): a node whose torch
#   cannot use its GPUs fails in one line instead of training on the CPU;
# - logs: Slurm's output file (slurm-<job name>-<job id>.out, in the submit folder) holds the
#   launcher's output; the run's own log.txt, TensorBoard events and checkpoints are in OUTPUT.
# Environment: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else the devices in CUDA_VISIBLE_DEVICES,
# else the GPUs nvidia-smi lists; none found is an error unless the flags hold --device cpu, which
# runs one CPU process per node), CPUS_PER_TASK (default: SLURM_CPUS_PER_TASK, the 32 asked for
# above or sbatch --cpus-per-task N: the cores of one node's torchrun, shared by its ranks' loader
# workers), MASTER_PORT (default 29500), PYTHON (default: the repository's .venv, else python3),
# DRY_RUN=1 prints the srun command instead of running it (also outside a job, e.g. on a login node).
# Every argument and variable is checked before anything starts (ToE/common/launch.sh's checks).
#SBATCH --job-name=toe
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# The stop signals first (bash ends on an untrapped USR1 or TERM, and the job would then end unrequeued):
# USR1 before the launch means the time limit is nearer than the signal's lead (checked below).
PREEMPTED=0 TERMINATED=0 STEP=""
on_usr1() {
  PREEMPTED=1
  [ -n "$STEP" ] || return 0
  echo "[slurm] time limit near: asking the training processes to checkpoint and stop"
  scancel --signal=USR1 "$SLURM_JOB_ID"  # the job's steps (the srun tasks), not this script
}
# SIGTERM: Slurm cancels the job (scancel), preempts it, or reached its time limit. The training processes
# get it too (Slurm signals the steps; torchrun passes it on) and checkpoint within KillWait; this script
# waits for them, and requeues only when its own USR1 came first (the time limit): a cancel stays a cancel,
# and a preemption with PreemptMode=REQUEUE is requeued by Slurm itself.
on_term() {
  TERMINATED=1
  echo "[slurm] SIGTERM: the job is cancelled, preempted or out of time; the training processes checkpoint and stop"
}
trap on_usr1 USR1
trap on_term TERM
if [ "$#" -lt 1 ] || [ ! -f "$1" ]; then
  echo "error: pass a trainer's main.py first, e.g. sbatch run/slurm.sh ToE/deit/main.py --data-path ... --output_dir ..." >&2
  exit 2
fi
MAIN="$1"; shift
# the shared checks, found from MAIN (sbatch runs a copy of this script from its spool folder)
LAUNCH_SH="$(cd "$(dirname "$MAIN")/.." && pwd)/common/launch.sh"
if [ ! -f "$LAUNCH_SH" ]; then
  echo "error: $MAIN is not a trainer's main.py of this repository (no $LAUNCH_SH beside it). Pass ToE/<trainer>/main.py" >&2
  exit 2
fi
source "$LAUNCH_SH"
DRY=0
if toe_dry_run; then DRY=1; fi

# what the flags ask of a restart
RESUME="" OUTPUT="" EVAL=0 AUTO_RESUME=0 ON_CPU=0 DEVICE_GIVEN=0 previous=""
for arg in "$@"; do
  case "$previous" in
    --resume) RESUME="$arg" ;;
    --output_dir|--output-dir) OUTPUT="$arg" ;;
    --device) DEVICE_GIVEN=1; [ "$arg" != cpu ] || ON_CPU=1 ;;
  esac
  case "$arg" in
    --overwrite) toe_fail "--overwrite in a requeued job would delete the run at every restart. Delete OUTPUT by" \
                          "hand (or pick a new --output_dir) and submit without --overwrite" ;;
    --resume=*) RESUME="${arg#*=}" ;;
    --output_dir=*|--output-dir=*) OUTPUT="${arg#*=}" ;;
    --device=cpu) ON_CPU=1 DEVICE_GIVEN=1 ;;
    --device=*) DEVICE_GIVEN=1 ;;
    --eval) EVAL=1 ;;
    --auto-resume) AUTO_RESUME=1 ;;
  esac
  previous="$arg"
done
FLAGS=("$@")
RESTART="${SLURM_RESTART_COUNT:-0}"
toe_int SLURM_RESTART_COUNT "$RESTART" 0
if [ "$EVAL" = 1 ] || [ "$AUTO_RESUME" = 1 ]; then
  CONTINUES="as the flags say"
elif [ -n "$RESUME" ]; then
  [ -n "$OUTPUT" ] || toe_fail "--resume $RESUME in a Slurm job needs --output_dir on the command line: a requeued" \
                               "job continues OUTPUT/checkpoint.pth, not $RESUME again. Add --output_dir FOLDER"
  CONTINUES="$RESUME"
  if [ "$((10#$RESTART))" -gt 0 ] && [ -f "$OUTPUT/checkpoint.pth" ]; then
    # a requeued start: the job's own checkpoint, not the file the first start continued
    FLAGS=() previous=""
    for arg in "$@"; do
      if [ "$arg" = --resume ] || [[ "$arg" == --resume=* ]]; then previous="$arg"; continue; fi
      [ "$previous" = --resume ] || FLAGS+=("$arg")
      previous="$arg"
    done
    FLAGS+=(--auto-resume)
    CONTINUES="$OUTPUT/checkpoint.pth (restart $RESTART: this job's own, not --resume $RESUME)"
  fi
else
  FLAGS+=(--auto-resume)
  CONTINUES="OUTPUT/checkpoint.pth when it exists (--auto-resume)"
fi

NNODES="${SLURM_NNODES:-1}"
toe_int SLURM_NNODES "$NNODES" 1
# GPUs per node: the user's, else what Slurm gave the job, else what this node shows
GPUS="${GPUS_PER_NODE:-}"
if [ -n "$GPUS" ]; then
  toe_int GPUS_PER_NODE "$GPUS" 1 "" "Set GPUS_PER_NODE to the processes per node (its GPUs), or unset it"
elif [[ "${SLURM_GPUS_ON_NODE:-}" =~ ^[1-9][0-9]{0,3}$ ]]; then
  GPUS="$SLURM_GPUS_ON_NODE"
elif [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  case "$CUDA_VISIBLE_DEVICES" in
    ''|-*|NoDevFiles) GPUS=0 ;;
    *) IFS=, read -ra devices <<< "$CUDA_VISIBLE_DEVICES"; GPUS="${#devices[@]}" ;;
  esac
elif command -v nvidia-smi >/dev/null 2>&1; then
  GPUS="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
else
  GPUS=0
fi
if [ "$((10#$GPUS))" -eq 0 ]; then
  [ "$ON_CPU" = 1 ] || toe_fail "no GPU found on this node (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES and" \
                                "nvidia-smi name none). Submit with sbatch --gpus-per-node N (or set GPUS_PER_NODE=N)," \
                                "or pass --device cpu to train on the CPU"
  GPUS=1  # one CPU process per node
elif [ "$DEVICE_GIVEN" = 0 ]; then
  FLAGS=(--device cuda "${FLAGS[@]}")  # the job has GPUs: a torch that cannot use them is an error, not a CPU run
fi
PORT="${MASTER_PORT:-29500}"
toe_int MASTER_PORT "$PORT" 1 65535 "Set MASTER_PORT to a free TCP port, or unset it for 29500"
CPUS="${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-32}}"
toe_int CPUS_PER_TASK "$CPUS" 1 "" "Set CPUS_PER_TASK (or sbatch --cpus-per-task) to the cores of one node's torchrun"
if [ "$DRY" = 0 ] && [ -z "${SLURM_JOB_ID:-}" ]; then
  toe_fail "not inside a Slurm job (no SLURM_JOB_ID). Submit it with sbatch run/slurm.sh $MAIN ..., or set DRY_RUN=1" \
           "to print the command"
fi
PYTHON="$(toe_python)"
HEAD="$( (scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null || true) | head -n 1)"
HEAD="${HEAD:-127.0.0.1}"
# (CPUS: srun does not inherit sbatch's --cpus-per-task (Slurm 22.05 on): without it, the loader
# workers of all the node's ranks would share one core)
# One torchrun per node (ToE/common/torchrun.py). SIGUSR1 is ignored until it has set up its handler,
# which forwards the signal to its training processes; it ends with their exit 3 and rank 0's one line
# when they stopped cleanly (not torchrun's report of a crash). A node that fails ends the job.
LAUNCH=(srun --kill-on-bad-exit=1 --cpus-per-task="$CPUS" bash -c 'trap "" USR1; exec "$@"' torchrun
        "$PYTHON" "$TOE_ROOT/ToE/common/torchrun.py" --nnodes "$NNODES" --nproc_per_node "$GPUS"
        --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "${SLURM_JOB_ID:-toe}"
        "$MAIN" "${FLAGS[@]}")
if [ "$DRY" = 1 ]; then
  printf '%q ' "${LAUNCH[@]}"; printf '\n'
  exit 0
fi
echo "[slurm] job $SLURM_JOB_ID (restart $RESTART): $NNODES node(s) x $GPUS process(es), rendezvous $HEAD:$PORT;" \
     "continues $CONTINUES"
if [ "$PREEMPTED" = 1 ] || [ "$TERMINATED" = 1 ]; then
  [ "$TERMINATED" = 1 ] && { echo "[slurm] SIGTERM before the start: nothing started, nothing to requeue"; exit 0; }
  toe_fail "SIGUSR1 came before the training started: the job's time left is under the signal's lead (300 s," \
           "#SBATCH --signal). Submit with a longer --time"
fi
"${LAUNCH[@]}" &
STEP=$!
# wait returns early when the trap fires: wait again until srun has really ended
STATUS=0
while true; do
  if wait "$STEP"; then STATUS=0; else STATUS=$?; fi
  kill -0 "$STEP" 2>/dev/null || break
done
# exit 3: the training processes stopped with a checkpoint (this script's SIGUSR1, or a SIGTERM after it at
# the time limit). After our own SIGUSR1 other exits requeue as well, but for a finished run (0) and a user
# error (2): a node that had already exited 3 may have made srun end the others (--kill-on-bad-exit)
# with another code.
if [ "$TERMINATED" = 1 ] && [ "$PREEMPTED" = 0 ]; then
  echo "[slurm] stopped by SIGTERM with exit $STATUS; not requeued (a cancel or a preemption: Slurm requeues a" \
       "preempted job itself under PreemptMode=REQUEUE). ${OUTPUT:-OUTPUT}/checkpoint.pth continues it"
  exit "$STATUS"
fi
if [ "$STATUS" = 3 ] || { [ "$PREEMPTED" = 1 ] && [ "$STATUS" != 0 ] && [ "$STATUS" != 2 ]; }; then
  echo "[slurm] stopped with exit $STATUS; requeueing job $SLURM_JOB_ID (the next start continues" \
       "${OUTPUT:-OUTPUT}/checkpoint.pth)"
  scontrol requeue "$SLURM_JOB_ID" || exit "$STATUS"
  exit 0
fi
[ "$PREEMPTED" = 0 ] || echo "[slurm] the run ended (exit $STATUS) before the stop signal took effect: nothing to requeue"
exit "$STATUS"
