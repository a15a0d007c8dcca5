#!/usr/bin/env bash
# The YOLOS demo, started by the root run/demo.sh (bash run/demo.sh yolos), which sets up .venv,
# checks DEMO_OUT and exports PY, DEMO_OUT, DEMO_EPOCHS: a small YOLOS detector with Token
# Expansion on "digits-det" (scikit-learn's real handwritten digits on 64 px canvases, each on the
# 8 px patch grid, COCO layout, ToE.yolos.digits_det), trained from scratch through
# ToE/yolos/main.py over three ToE stages (50 %, 75 %, then all patch tokens after block 0; the 4
# detection tokens always kept), then pycocotools AP on the 300 val canvases (all tokens), the
# time, per-stage speed against the FLOP prediction, and a figure of predicted boxes
# (DEMO_OUT/boxes.png). Choices for a 20-epoch CPU run (measured: bench/results/yolos_demo_trials.md):
# the position table starts as a 2-D sin-cos table (timm's std-0.02 init predicts one mean box for
# thousands of steps); 4 detection tokens for at most 3 digits; one scale (64 px, no random crop),
# because resizing would move the digits off the patch grid, where the digit identity is not learned
# in this budget; clip 1.0. A digit classifier as the backbone's start did not help.
set -euo pipefail
EPOCHS="${DEMO_EPOCHS:-20}"
"$PY" -m ToE.yolos.digits_det --out data/digits-det
# stage 0 = epoch 0 (full tokens), then 50 % / 75 % / 100 % of the patch tokens in thirds of the rest
s2=$(( 1 + (EPOCHS - 1) / 3 )); s3=$(( 1 + 2 * (EPOCHS - 1) / 3 ))
[ "$s2" -gt 1 ] || s2=2; [ "$s3" -gt "$s2" ] || s3=$((s2 + 1))
start=$(date +%s)
"$PY" ToE/yolos/main.py \
  --coco_path data/digits-det --output_dir "$DEMO_OUT" --device cpu --num_workers 0 --seed 0 \
  --backbone_name vit_tiny_patch16_224 --backbone-kwargs img_size=64 patch_size=8 embed_dim=96 depth=4 num_heads=3 \
  --det_token_num 4 --init_pe_size 64 64 --pos-init-sincos 2 \
  --scales 64 --max-size 64 --select-scales 64 --crop-size 64 64 --hflip 0 --eval_size 64 \
  --epochs "$EPOCHS" --batch_size 8 --lr 5e-4 --min-lr 1e-5 --weight_decay 1e-4 --clip_max_norm 1.0 \
  --expansion-step 1 "$s2" "$s3" --keep-rate 0.5 0.75 1.0 \
  --initialization-keep-rate 0.25 --expansion-multiple-stage 2 --log-interval 20 \
  "$@"
echo
"$PY" -m ToE.yolos.summary "$DEMO_OUT"
"$PY" -m ToE.yolos.figure "$DEMO_OUT" --out "$DEMO_OUT/boxes.png" --threshold 0.3
echo "wall time of training + evaluation: $(( $(date +%s) - start )) s"
