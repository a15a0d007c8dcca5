#!/usr/bin/env bash
# The LV-ViT demo, started by the root run/demo.sh (which sets up .venv, checks DEMO_OUT and exports
# PY, DEMO_OUT, DEMO_EPOCHS): token labelling with Token Expansion on scikit-learn's handwritten digits.
#   1. a small CNN teacher (digits_cnn) trained on the digits at 48 px (12 x 12 dense logit maps);
#   2. token labels written with the generator, python -m ToE.lvvit.generate_label (published format);
#   3. lvvit_digits (32 px, 4 px patches: 8 x 8 = 64 tokens) trained with token labels, MixToken and
#      ToE over three stages (40 %, 70 %, then all patch tokens; 20 % seeds, 2 steps per stage);
#   4. the summary: accuracy, time, measured versus FLOP-predicted speed per stage.
# Everything is written under DEMO_OUT (teacher weights and labels included).
set -euo pipefail
EPOCHS="${DEMO_EPOCHS:-30}"
"$PY" -m ToE.common.digits --out data/digits --size 32
"$PY" -m ToE.lvvit.train_teacher --data-path data/digits --out "$DEMO_OUT/teacher.pth" --img-size 48 --epochs 6
"$PY" -m ToE.lvvit.generate_label --model digits_cnn --checkpoint "$DEMO_OUT/teacher.pth" \
  --data-path data/digits --out "$DEMO_OUT/labels" --img-size 48 -b 100 --device cpu --num-workers 0
third=$((EPOCHS / 3))
warmup=$(( EPOCHS >= 12 ? 3 : 0 ))  # a short smoke run (DEMO_EPOCHS below 12) has no warmup
"$PY" ToE/lvvit/main.py \
  --data-path data/digits --output_dir "$DEMO_OUT/run" --device cpu --num_workers 0 --seed 0 \
  --model lvvit_digits --img-size 32 --crop-pct 1.0 \
  --token-label --token-label-data "$DEMO_OUT/labels" --token-label-size 8 \
  --epochs "$EPOCHS" --cooldown-epochs 0 -b 64 --lr 1e-3 --min-lr 1e-5 --warmup-epochs "$warmup" \
  --weight-decay 0.05 --drop-path 0.1 --aa rand-m9-mstd0.5-inc1 --reprob 0.25 --hflip 0 --scale 0.35 1.0 \
  --model-ema-decay 0.99 \
  --expansion-step 0 "$third" "$((2 * third))" --keep-rate 0.4 0.7 1.0 \
  --initialization-keep-rate 0.2 --expansion-multiple-stage 2 --initialization uniform \
  "$@"
# EMA 0.99 (tau = 100 steps, about 4 epochs): the published 0.99992 would keep ~90 % of the random
# initialisation over the demo's ~800 steps. No hflip: digits are not mirror-symmetric. Uniform seeds:
# on an 8 x 8 grid the published stride rule puts every seed in the top rows.
echo
"$PY" -m ToE.common.summary "$DEMO_OUT/run"
