#!/usr/bin/env bash
# YOLOS-S on COCO with Token Expansion, the published recipe: DeiT-S backbone from ImageNet
# weights on disk, 150 epochs, 1 image per GPU (8 on 8 GPUs), AdamW lr 2.5e-5 (all groups),
# weight decay 1e-4, clipping 0.1, cosine to 1e-7 (stepped as published), 100 detection tokens,
# position table and mid-layer tables on the 512 x 864 grid, training short sides 480..800
# (step 16, long side <= 1333), evaluation at 800; ToE stages at epochs 5/50/100 keeping
# 50/75/100 % of the patch tokens, 25 % seeds, 2 expansion steps. Unlike the published code the
# mid-layer tables are gathered for any batch size, so --batch_size 2 also works with ToE.
#
#   bash ToE/yolos/run/coco_small_run1.sh /data/coco /runs/yolos_s deit_small_patch16_224-cd65a155.pth [flags]
#   NPROC=8 bash ...   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash ...   DRY_RUN=1 bash ...
# (launcher: ToE/common/launch.sh; running the same command again continues the run: --auto-resume)
set -euo pipefail
SCRIPT=coco_small_run1.sh
RECIPE=(--backbone_name deit_small_patch16_224 --batch_size 1 --lr 2.5e-5 --weight_decay 1e-4 --clip_max_norm 0.1
        --epochs 150 --min-lr 1e-7 --warmup-epochs 0 --det_token_num 100 --init_pe_size 512 864
        --mid_pe_size 512 864 --scales $(seq -s ' ' 480 16 800) --max-size 1333 --eval_size 800 --num_workers 8
        --seed 42 --expansion-step 5 50 100 --keep-rate 0.5 0.75 1.0
        --initialization-keep-rate 0.25 --expansion-multiple-stage 2)
source "$(dirname "${BASH_SOURCE[0]}")/../../common/launch.sh"
if [ "$#" -lt 3 ] || [ -z "$1" ] || [ -z "$2" ] || [ -z "$3" ] || [[ "$1" == -* ]]; then
  case "${1:-}" in -h|--help) code=0 ;; *) code=2 ;; esac
  echo "usage: bash ToE/yolos/run/$SCRIPT COCO OUT INIT_CHECKPOINT [extra main.py args]" >&2
  echo "  COCO: train2017/, val2017/, annotations/instances_{train,val}2017.json; OUT: checkpoints and logs;" >&2
  echo "  INIT_CHECKPOINT: the backbone's ImageNet weights (a DeiT .pth). Environment: ToE/common/launch.sh" >&2
  exit "$code"
fi
COCO="$1" OUT="$2" INIT="$3"
shift 3
[ -d "$COCO" ] || [ "${DRY_RUN:-0}" = "1" ] || toe_fail "COCO folder $COCO does not exist. Pass the folder with train2017/, val2017/ and annotations/ as the first argument"
[ -f "$INIT" ] || [ "${DRY_RUN:-0}" = "1" ] || toe_fail "init checkpoint $INIT does not exist. Pass the DeiT ImageNet weights as the third argument"
toe_run "$(dirname "${BASH_SOURCE[0]}")/../main.py" "${RECIPE[@]}" --coco_path "$COCO" --output_dir "$OUT" \
  --init-checkpoint "$INIT" "$@"
