#!/usr/bin/env bash
# LV-ViT-S on ImageNet with token labelling and Token Expansion, the published recipe: 4 GPUs x 256
# (1024 in total), AdamW lr 1.6e-3 as given (not batch-scaled), cosine over 300 epochs + 10 cooldown
# epochs at the minimum lr (--epochs 300 --cooldown-epochs 10: 310 in all), 5 warmup epochs, drop
# path 0.1, EMA 0.99992 per step, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, no
# mixup/cutmix, MixToken, token labels on the 14 x 14 grid, mixed precision through torch.amp
# (published: fp16 with --apex-amp; here --amp-dtype auto: bf16 where the GPU computes it natively,
# fp16 with loss scaling elsewhere, off on a CPU); ToE stages at epochs 0/100/200 keeping 40/70/100
# % of the patch tokens (78/136/196), 20 % seeds, 2 expansion steps per stage.
# With another GPU count the maintainers advise scaling the lr linearly (e.g. 4e-4 for a total of 256).
#
#   bash ToE/lvvit/run/imagenet_small_run1.sh /data/imagenet /data/imagenet_labels /runs/lvvit_s [extra args]
#   NPROC=4 ...   DRY_RUN=1 ...   (see ToE/common/launch.sh)
set -euo pipefail
SCRIPT=imagenet_small_run1.sh
RECIPE=(--model lvvit_s --img-size 224 -b 256 --epochs 300 --cooldown-epochs 10 --lr 1.6e-3 --warmup-epochs 5
        --min-lr 1e-5 --weight-decay 0.05 --drop-path 0.1 --model-ema --model-ema-decay 0.99992
        --aa rand-m9-mstd0.5-inc1 --reprob 0.25 --mixup 0 --cutmix 0 --smoothing 0.1 --seed 42
        --token-label-size 14 --dense-weight 1.0 --cls-weight 1.0
        --expansion-step 0 100 200 --keep-rate 0.4 0.7 1.0
        --initialization-keep-rate 0.2 --expansion-multiple-stage 2)
source "$(dirname "${BASH_SOURCE[0]}")/_recipe.sh"
lvvit_launch "$@"
