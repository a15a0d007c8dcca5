#!/usr/bin/env bash
# The main job on embedded real data, for one trainer:
#   bash run/demo.sh [TRAINER] [extra flags for that trainer's main.py]   (TRAINER: a name of ToE/trainers.py)
# deit (the default): a small DeiT with Token Expansion on scikit-learn's handwritten digits,
# about 4.5 minutes on 2 CPU cores. Each trainer's demo lives in ToE/<trainer>/run/demo.sh and
# prints its result and per-stage speed the same way.
#   DEMO_EPOCHS=N (the trainer's default length) and DEMO_OUT=folder (default runs/demo, or
#   runs/demo-<trainer> for the others, in the repository; a relative DEMO_OUT is read from the folder
#   you run this from). DEMO_OUT is replaced on every run only if an earlier demo made it (it holds
#   .toe-demo); a folder of anything else is never deleted. The extra flags go to main.py, which runs
#   in the repository root (a relative path in them is read from there); the output folder is
#   DEMO_OUT, not --output_dir, and the length DEMO_EPOCHS, not --epochs.
# Every argument and variable is checked before anything is set up, deleted or trained.
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT_DIR/ToE/common/launch.sh"  # the scripts' shared argument checks (toe_fail, toe_int)
# the trainers and their folders, from their one list (ToE/trainers.py: standard library only, so the
# system python3 reads it before _env.sh has made .venv)
LIST_PY="$ROOT_DIR/.venv/bin/python"
[ -x "$LIST_PY" ] || LIST_PY=python3
NAMES=()
declare -A FOLDER=()
while read -r name folder; do
  NAMES+=("$name")
  FOLDER["$name"]="$folder"
done < <("$LIST_PY" "$ROOT_DIR/ToE/trainers.py")
[ "${#NAMES[@]}" -gt 0 ] || toe_fail "cannot read the trainers from $ROOT_DIR/ToE/trainers.py. Run it with python3 to see why"
USAGE="Usage: bash run/demo.sh [$(IFS='|'; echo "${NAMES[*]}")] [main.py flags]"
TRAINER=deit
case "${1:-}" in
  ''|-*) ;;
  *)
    for name in "${NAMES[@]}"; do
      [ "$1" != "$name" ] || TRAINER="$1"
    done
    [ "$TRAINER" = "$1" ] || toe_fail "unknown trainer '$1'. $USAGE"
    shift ;;
esac
SCRIPT="$ROOT_DIR/ToE/${FOLDER[$TRAINER]}/run/demo.sh"
[ -f "$SCRIPT" ] || toe_fail "the $TRAINER trainer has no demo yet ($SCRIPT is missing). Run: bash run/demo.sh deit"
if [ -n "${DEMO_EPOCHS:-}" ]; then
  toe_int DEMO_EPOCHS "$DEMO_EPOCHS" 1 "" \
    "Set DEMO_EPOCHS to the epochs to train (e.g. DEMO_EPOCHS=3 for a short run), or unset it for the recipe's length"
  DEMO_EPOCHS=$((10#$DEMO_EPOCHS))
fi
for arg in "$@"; do
  case "$arg" in
    --output_dir|--output_dir=*|--output-dir|--output-dir=*)
      toe_fail "the demo writes to DEMO_OUT, so $arg would leave its summary without a run." \
               "Set DEMO_OUT=folder instead" ;;
    --epochs|--epochs=*)
      [ -z "${DEMO_EPOCHS:-}" ] || toe_fail "DEMO_EPOCHS=$DEMO_EPOCHS and $arg both set the length (the stages" \
                                            "follow DEMO_EPOCHS). Pass one of them"
      ;;
  esac
done
if [ -n "${DEMO_OUT:-}" ]; then
  # read from where the user is, before _env.sh moves to the repository
  case "$DEMO_OUT" in
    /*) ;;
    -*) toe_fail "DEMO_OUT=$DEMO_OUT looks like a flag. Set DEMO_OUT to the output folder" ;;
    *) [ "$(pwd)" = "$ROOT_DIR" ] || DEMO_OUT="$(pwd)/$DEMO_OUT" ;;
  esac
fi
source "$ROOT_DIR/run/_env.sh"
if [ "$TRAINER" = deit ]; then DEFAULT_OUT=runs/demo; else DEFAULT_OUT="runs/demo-$TRAINER"; fi
OUT="${DEMO_OUT:-$DEFAULT_OUT}"
if [ -e "$OUT" ]; then
  if [ -f "$OUT/.toe-demo" ]; then
    "$PY" -m ToE.common.lock "$OUT" --flag DEMO_OUT || exit 2  # a demo still running there: refused, kept
    rm -rf "$OUT"
  elif [ -n "$(ls -A "$OUT" 2>/dev/null)" ] || [ ! -d "$OUT" ]; then
    toe_fail "DEMO_OUT=$OUT exists and was not made by run/demo.sh. Pick another DEMO_OUT (the demo never deletes" \
             "a folder it did not create)"
  fi
fi
mkdir -p "$OUT" && touch "$OUT/.toe-demo"
export PY DEMO_OUT="$OUT"
[ -z "${DEMO_EPOCHS:-}" ] || export DEMO_EPOCHS
exec bash "$SCRIPT" "$@"
