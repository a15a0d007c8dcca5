#!/usr/bin/env bash
# EfficientTrain + ToE, DeiT-Tiny on ImageNet, the published recipe:
# ToE/EfficientTrain/configs/imagenet_tiny.yaml (flags after OUT override it).
#
#   bash ToE/EfficientTrain/run/imagenet_tiny_run1.sh /data/imagenet /runs/et_tiny [extra main.py args]
#   NPROC=8 ...   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 ...   DRY_RUN=1 ...   (see ToE/common/launch.sh)
set -euo pipefail
SCRIPT=imagenet_tiny_run1.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOE_MAIN="$HERE/main.py" CONFIG="$HERE/configs/imagenet_tiny.yaml"
source "$HERE/../common/launch.sh"
toe_launch "$@"
