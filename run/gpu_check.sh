#!/usr/bin/env bash
# Every CUDA path of this install, checked in minutes (estimated under 5 on one H100; ToE/gpu_check.py says how):
#   bash run/gpu_check.sh                 # all checks; exit 1 if any fails, a table at the end
#   bash run/gpu_check.sh --only operator no_host_sync
#   bash run/gpu_check.sh --out DIR       # keep the runs, logs and gpu_check.json in DIR (or $TOE_GPU_CHECK_OUT)
#   bash run/gpu_check.sh --list
# Without a GPU the same checks run on the CPU at small sizes (about 3 minutes on 2 cores), what
# needs CUDA is skipped and named, and it says "CUDA was not exercised: no GPU visible". When
# nvidia-smi lists a GPU that the installed torch cannot use (a build for a newer CUDA than the
# driver's, a CPU-only build), it fails at once with one line naming both versions and the fix.
# Sets up .venv on first use, as run/test.sh does; TOE_TORCH_INDEX / TOE_TORCH pick the torch build
# (README: which torch build). In an environment that is already installed (a node without internet):
#   python -m ToE.gpu_check [the same flags]
# The dali check needs the dali extra, which the set-up does not install: it is installed here when
# DALI is missing (quietly; without network that fails, is said in one line, and the dali check then
# reports DALI missing: skipped, or failed with --dali require). --dali off and --list install nothing.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
want_dali=1
previous=""
for arg in "$@"; do
  { [ "$arg" = "--list" ] || { [ "$previous" = "--dali" ] && [ "$arg" = "off" ]; } || [ "$arg" = "--dali=off" ]; } &&
    want_dali=0
  previous="$arg"
done
if [ "$want_dali" = 1 ] && ! "$PY" -c "import nvidia.dali" >/dev/null 2>&1; then
  echo "gpu_check: installing the dali extra (pip install -e \".[dali]\")" >&2
  if ! dali_log="$("$PY" -m pip install -q --retries 1 --timeout 15 -e "$ROOT[dali]" 2>&1)"; then
    reason="$(printf '%s\n' "$dali_log" | grep -v '^\s*$' | tail -n 1 | cut -c1-200 || true)"
    echo "gpu_check: could not install the dali extra (no network?): ${reason:-pip failed}" >&2
    export TOE_GPU_CHECK_DALI_INSTALL="pip failed: ${reason:-no output}"
  fi
fi
exec "$PY" -m ToE.gpu_check "$@"
