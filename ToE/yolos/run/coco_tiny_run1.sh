#!/usr/bin/env bash
# YOLOS-Ti on COCO with Token Expansion, the published recipe: DeiT-Ti backbone from ImageNet
# weights on disk, 300 epochs, 2 images per GPU (16 on 8 GPUs), AdamW lr 5e-5 (all groups),
# weight decay 1e-4, clipping 0.1, cosine to 1e-7 (stepped as published: epochs 0 and 1 at the
# base lr), 100 detection tokens, position table on the 800 x 1333 grid, no mid-layer tables,
# training short sides 256..608 (step 16, long side <= 1013), evaluation at 512; ToE stages at
# epochs 5/100/200 keeping 50/75/100 % of the patch tokens, 25 % seeds, 2 expansion steps.
#
#   bash ToE/yolos/run/coco_tiny_run1.sh /data/coco /runs/yolos_ti deit_tiny_patch16_224-a1311bcf.pth [flags]
#   NPROC=8 bash ...   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash ...   DRY_RUN=1 bash ...
# (launcher: ToE/common/launch.sh; running the same command again continues the run: --auto-resume)
set -euo pipefail
SCRIPT=coco_tiny_run1.sh
RECIPE=(--backbone_name deit_tiny_patch16_224 --batch_size 2 --lr 5e-5 --weight_decay 1e-4 --clip_max_norm 0.1
        --epochs 300 --min-lr 1e-7 --warmup-epochs 0 --det_token_num 100 --init_pe_size 800 1333
        --scales $(seq -s ' ' 256 16 608) --max-size 1013 --eval_size 512 --num_workers 2 --seed 42
        --expansion-step 5 100 200 --keep-rate 0.5 0.75 1.0
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
