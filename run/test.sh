#!/usr/bin/env bash
# The tests: bash run/test.sh [pytest arguments]. Sets up .venv on first use.
#   bash run/test.sh                # everything (about 10 minutes on 2 CPU cores)
#   bash run/test.sh -m "not e2e"   # the unit tier: no training process, under a minute
#   bash run/test.sh -m e2e         # the end-to-end tier: trainers, torchrun, run scripts, demos
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m pytest tests -q "$@"
