#!/usr/bin/env bash
# DeiT-Base on ImageNet with Token Expansion, the published recipe: 300 epochs, seed 3407,
# ToE stages at epochs 0/100/200 keeping 50/75/100 % of the tokens, 25 % seed tokens,
# 2 expansion steps per stage; DeiT's defaults otherwise (AdamW, lr 5e-4 x total batch / 512,
# cosine, 5 warmup epochs, mixup/cutmix, RandAugment, random erasing, EMA).
# DeiT-Base: 128 images per GPU (DeiT's 1024 in total on 8 GPUs; DeiT itself ran 16 x 64).
# The learning rate scales with the total batch, so other GPU counts train at the same lr per image.
#
#   bash run/imagenet_base_run1.sh /data/imagenet /runs/base [extra main.py args]
#   NPROC=8 bash run/imagenet_base_run1.sh ...                     # processes per machine
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash run/imagenet_base_run1.sh ...   # on each machine
#   DRY_RUN=1 bash run/imagenet_base_run1.sh ...                  # print the torchrun command
set -euo pipefail
SCRIPT=imagenet_base_run1.sh
RECIPE=(--model deit_base_patch16_224 --batch-size 128 --epochs 300 --seed 3407
        --expansion-step 0 100 200 --keep-rate 0.5 0.75 1.0
        --initialization-keep-rate 0.25 --expansion-multiple-stage 2)
TOE_MAIN="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/main.py"
source "$(dirname "${BASH_SOURCE[0]}")/../../common/launch.sh"
toe_launch "$@"
