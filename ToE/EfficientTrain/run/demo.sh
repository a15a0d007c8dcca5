#!/usr/bin/env bash
# The EfficientTrain + ToE demo, started by the root run/demo.sh (which sets up .venv, checks
# DEMO_OUT and exports PY, DEMO_OUT, DEMO_EPOCHS): the demo's small DeiT on scikit-learn's
# handwritten digits (32 px, 4 px patches: 64 tokens) through ToE/EfficientTrain/main.py, over the
# published curriculum scaled to 32 px (5 segments: 24, 24, 24, 28, 32 px low-pass crops,
# RandAugment magnitude 1..9 is unused: the digits train without RandAugment, as in the DeiT demo)
# and ToE's 0.6/0.8/1.0 schedule from 0.3 on the same epochs; prints the accuracy, the time, and the
# measured versus FLOP-predicted speed of each phase.
set -euo pipefail
EPOCHS="${DEMO_EPOCHS:-45}"  # divisible by 5 (segments) and 3 (ToE stages)
"$PY" -m ToE.common.digits --out data/digits --size 32
third=$((EPOCHS / 3))
"$PY" ToE/EfficientTrain/main.py \
  --data-path data/digits --output_dir "$DEMO_OUT" --device cpu --num_workers 0 --seed 0 \
  --model vit_tiny_patch16_224 --model-kwargs embed_dim=96 depth=6 num_heads=3 \
  --input-size 32 --patch-size 4 --crop-pct 1.0 \
  --curriculum et --epochs "$EPOCHS" --batch-size 64 --global-batch 64 \
  --lr 1e-3 --unscale-lr --min-lr 1e-5 --warmup-epochs 3 \
  --weight-decay 0.05 --drop-path 0.1 --smoothing 0.1 \
  --aa none --reprob 0 --mixup 0 --cutmix 0 --hflip 0 --scale 0.6 1.0 --no-repeated-aug --no-model-ema \
  --expansion-step 0 "$third" "$((2 * third))" --keep-rate 0.6 0.8 1.0 \
  --initialization-keep-rate 0.3 --expansion-multiple-stage 2 --initialization uniform \
  "$@"
echo
"$PY" -m ToE.EfficientTrain.summary "$DEMO_OUT"
