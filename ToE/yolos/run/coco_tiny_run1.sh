#!/usr/bin/env bash
# YOLOS-Ti on COCO with Token Expansion, the published recipe: ToE/yolos/configs/coco_tiny.yaml
# (flags after INIT_CHECKPOINT override it).
#
#   bash ToE/yolos/run/coco_tiny_run1.sh /data/coco /runs/yolos_ti deit_tiny_patch16_224-a1311bcf.pth [flags]
#   NPROC=8 bash ...   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash ...   DRY_RUN=1 bash ...
# (launcher: ToE/common/launch.sh; running the same command again continues the run: --auto-resume)
set -euo pipefail
SCRIPT=coco_tiny_run1.sh
CONFIG="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/configs/coco_tiny.yaml"
source "$(dirname "${BASH_SOURCE[0]}")/../../common/launch.sh"
usage() {
  echo "usage: bash ToE/yolos/run/$SCRIPT COCO OUT INIT_CHECKPOINT [extra main.py args]" >&2
  echo "  COCO: train2017/, val2017/, annotations/instances_{train,val}2017.json; OUT: checkpoints and logs;" >&2
  echo "  INIT_CHECKPOINT: the backbone's ImageNet weights (a DeiT .pth). Environment: ToE/common/launch.sh" >&2
}
toe_positionals usage "bash ToE/yolos/run/$SCRIPT COCO OUT INIT_CHECKPOINT" "$@"
COCO="$1" OUT="$2" INIT="$3"
shift 3
[ -d "$COCO" ] || toe_dry_run || toe_fail "COCO folder $COCO does not exist. Pass the folder with train2017/, val2017/ and annotations/ as the first argument"
[ -f "$INIT" ] || toe_dry_run || toe_fail "init checkpoint $INIT does not exist. Pass the DeiT ImageNet weights as the third argument"
toe_run "$(dirname "${BASH_SOURCE[0]}")/../main.py" --config "$CONFIG" --coco_path "$COCO" --output_dir "$OUT" \
  --init-checkpoint "$INIT" "$@"
