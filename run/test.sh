#!/usr/bin/env bash
# The tests: bash run/test.sh [pytest arguments]. Sets up .venv on first use.
#   bash run/test.sh                # everything: about 1,000 tests, 13.5 min on 2 CPU cores (two workers)
#   bash run/test.sh -m "not e2e"   # the unit tier: about 770 tests, no training process, about 40 s
#   bash run/test.sh -m e2e         # the end-to-end tier: trainers, torchrun, run scripts, demos
#   bash run/test.sh -n 0           # in one process (pdb, -x); by default one pytest-xdist worker per core, at most 8
# The DALI and Hugging Face tests need the optional extras (.ci/run installs them): without them the
# run ends by naming the tests it skipped and the command that adds them (tests/conftest.py).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m pytest tests -q -n auto --maxprocesses 8 "$@"
