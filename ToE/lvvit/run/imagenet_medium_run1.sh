#!/usr/bin/env bash
# LV-ViT-M on ImageNet with token labelling and Token Expansion, the published recipe:
# ToE/lvvit/configs/imagenet_medium.yaml (flags after OUT override it).
#
#   bash ToE/lvvit/run/imagenet_medium_run1.sh /data/imagenet /data/imagenet_labels /runs/lvvit_m [extra args]
#   NPROC=4 ...   DRY_RUN=1 ...   (see ToE/common/launch.sh)
set -euo pipefail
SCRIPT=imagenet_medium_run1.sh
CONFIG="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/configs/imagenet_medium.yaml"
source "$(dirname "${BASH_SOURCE[0]}")/_recipe.sh"
lvvit_launch "$@"
