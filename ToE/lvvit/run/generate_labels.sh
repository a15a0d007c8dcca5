#!/usr/bin/env bash
# Token labels for ImageNet in the published format, as the published label set was made (the
# recipe: ToE/lvvit/configs/generate_labels.yaml, teacher dm_nfnet_f6 at 576 px, batch 32). The
# teacher's weights come from a file on disk (nothing is downloaded):
#
#   bash ToE/lvvit/run/generate_labels.sh /data/imagenet /ckpt/dm_nfnet_f6.pth /data/imagenet_labels [extra args]
#   e.g. extra args: --model another_timm_name --img-size 448 -b 64
#
# Relative paths (the three arguments and any in the extra args) are read from the folder you run
# this from; the generator checks them all (DATA/train/<class>/ images, the checkpoint file, an OUT
# that holds no files) before it loads the teacher or writes a label.
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
source "$ROOT_DIR/ToE/common/launch.sh"  # toe_positionals, toe_python
usage() {
  echo "usage: bash ToE/lvvit/run/generate_labels.sh DATA TEACHER_CHECKPOINT OUT [extra generate_label args]" >&2
  echo "  DATA: ImageNet folder with train/<class>/; TEACHER_CHECKPOINT: the teacher's state_dict on disk;" >&2
  echo "  OUT: the label folder to write (LABELS of the LV-ViT run scripts). PYTHON: the interpreter" >&2
}
toe_positionals usage "bash ToE/lvvit/run/generate_labels.sh DATA TEACHER_CHECKPOINT OUT" "$@"
data="$1" checkpoint="$2" out="$3"
shift 3
# no cd: the package is found through PYTHONPATH, so the user's paths keep their meaning
export PYTHONPATH="$ROOT_DIR${PYTHONPATH:+:$PYTHONPATH}"
exec "$(toe_python)" -m ToE.lvvit.generate_label \
  --config "$ROOT_DIR/ToE/lvvit/configs/generate_labels.yaml" --checkpoint "$checkpoint" --data-path "$data" \
  --out "$out" "$@"
