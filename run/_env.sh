# Sourced by run/demo.sh, run/test.sh and .ci/run: create or reuse .venv at the repository root and
# install the project into it. Reinstalls only when pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.toe-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
# the dev tools too: a .venv made before they were listed gets them
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || [ ! -x "$VENV/bin/ruff" ] || [ ! -x "$VENV/bin/pytest" ]; then
  if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    # These two versions install from this machine's local wheel store (about a minute).
    echo "[setup] installing torch and torchvision"
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
  fi
  echo "[setup] installing the project and its dependencies into .venv"
  "$PY" -m pip install -q -e "$ROOT[dev]"  # [dev]: pytest and ruff
  echo "$WANT" > "$STAMP"
fi
cd "$ROOT"
