# Shared launcher of the DeiT run scripts; sourced, not run. A run script sets
#   SCRIPT   its own name (for the usage message)
#   TOE_MAIN optional: the main.py to launch (default: ToE/deit/main.py; other trainers' scripts set theirs)
#   RECIPE   an array of main.py flags (the published hyper-parameters)
# and then calls: toe_launch "$@"
#
#   bash run/imagenet_small_run1.sh DATA OUT [extra main.py args]
#
# Environment:
#   NPROC        processes per machine (default: the visible GPUs; 1 CPU process when there are none)
#   NNODES       machines (default 1); NODE_RANK this machine's rank (default 0)
#   MASTER_ADDR  address of machine 0 (default 127.0.0.1; required when NNODES > 1)
#   MASTER_PORT  rendezvous port (default: a free port on one machine, 29500 on several)
#   PYTHON       interpreter (default: the repository's .venv, else python3)
#   DRY_RUN=1    print the command instead of running it
#
# Several processes or machines run under torchrun, after one --check-only pass of main.py (so a
# flag or data mistake is one line); a single process runs main.py directly.

TOE_DEIT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOE_MAIN="${TOE_MAIN:-$TOE_DEIT_DIR/main.py}"
TOE_ROOT="$(cd "$TOE_DEIT_DIR/../.." && pwd)"

toe_usage() {
  cat >&2 <<USAGE
usage: bash run/$SCRIPT DATA OUT [extra main.py args]   (from ToE/deit; or the full path from anywhere)
  DATA  ImageNet folder with train/<class>/ and val/<class>/
  OUT   output folder for checkpoints and logs
  e.g.  bash run/$SCRIPT /data/imagenet /runs/${SCRIPT%.sh} --epochs 1
environment: NPROC (processes per machine, default: visible GPUs, 1 on CPU), NNODES, NODE_RANK,
             MASTER_ADDR, MASTER_PORT (free-picked unless given), DRY_RUN=1 (print the command only)
USAGE
}

toe_fail() {
  echo "error: $*" >&2
  exit 2
}

toe_launch() {
  if [ "$#" -lt 2 ] || [ -z "$1" ] || [ -z "$2" ]; then
    toe_usage
    exit 2
  fi
  case "$1" in -h|--help) toe_usage; exit 0 ;; -*) toe_usage; exit 2 ;; esac
  case "$2" in -*) toe_usage; exit 2 ;; esac
  local data="$1" out="$2"
  shift 2
  # checked here too, so the most common mistake reads as one line even under torchrun
  [ -d "$data" ] || [ "${DRY_RUN:-0}" = "1" ] || toe_fail "data folder $data does not exist. Pass the ImageNet folder (with train/ and val/) as the first argument"

  local python="${PYTHON:-}"
  if [ -z "$python" ]; then
    if [ -x "$TOE_ROOT/.venv/bin/python" ]; then python="$TOE_ROOT/.venv/bin/python"; else python=python3; fi
  fi

  # GPUs this process can see (CUDA_VISIBLE_DEVICES respected); 0 when torch finds none
  local gpus
  gpus="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  case "$gpus" in ''|*[!0-9]*) gpus=0 ;; esac

  local nproc="${NPROC:-}"
  if [ -z "$nproc" ]; then
    if [ "$gpus" -gt 0 ]; then nproc="$gpus"; else nproc=1; fi
  fi
  case "$nproc" in ''|*[!0-9]*|0) toe_fail "NPROC must be a positive integer, not '$nproc'" ;; esac

  local nnodes="${NNODES:-1}" node_rank="${NODE_RANK:-0}"
  case "$nnodes" in ''|*[!0-9]*|0) toe_fail "NNODES must be a positive integer, not '$nnodes'" ;; esac
  case "$node_rank" in ''|*[!0-9]*) toe_fail "NODE_RANK must be an integer from 0 to NNODES-1, not '$node_rank'" ;; esac
  [ "$node_rank" -lt "$nnodes" ] || toe_fail "NODE_RANK $node_rank is not below NNODES $nnodes"
  local master_addr="${MASTER_ADDR:-}"
  if [ -z "$master_addr" ]; then
    [ "$nnodes" -eq 1 ] || toe_fail "set MASTER_ADDR to the address of machine 0 when NNODES > 1"
    master_addr=127.0.0.1
  fi
  local master_port="${MASTER_PORT:-}"
  if [ -z "$master_port" ]; then
    if [ "$nnodes" -gt 1 ]; then
      master_port=29500  # every machine must agree, so no random pick
    else
      master_port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1]); s.close()')"
    fi
  fi

  local device_args=()
  [ "$gpus" -gt 0 ] || device_args=(--device cpu)

  local launcher=()
  if [ "$nproc" -gt 1 ] || [ "$nnodes" -gt 1 ]; then
    launcher=(-m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc"
              --master_addr "$master_addr" --master_port "$master_port")
  fi
  # One process on one machine runs main.py directly: the same run, and a user error stays one
  # line (torchrun would add its own traceback to it).
  # --auto-resume: running the same command again continues OUT/checkpoint.pth (after a crash, a
  # preemption or a time limit); an explicit --resume or --eval takes its place
  local resume_args=(--auto-resume)
  local arg
  for arg in "$@"; do
    case "$arg" in --resume|--resume=*|--eval|--auto-resume) resume_args=() ;; esac
  done
  local cmd=("$python" "${launcher[@]}" "$TOE_MAIN" "${RECIPE[@]}" "${device_args[@]}"
             --data-path "$data" --output_dir "$out" "${resume_args[@]}" "$@")
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    return 0
  fi
  if [ "${#launcher[@]}" -gt 0 ]; then
    # Check the flags, data, output folder and resume file once, in one process, before torchrun
    # starts: a mistake then reads as one line, not once per process plus torchrun's report.
    "$python" "$TOE_MAIN" "${RECIPE[@]}" "${device_args[@]}" --data-path "$data" --output_dir "$out" \
      "${resume_args[@]}" "$@" --check-only >/dev/null || exit $?
  fi
  exec "${cmd[@]}"
}
