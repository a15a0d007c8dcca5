# Shared part of the LV-ViT ImageNet run scripts; sourced, not run. A run script sets SCRIPT and
# CONFIG (its recipe file), then calls: lvvit_launch DATA LABELS OUT [extra main.py args]
# The launcher is the shared one (ToE/common/launch.sh: NPROC, NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT, DRY_RUN=1), pointed at ToE/lvvit/main.py.
TOE_MAIN="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/main.py"
source "$(dirname "${BASH_SOURCE[0]}")/../../common/launch.sh"

lvvit_usage() {
  echo "usage: bash ToE/lvvit/run/$SCRIPT DATA LABELS OUT [extra main.py args]" >&2
  echo "  DATA ImageNet folder (train/ and val/), LABELS token-label folder (ToE/lvvit/run/generate_labels.sh)," >&2
  echo "  OUT output folder. Environment: NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, DRY_RUN=1" >&2
}

lvvit_launch() {
  toe_positionals lvvit_usage "bash ToE/lvvit/run/$SCRIPT DATA LABELS OUT" "$@"
  local data="$1" labels="$2" out="$3"
  shift 3
  [ -d "$labels" ] || toe_dry_run || toe_fail "token-label folder $labels does not exist. Write it with ToE/lvvit/run/generate_labels.sh, or pass the right folder as the second argument"
  toe_launch "$data" "$out" --token-label --token-label-data "$labels" "$@"
}
