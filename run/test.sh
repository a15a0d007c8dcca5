#!/usr/bin/env bash
# The tests: bash run/test.sh [pytest arguments]. Sets up .venv on first use.
#   bash run/test.sh                # everything: 565 tests, 20.5 min on 2 idle CPU cores
#   bash run/test.sh -m "not e2e"   # the unit tier: 436 tests, no training process, about 30 s on 2 idle cores
#   bash run/test.sh -m e2e         # the end-to-end tier: trainers, torchrun, run scripts, demos
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m pytest tests -q "$@"
