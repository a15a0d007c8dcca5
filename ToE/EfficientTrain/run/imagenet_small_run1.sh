#!/usr/bin/env bash
# DeiT-Small on ImageNet with EfficientTrain + Token Expansion, the published recipe in one process:
# 300 epochs in 5 segments (low-pass crops 160, 160, 160, 192, 224 px; RandAugment magnitude 1, 3,
# 5, 7, 9), a global batch of 4096 by gradient accumulation (256 per process at 224 px, 512 below),
# lr 4e-3 for that batch (not rescaled), 20 warmup epochs, per-update cosine to 1e-6, AdamW,
# weight decay 0.05, clip 5.0, drop path 0.1, no EMA; ToE stages at epochs 0/100/200 keeping
# 60/80/100 % of the tokens of the current grid from 30 % seeds, 2 expansion steps per stage.
#
#   bash ToE/EfficientTrain/run/imagenet_small_run1.sh /data/imagenet /runs/et_small [extra main.py args]
#   NPROC=8 bash ToE/EfficientTrain/run/imagenet_small_run1.sh ...      # processes per machine (8: 512 x 8 x 1)
#   DRY_RUN=1 bash ToE/EfficientTrain/run/imagenet_small_run1.sh ...   # print the torchrun command
# The launcher is the shared ToE/common/launch.sh (NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT;
# --auto-resume: the same command again continues the run).
set -euo pipefail
SCRIPT=imagenet_small_run1.sh
TOE_MAIN="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/main.py"
RECIPE=(--model deit_small_patch16_224 --epochs 300 --batch-size 256 --global-batch 4096 --curriculum et --low-pass fft
        --lr 4e-3 --unscale-lr --warmup-epochs 20 --warmup-lr 0 --min-lr 1e-6 --sched cosine
        --opt adamw --weight-decay 0.05 --clip-grad 5.0 --drop-path 0.1 --no-model-ema --no-repeated-aug
        --aa rand-m9-mstd0.5-inc1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --seed 0
        --expansion-step 0 100 200 --keep-rate 0.6 0.8 1.0
        --initialization-keep-rate 0.3 --expansion-multiple-stage 2)
source "$(dirname "${BASH_SOURCE[0]}")/../../common/launch.sh"
toe_launch "$@"
