#!/usr/bin/env bash
# The DeiT demo, started by the root run/demo.sh (which sets up .venv, checks DEMO_OUT and exports
# PY, DEMO_OUT, DEMO_EPOCHS). The recipe is ToE/deit/configs/demo.yaml (a small DeiT with ToE on
# scikit-learn's handwritten digits); DEMO_EPOCHS scales its stages to another length. Prints the
# accuracy, the time, and the measured versus FLOP-predicted speed of each stage.
set -euo pipefail
"$PY" -m ToE.common.digits --out data/digits --size 32
length=()
if [ -n "${DEMO_EPOCHS:-}" ]; then
  # assigned first: a failure stops the demo instead of training the recipe's own length
  flags="$("$PY" -m ToE.common.config demo-flags deit "$DEMO_EPOCHS")"
  read -ra length <<< "$flags"
fi
"$PY" ToE/deit/main.py -c ToE/deit/configs/demo.yaml --output_dir "$DEMO_OUT" "${length[@]}" "$@"
echo
"$PY" -m ToE.common.summary "$DEMO_OUT"
