# The launcher every trainer's run scripts share; sourced, not run. After a script has checked its
# own positional arguments (data folder, output folder, ...), it calls
#   toe_run MAIN_PY [main.py flags...]
# which picks the processes and machines from the environment and starts MAIN_PY:
#   NPROC        processes per machine (default: the visible GPUs; 1 CPU process when there are none)
#   NNODES       machines (default 1); NODE_RANK this machine's rank (default 0)
#   MASTER_ADDR  address of machine 0 (default 127.0.0.1; required when NNODES > 1)
#   MASTER_PORT  rendezvous port (default: a free port on one machine, 29500 on several)
#   PYTHON       interpreter (default: the repository's .venv, else python3)
#   DRY_RUN=1    print the command instead of running it
# Several processes or machines run under torchrun, after one --check-only pass of MAIN_PY (so a
# flag, data or checkpoint mistake reads as one line, not once per process plus torchrun's
# report); a single process runs MAIN_PY directly. --auto-resume is added unless the flags hold
# --resume, --eval, --overwrite or --auto-resume: running the same command again continues the run.

TOE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

toe_fail() {
  echo "error: $*" >&2
  exit 2
}

toe_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif [ -x "$TOE_ROOT/.venv/bin/python" ]; then echo "$TOE_ROOT/.venv/bin/python"
  else echo python3; fi
}

toe_run() {
  local main="$1"
  shift
  local python
  python="$(toe_python)"

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
  local resume_args=(--auto-resume) arg
  for arg in "$@"; do
    # --overwrite starts afresh: with --auto-resume it would continue the old run instead
    case "$arg" in --resume|--resume=*|--eval|--auto-resume|--overwrite) resume_args=() ;; esac
  done
  local flags=("${device_args[@]}" "${resume_args[@]}" "$@")

  local launcher=()
  if [ "$nproc" -gt 1 ] || [ "$nnodes" -gt 1 ]; then
    launcher=(-m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc"
              --master_addr "$master_addr" --master_port "$master_port")
  fi
  local cmd=("$python" "${launcher[@]}" "$main" "${flags[@]}")
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    return 0
  fi
  if [ "${#launcher[@]}" -gt 0 ]; then
    "$python" "$main" "${flags[@]}" --check-only >/dev/null || exit $?
  fi
  exec "${cmd[@]}"
}

# The ImageNet-layout scripts (DeiT, EfficientTrain): bash run/SCRIPT DATA OUT [main.py flags].
# The script sets SCRIPT (its name), TOE_MAIN (its trainer's main.py) and CONFIG (its recipe file,
# ToE/<trainer>/configs/*.yaml), then calls: toe_launch "$@"
toe_usage() {
  cat >&2 <<USAGE
usage: bash run/$SCRIPT DATA OUT [extra main.py args]   (from the trainer's folder; or the full path from anywhere)
  DATA  ImageNet folder with train/<class>/ and val/<class>/
  OUT   output folder for checkpoints and logs (running the same command again continues the run)
  e.g.  bash run/$SCRIPT /data/imagenet /runs/${SCRIPT%.sh} --stop-after-epochs 1
environment: NPROC (processes per machine, default: visible GPUs, 1 on CPU), NNODES, NODE_RANK,
             MASTER_ADDR, MASTER_PORT (free-picked unless given), DRY_RUN=1 (print the command only)
USAGE
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
  toe_run "$TOE_MAIN" --config "$CONFIG" --data-path "$data" --output_dir "$out" "$@"
}
