#!/usr/bin/env bash
# Token labels for ImageNet in the published format, as the published label set was made (the
# recipe: ToE/lvvit/configs/generate_labels.yaml, teacher dm_nfnet_f6 at 576 px, batch 32). The
# teacher's weights come from a file on disk (nothing is downloaded):
#
#   bash ToE/lvvit/run/generate_labels.sh /data/imagenet /ckpt/dm_nfnet_f6.pth /data/imagenet_labels [extra args]
#   e.g. extra args: --model another_timm_name --img-size 448 -b 64
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: bash ToE/lvvit/run/generate_labels.sh DATA TEACHER_CHECKPOINT OUT [extra generate_label args]" >&2
  exit 2
fi
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
PYTHON="${PYTHON:-$([ -x "$ROOT_DIR/.venv/bin/python" ] && echo "$ROOT_DIR/.venv/bin/python" || echo python3)}"
data="$1" checkpoint="$2" out="$3"
shift 3
cd "$ROOT_DIR"
exec "$PYTHON" -m ToE.lvvit.generate_label --config ToE/lvvit/configs/generate_labels.yaml \
  --checkpoint "$checkpoint" --data-path "$data" --out "$out" "$@"
