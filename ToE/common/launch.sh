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
# The exit code is the trainer's either way: 0 done, 2 a user error, 3 stopped early with a
# checkpoint (a stop signal, --time-limit), 130 Ctrl-C, anything else a failure.

TOE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

toe_fail() {
  echo "error: $*" >&2
  exit 2
}

# The argument checks every script shares (the run scripts, run/demo.sh, run/slurm.sh,
# generate_labels.sh): a bad value is one line and exit 2, before anything is run or written.
# toe_int NAME VALUE MIN [MAX] [FIX]: VALUE (of the variable or argument NAME) is a whole number
# from MIN (to MAX); FIX, when given, ends the message instead of the range
toe_int() {
  local name="$1" value="$2" min="$3" max="${4:-}" fix="${5:-}"
  local range="a whole number of at least $min"
  [ -z "$max" ] || range="a whole number from $min to $max"
  # 10#: a leading zero is not octal; at most 9 digits: no overflow
  if [[ ! "$value" =~ ^[0-9]{1,9}$ ]] || (( 10#$value < min )) || { [ -n "$max" ] && (( 10#$value > max )); }; then
    toe_fail "$name is '$value', not $range. ${fix:-Set it to $range}"
  fi
}

# toe_positionals USAGE_FUNCTION "bash SCRIPT NAME..." ARGS...: the script's positional arguments NAME...
# (DATA, OUT, ...) are given and none is a flag. -h/--help prints the usage (exit 0), and so does a
# call without arguments (exit 2); a missing argument, or a flag in its place, is one line naming it.
toe_positionals() {
  local usage="$1" line="$2" name
  local -a names
  read -ra names <<< "${line#bash * }"
  shift 2
  case "${1:-}" in -h|--help) "$usage"; exit 0 ;; esac
  [ "$#" -gt 0 ] || { "$usage"; exit 2; }
  for name in "${names[@]}"; do
    case "${1:-}" in
      '') toe_fail "$name is missing. usage: $line [extra args] (--help explains)" ;;
      -*) toe_fail "$name is missing: '$1' stands in its place (flags go after the positional arguments). usage:" \
                   "$line [extra args] (--help explains)" ;;
    esac
    shift
  done
}

# toe_dry_run: whether DRY_RUN=1 (print the command only); any value but 1, 0 or none is refused,
# so that a mistyped DRY_RUN=yes never starts the real run
toe_dry_run() {
  case "${DRY_RUN:-0}" in
    1) return 0 ;;
    0) return 1 ;;
    *) toe_fail "DRY_RUN is '$DRY_RUN'. Set DRY_RUN=1 to print the command only, or leave it unset to run it" ;;
  esac
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
  toe_int NPROC "$nproc" 1 "" "Set NPROC to the processes per machine (e.g. the GPUs), or unset it"

  local nnodes="${NNODES:-1}" node_rank="${NODE_RANK:-0}"
  toe_int NNODES "$nnodes" 1 "" "Set NNODES to the number of machines, or unset it for one"
  toe_int NODE_RANK "$node_rank" 0 "$((10#$nnodes - 1))" "Set NODE_RANK to this machine's rank, 0 to NNODES-1"
  nproc=$((10#$nproc)) nnodes=$((10#$nnodes)) node_rank=$((10#$node_rank))
  local master_addr="${MASTER_ADDR:-}"
  if [ -z "$master_addr" ]; then
    [ "$nnodes" -eq 1 ] || toe_fail "set MASTER_ADDR to the address of machine 0 when NNODES > 1"
    master_addr=127.0.0.1
  fi
  local master_port="${MASTER_PORT:-}"
  [ -z "$master_port" ] || toe_int MASTER_PORT "$master_port" 1 65535 "Set MASTER_PORT to a free TCP port, or unset it"
  if [ -z "$master_port" ]; then
    if [ "$nnodes" -gt 1 ]; then
      master_port=29500  # every machine must agree, so no random pick
    else
      master_port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1]); s.close()')"
    fi
  fi

  # no GPU torch can use: the CPU where nvidia-smi is absent too; where it is there, the trainer's
  # --device auto decides (a GPU this torch cannot use is an error that says why, not a CPU run)
  local device_args=()
  [ "$gpus" -gt 0 ] || command -v nvidia-smi >/dev/null 2>&1 || device_args=(--device cpu)
  local resume_args=(--auto-resume) arg
  for arg in "$@"; do
    # --overwrite starts afresh: with --auto-resume it would continue the old run instead
    case "$arg" in --resume|--resume=*|--eval|--auto-resume|--overwrite) resume_args=() ;; esac
  done
  local flags=("${device_args[@]}" "${resume_args[@]}" "$@")

  local launcher=()
  if [ "$nproc" -gt 1 ] || [ "$nnodes" -gt 1 ]; then
    # torchrun through ToE/common/torchrun.py: a clean preemption ends with exit 3 (a user error met
    # after the start, 2) and the trainer's one line, not torchrun's report of a crash and exit 1
    launcher=("$TOE_ROOT/ToE/common/torchrun.py" --nnodes "$nnodes" --node_rank "$node_rank"
              --nproc_per_node "$nproc" --master_addr "$master_addr" --master_port "$master_port")
  fi
  local cmd=("$python" "${launcher[@]}" "$main" "${flags[@]}")
  if toe_dry_run; then
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
  toe_positionals toe_usage "bash run/$SCRIPT DATA OUT" "$@"
  local data="$1" out="$2"
  shift 2
  # checked here too, so the most common mistake reads as one line even under torchrun
  [ -d "$data" ] || toe_dry_run || toe_fail "data folder $data does not exist. Pass the ImageNet folder (with train/ and val/) as the first argument"
  toe_run "$TOE_MAIN" --config "$CONFIG" --data-path "$data" --output_dir "$out" "$@"
}
