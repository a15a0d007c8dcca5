#!/usr/bin/env bash
# DeiT-Tiny on ImageNet with Token Expansion, the published recipe: ToE/deit/configs/imagenet_tiny.yaml
# (flags after OUT override it).
#
#   bash run/imagenet_tiny_run1.sh /data/imagenet /runs/tiny [extra main.py args]
#   bash run/imagenet_tiny_run1.sh DATA OUT --epochs 1                 # smoke test of the recipe
#   NPROC=8 bash run/imagenet_tiny_run1.sh ...                     # processes per machine
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash run/imagenet_tiny_run1.sh ...   # on each machine
#   DRY_RUN=1 bash run/imagenet_tiny_run1.sh ...                  # print the torchrun command
set -euo pipefail
SCRIPT=imagenet_tiny_run1.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOE_MAIN="$HERE/main.py" CONFIG="$HERE/configs/imagenet_tiny.yaml"
source "$HERE/../common/launch.sh"
toe_launch "$@"
