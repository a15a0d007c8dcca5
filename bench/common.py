"""What every bench records beside its numbers, and the order it runs its configurations in."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["describe_machine", "git_commit", "rotated"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def describe_machine() -> Dict[str, object]:
    """CPU model, core count, memory, torch version and threads: what a table's reader needs."""
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu_model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                             cpu_model)
    except OSError:
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as handle:
            memory_gib = round(int(handle.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    info = {"cpu_model": cpu_model, "cpu_count": os.cpu_count(), "memory_gib": memory_gib,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def git_commit() -> Optional[str]:
    """The checked-out commit (short hash, "+changes" if the tree differs from it), or None."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if dirty else "")


def rotated(items: Sequence[str], start: int) -> List[str]:
    """``items`` starting at index ``start`` (mod their number): round r of a bench runs rotated(configs, r)."""
    start %= len(items)
    return list(items[start:]) + list(items[:start])
