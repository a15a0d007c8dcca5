#!/usr/bin/env bash
# Any trainer's main.py on a Slurm cluster: N nodes x G GPUs through torchrun's c10d rendezvous,
# stopped cleanly before the job's time runs out and requeued, continued with --auto-resume.
#
#   sbatch --nodes 2 --gpus-per-node 8 --time 24:00:00 run/slurm.sh ToE/deit/main.py \
#       --model deit_small_patch16_224 --data-path /data/imagenet --output_dir /runs/small [flags]
#
# What it does:
# - one srun task per node runs torchrun (--nnodes = the job's nodes, --nproc_per_node = its GPUs
#   per node, rendezvous on the first node); --auto-resume is added, so every (re)start of the
#   job continues OUTPUT/checkpoint.pth when it exists;
# - Slurm sends this script SIGUSR1 SIGNAL_LEAD seconds before the time limit (--signal below);
#   it passes SIGUSR1 to the training processes, which finish their current steps, write a
#   checkpoint with their position inside the epoch and exit; then the job requeues itself
#   (scontrol requeue; needs a partition that allows it), and the next start continues;
# - logs: Slurm's output file (slurm-<job name>-<job id>.out, in the submit folder) holds the
#   launcher's output; the run's own log.txt, TensorBoard events and checkpoints are in OUTPUT.
# Environment: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists),
# CPUS_PER_TASK (default: SLURM_CPUS_PER_TASK, the 32 asked for above or sbatch --cpus-per-task N:
# the cores of one node's torchrun, shared by its ranks' loader workers), MASTER_PORT (default 29500), PYTHON (default: the repository's .venv, else python3),
# DRY_RUN=1 prints the srun command instead of running it.
#SBATCH --job-name=toe
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
if [ "$#" -lt 1 ] || [ ! -f "$1" ]; then
  echo "error: pass a trainer's main.py first, e.g. sbatch run/slurm.sh ToE/deit/main.py --data-path ... --output_dir ..." >&2
  exit 2
fi
MAIN="$1"; shift
for arg in "$@"; do
  if [ "$arg" = --overwrite ]; then
    echo "error: --overwrite in a requeued job would delete the run at every restart. Delete OUTPUT by hand (or pick a new --output_dir) and submit without --overwrite" >&2
    exit 2
  fi
done
ROOT="${SLURM_SUBMIT_DIR:-$(pwd)}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
NNODES="${SLURM_NNODES:-1}"
GPUS="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
if [ -z "$GPUS" ]; then GPUS="$(nvidia-smi -L 2>/dev/null | wc -l)"; fi
[ "$GPUS" -gt 0 ] 2>/dev/null || GPUS=1
HEAD="$( (scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null || true) | head -n 1)"
HEAD="${HEAD:-127.0.0.1}"
PORT="${MASTER_PORT:-29500}"
# srun does not inherit sbatch's --cpus-per-task (Slurm 22.05 on): without it, the loader workers
# of all the node's ranks would share one core
CPUS="${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-32}}"
# One torchrun per node. It ignores SIGUSR1 (an inherited SIG_IGN), so the signal reaches the
# training processes, which catch it themselves; torchrun just sees them end.
LAUNCH=(srun --kill-on-bad-exit=0 --cpus-per-task="$CPUS" bash -c 'trap "" USR1; exec "$@"' torchrun
        "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS"
        --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "${SLURM_JOB_ID:-toe}"
        "$MAIN" "$@" --auto-resume)
if [ "${DRY_RUN:-0}" = "1" ]; then
  printf '%q ' "${LAUNCH[@]}"; printf '\n'
  exit 0
fi
echo "[slurm] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $GPUS GPU(s), rendezvous $HEAD:$PORT"
PREEMPTED=0
on_usr1() {
  PREEMPTED=1
  echo "[slurm] time limit near: asking the training processes to checkpoint and stop"
  scancel --signal=USR1 "$SLURM_JOB_ID"  # the job's steps (the srun tasks), not this script
}
trap on_usr1 USR1
"${LAUNCH[@]}" &
STEP=$!
# wait returns early when the trap fires: wait again until srun has really ended
STATUS=0
while true; do
  if wait "$STEP"; then STATUS=0; else STATUS=$?; fi
  kill -0 "$STEP" 2>/dev/null || break
done
if [ "$PREEMPTED" = "1" ]; then
  echo "[slurm] checkpoint written; requeueing job $SLURM_JOB_ID (the next start continues with --auto-resume)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$STATUS"
