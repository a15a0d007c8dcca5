# Shared launcher of the YOLOS run scripts; sourced, not run. A run script sets
#   SCRIPT   its own name (for the usage message)
#   RECIPE   an array of main.py flags (the published hyper-parameters)
# and then calls: yolos_launch "$@"
#
#   bash ToE/yolos/run/coco_tiny_run1.sh COCO OUT INIT_CHECKPOINT [extra main.py args]
#
# Environment: NPROC (processes per machine; default: the visible GPUs, 1 on CPU), NNODES,
# NODE_RANK, MASTER_ADDR, MASTER_PORT (free-picked on one machine), PYTHON, DRY_RUN=1 (print only).
# Several processes run under torchrun after one --check-only pass of main.py, so a flag, data or
# checkpoint mistake reads as one line; a single process runs main.py directly.
# (The DeiT scripts' launcher works the same way for ToE/deit/main.py.)

YOLOS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
YOLOS_ROOT="$(cd "$YOLOS_DIR/../.." && pwd)"

yolos_usage() {
  cat >&2 <<USAGE
usage: bash ToE/yolos/run/$SCRIPT COCO OUT INIT_CHECKPOINT [extra main.py args]
  COCO             folder with train2017/, val2017/, annotations/instances_{train,val}2017.json
  OUT              output folder for checkpoints and logs
  INIT_CHECKPOINT  the ImageNet classification weights of the backbone (a DeiT .pth on disk)
environment: NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, PYTHON, DRY_RUN=1
USAGE
}

yolos_fail() { echo "error: $*" >&2; exit 2; }

yolos_launch() {
  if [ "$#" -lt 3 ] || [ -z "$1" ] || [ -z "$2" ] || [ -z "$3" ]; then yolos_usage; exit 2; fi
  case "$1" in -h|--help) yolos_usage; exit 0 ;; -*) yolos_usage; exit 2 ;; esac
  local data="$1" out="$2" init="$3"
  shift 3
  [ -d "$data" ] || [ "${DRY_RUN:-0}" = "1" ] || yolos_fail "COCO folder $data does not exist. Pass the folder with train2017/, val2017/ and annotations/ as the first argument"
  [ -f "$init" ] || [ "${DRY_RUN:-0}" = "1" ] || yolos_fail "init checkpoint $init does not exist. Pass the DeiT ImageNet weights (e.g. deit_tiny_patch16_224-a1311bcf.pth) as the third argument"
  local python="${PYTHON:-}"
  if [ -z "$python" ]; then
    if [ -x "$YOLOS_ROOT/.venv/bin/python" ]; then python="$YOLOS_ROOT/.venv/bin/python"; else python=python3; fi
  fi
  local gpus
  gpus="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  case "$gpus" in ''|*[!0-9]*) gpus=0 ;; esac
  local nproc="${NPROC:-}"
  if [ -z "$nproc" ]; then if [ "$gpus" -gt 0 ]; then nproc="$gpus"; else nproc=1; fi; fi
  case "$nproc" in ''|*[!0-9]*|0) yolos_fail "NPROC must be a positive integer, not '$nproc'" ;; esac
  local nnodes="${NNODES:-1}" node_rank="${NODE_RANK:-0}"
  case "$nnodes" in ''|*[!0-9]*|0) yolos_fail "NNODES must be a positive integer, not '$nnodes'" ;; esac
  case "$node_rank" in ''|*[!0-9]*) yolos_fail "NODE_RANK must be an integer from 0 to NNODES-1, not '$node_rank'" ;; esac
  [ "$node_rank" -lt "$nnodes" ] || yolos_fail "NODE_RANK $node_rank is not below NNODES $nnodes"
  local master_addr="${MASTER_ADDR:-}"
  if [ -z "$master_addr" ]; then
    [ "$nnodes" -eq 1 ] || yolos_fail "set MASTER_ADDR to the address of machine 0 when NNODES > 1"
    master_addr=127.0.0.1
  fi
  local master_port="${MASTER_PORT:-}"
  if [ -z "$master_port" ]; then
    if [ "$nnodes" -gt 1 ]; then master_port=29500; else
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
  local flags=("${RECIPE[@]}" "${device_args[@]}" --coco_path "$data" --output_dir "$out" --init-checkpoint "$init" "$@")
  local cmd=("$python" "${launcher[@]}" "$YOLOS_DIR/main.py" "${flags[@]}")
  if [ "${DRY_RUN:-0}" = "1" ]; then printf '%q ' "${cmd[@]}"; printf '\n'; return 0; fi
  if [ "${#launcher[@]}" -gt 0 ]; then
    "$python" "$YOLOS_DIR/main.py" "${flags[@]}" --check-only >/dev/null || exit $?
  fi
  exec "${cmd[@]}"
}
