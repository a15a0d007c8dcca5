#!/usr/bin/env bash
# The YOLOS demo, started by the root run/demo.sh (bash run/demo.sh yolos), which sets up .venv,
# checks DEMO_OUT and exports PY, DEMO_OUT, DEMO_EPOCHS. The recipe is ToE/yolos/configs/demo.yaml
# (a small YOLOS with ToE on digits-det, scikit-learn's digits on 64 px canvases in COCO layout);
# DEMO_EPOCHS scales its stages to another length. Prints pycocotools AP on the 300 val canvases,
# the time, per-stage speed against the FLOP prediction, and draws DEMO_OUT/boxes.png.
set -euo pipefail
"$PY" -m ToE.yolos.digits_det --out data/digits-det
length=()
if [ -n "${DEMO_EPOCHS:-}" ]; then
  # assigned first: a failure stops the demo instead of training the recipe's own length
  flags="$("$PY" -m ToE.common.config demo-flags yolos "$DEMO_EPOCHS")"
  read -ra length <<< "$flags"
fi
start=$(date +%s)
"$PY" ToE/yolos/main.py -c ToE/yolos/configs/demo.yaml --output_dir "$DEMO_OUT" "${length[@]}" "$@"
echo
"$PY" -m ToE.common.summary "$DEMO_OUT"
"$PY" -m ToE.yolos.figure "$DEMO_OUT" --out "$DEMO_OUT/boxes.png" --threshold 0.3
echo "wall time of training + evaluation: $(( $(date +%s) - start )) s"
