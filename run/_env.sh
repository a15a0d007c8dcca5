# Sourced by run/demo.sh, run/test.sh, run/gpu_check.sh and .ci/run: create or reuse .venv at the repository
# root and install the project into it. Reinstalls only when pyproject.toml changed, and torch only
# when TOE_TORCH / TOE_TORCH_INDEX ask for another build (below).
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
# The torch build, for the NVIDIA driver of the machine (README: which torch build):
#   TOE_TORCH=VERSION        e.g. 2.5.1 (default 2.14.1, with torchvision 0.29.1); its torchvision follows
#   TOE_TORCH_INDEX=URL      the wheel index, e.g. https://download.pytorch.org/whl/cu121 (default: PyPI)
# Set, they (re)install torch and torchvision when the installed pair came from other values (a build
# of the same version from another index included); unset, the installed torch is kept (torch
# 2.14.1 from PyPI is installed where there is none).
TORCH_STAMP="$VENV/.toe-torch"
TORCH_WANT="${TOE_TORCH:-}|${TOE_TORCH_INDEX:-}"
if [ -n "${TOE_TORCH:-}" ] && ! [[ "$TOE_TORCH" =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]]; then
  echo "error: TOE_TORCH is '$TOE_TORCH'. Set it to a torch version such as 2.5.1 (the wheel index goes in TOE_TORCH_INDEX)" >&2
  exit 2
fi
if [ -n "${TOE_TORCH:-}" ] && [ "$(printf '%s\n' 2.4 "$TOE_TORCH" | sort -V | head -n 1)" != 2.4 ]; then
  echo "error: TOE_TORCH is $TOE_TORCH; the project needs torch 2.4 or newer (pyproject.toml). Pick a newer version that" \
       "the index of TOE_TORCH_INDEX has" >&2
  exit 2
fi
NEED_TORCH=0
if [ "$TORCH_WANT" != "|" ]; then
  [ "$(cat "$TORCH_STAMP" 2>/dev/null)" = "$TORCH_WANT" ] || NEED_TORCH=1
fi
if [ "$NEED_TORCH" = 0 ] && { [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; } \
   && ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  NEED_TORCH=1  # a new .venv (torch is looked for only when the project is (re)installed: importing it takes seconds)
fi
if [ "$NEED_TORCH" = 1 ]; then
  TORCH_PINS=("torch==${TOE_TORCH:-2.14.1}")
  if [ -n "${TOE_TORCH:-}" ]; then TORCH_PINS+=(torchvision); else TORCH_PINS+=(torchvision==0.29.1); fi
  INDEX_ARGS=()
  [ -z "${TOE_TORCH_INDEX:-}" ] || INDEX_ARGS=(--index-url "$TOE_TORCH_INDEX")
  echo "[setup] installing ${TORCH_PINS[*]}${TOE_TORCH_INDEX:+ from $TOE_TORCH_INDEX}"
  # a build of the same version from another index counts as installed for pip: remove the old pair first
  "$PY" -m pip uninstall -y -q torch torchvision >/dev/null 2>&1 || true
  "$PY" -m pip install -q "${INDEX_ARGS[@]}" "${TORCH_PINS[@]}"
  echo "$TORCH_WANT" > "$TORCH_STAMP"
fi
# the dev tools too: a .venv made before they were listed gets them
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || [ ! -x "$VENV/bin/ruff" ] || [ ! -x "$VENV/bin/pytest" ]; then
  echo "[setup] installing the project and its dependencies into .venv"
  "$PY" -m pip install -q -e "$ROOT[dev]"  # [dev]: pytest and ruff
  echo "$WANT" > "$STAMP"
fi
cd "$ROOT"
