#!/usr/bin/env bash
# EfficientTrain + ToE, DeiT-Small on ImageNet, the published recipe:
# ToE/EfficientTrain/configs/imagenet_small.yaml (flags after OUT override it).
#
#   bash ToE/EfficientTrain/run/imagenet_small_run1.sh /data/imagenet /runs/et_small [extra main.py args]
#   NPROC=8 ...   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 ...   DRY_RUN=1 ...   (see ToE/common/launch.sh)
set -euo pipefail
SCRIPT=imagenet_small_run1.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOE_MAIN="$HERE/main.py" CONFIG="$HERE/configs/imagenet_small.yaml"
source "$HERE/../common/launch.sh"
toe_launch "$@"
