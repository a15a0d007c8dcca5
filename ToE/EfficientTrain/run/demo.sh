#!/usr/bin/env bash
# The EfficientTrain + ToE demo, started by the root run/demo.sh (which sets up .venv, checks
# DEMO_OUT and exports PY, DEMO_OUT, DEMO_EPOCHS). The recipe is ToE/EfficientTrain/configs/demo.yaml
# (the DeiT demo's model over the published curriculum scaled to 32 px, with ToE); DEMO_EPOCHS scales
# its stages to another length. Prints the accuracy, the time, and the measured versus FLOP-predicted
# speed of each phase.
set -euo pipefail
"$PY" -m ToE.common.digits --out data/digits --size 32
length=()
if [ -n "${DEMO_EPOCHS:-}" ]; then
  # assigned first: a failure stops the demo instead of training the recipe's own length
  flags="$("$PY" -m ToE.common.config demo-flags et "$DEMO_EPOCHS")"
  read -ra length <<< "$flags"
fi
"$PY" ToE/EfficientTrain/main.py -c ToE/EfficientTrain/configs/demo.yaml --output_dir "$DEMO_OUT" "${length[@]}" "$@"
echo
"$PY" -m ToE.common.summary "$DEMO_OUT"
