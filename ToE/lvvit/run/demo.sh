#!/usr/bin/env bash
# The LV-ViT demo, started by the root run/demo.sh (which sets up .venv, checks DEMO_OUT and exports
# PY, DEMO_OUT, DEMO_EPOCHS): token labelling with Token Expansion on scikit-learn's handwritten digits.
#   1. a small CNN teacher (digits_cnn) trained on the digits at 48 px (12 x 12 dense logit maps);
#   2. token labels written with the generator (recipe ToE/lvvit/configs/demo_labels.yaml);
#   3. lvvit_digits with token labels, MixToken and ToE (recipe ToE/lvvit/configs/demo.yaml;
#      DEMO_EPOCHS scales its stages to another length);
#   4. the summary: accuracy, time, measured versus FLOP-predicted speed per stage.
# Everything is written under DEMO_OUT (teacher weights and labels included).
set -euo pipefail
"$PY" -m ToE.common.digits --out data/digits --size 32
"$PY" -m ToE.lvvit.train_teacher --data-path data/digits --out "$DEMO_OUT/teacher.pth" --img-size 48 --epochs 6
"$PY" -m ToE.lvvit.generate_label -c ToE/lvvit/configs/demo_labels.yaml --checkpoint "$DEMO_OUT/teacher.pth" \
  --data-path data/digits --out "$DEMO_OUT/labels"
length=()
if [ -n "${DEMO_EPOCHS:-}" ]; then
  # assigned first: a failure stops the demo instead of training the recipe's own length
  flags="$("$PY" -m ToE.common.config demo-flags lvvit "$DEMO_EPOCHS")"
  read -ra length <<< "$flags"
fi
"$PY" ToE/lvvit/main.py -c ToE/lvvit/configs/demo.yaml --token-label-data "$DEMO_OUT/labels" \
  --output_dir "$DEMO_OUT/run" "${length[@]}" "$@"
echo
"$PY" -m ToE.common.summary "$DEMO_OUT/run"
