#!/usr/bin/env bash
# The tests: bash run/test.sh [pytest arguments]. Sets up .venv on first use.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m pytest tests -q "$@"
