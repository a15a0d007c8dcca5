#!/usr/bin/env bash
# The main job on embedded real data, for one trainer:
#   bash run/demo.sh [deit|lvvit|et|yolos] [extra flags for that trainer's main.py]
# deit (the default): a small DeiT with Token Expansion on scikit-learn's handwritten digits,
# about 4.5 minutes on 2 CPU cores. Each trainer's demo lives in ToE/<trainer>/run/demo.sh and
# prints its result and per-stage speed the same way.
#   DEMO_EPOCHS=N (the trainer's default length) and DEMO_OUT=folder (default runs/demo, or
#   runs/demo-<trainer> for the others). DEMO_OUT is replaced on every run only if an earlier
#   demo made it (it holds .toe-demo); a folder of anything else is never deleted.
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRAINER=deit
case "${1:-}" in
  deit|lvvit|et|yolos) TRAINER="$1"; shift ;;
  ''|-*) ;;
  *) echo "error: unknown trainer '$1'. Usage: bash run/demo.sh [deit|lvvit|et|yolos] [main.py flags]" >&2; exit 2 ;;
esac
declare -A FOLDER=([deit]=deit [lvvit]=lvvit [et]=EfficientTrain [yolos]=yolos)
SCRIPT="$ROOT_DIR/ToE/${FOLDER[$TRAINER]}/run/demo.sh"
if [ ! -f "$SCRIPT" ]; then
  echo "error: the $TRAINER trainer has no demo yet ($SCRIPT is missing). Run: bash run/demo.sh deit" >&2
  exit 2
fi
source "$ROOT_DIR/run/_env.sh"
if [ "$TRAINER" = deit ]; then DEFAULT_OUT=runs/demo; else DEFAULT_OUT="runs/demo-$TRAINER"; fi
OUT="${DEMO_OUT:-$DEFAULT_OUT}"
if [ -e "$OUT" ]; then
  if [ -f "$OUT/.toe-demo" ]; then
    rm -rf "$OUT"
  elif [ -n "$(ls -A "$OUT" 2>/dev/null)" ] || [ ! -d "$OUT" ]; then
    echo "error: DEMO_OUT=$OUT exists and was not made by run/demo.sh. Pick another DEMO_OUT (the demo never deletes a folder it did not create)" >&2
    exit 2
  fi
fi
mkdir -p "$OUT" && touch "$OUT/.toe-demo"
export PY DEMO_OUT="$OUT"
[ -z "${DEMO_EPOCHS:-}" ] || export DEMO_EPOCHS
exec bash "$SCRIPT" "$@"
