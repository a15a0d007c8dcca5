#!/usr/bin/env bash
# Every CUDA path of this install, checked in minutes (under 8 on one GPU):
#   bash run/gpu_check.sh                 # all checks; exit 1 if any fails, a table at the end
#   bash run/gpu_check.sh --only operator no_host_sync
#   bash run/gpu_check.sh --out DIR       # keep the runs, logs and gpu_check.json in DIR (or $TOE_GPU_CHECK_OUT)
#   bash run/gpu_check.sh --list
# Without a GPU the same checks run on the CPU at small sizes (about 2 minutes on 2 cores), what
# needs CUDA is skipped and named, and it says "CUDA was not exercised: no GPU visible". When
# nvidia-smi lists a GPU that the installed torch cannot use (a build for a newer CUDA than the
# driver's, a CPU-only build), it fails at once with one line naming both versions and the fix.
# Sets up .venv on first use, as run/test.sh does; TOE_TORCH_INDEX / TOE_TORCH pick the torch build
# (README: which torch build). In an environment that is already installed (a node without internet):
#   python -m ToE.gpu_check [the same flags]
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m ToE.gpu_check "$@"
