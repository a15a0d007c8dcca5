"""What every bench records beside its numbers, and how it starts a trainer on a recipe file.

The statistics, the run reader and the launcher of repeated runs are ``ToE.common.results``
(``rotated`` is re-exported here for the step-timing benches)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from ToE.common.config import config_path, load_config, recipe_command
from ToE.common.results import rotated

__all__ = ["describe_machine", "git_commit", "rotated", "demo_config", "recipe", "trainer_command", "run_trainer"]

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


def demo_config(trainer: str) -> str:
    """The demo recipe of ``trainer`` (deit, lvvit, et, yolos): ``ToE/<trainer>/configs/demo.yaml``."""
    return config_path(trainer, "demo")


def recipe(trainer: str, config: Optional[str] = None) -> Dict[str, object]:
    """The values of a recipe file (default: the trainer's demo), keyed by flag destination."""
    return load_config(config or demo_config(trainer))


def trainer_command(trainer: str, config: Optional[str], *overrides: object) -> List[str]:
    """``python ToE/<trainer>/main.py --config CONFIG OVERRIDES...``: a variant of a recipe is the
    recipe file plus flags on the command line, so no bench holds a copy of a recipe's values."""
    return recipe_command(trainer, "demo", *map(str, overrides), python=sys.executable,
                          config=config or demo_config(trainer))


def run_trainer(command: Sequence[str], out_dir: str, threads: Optional[int] = None) -> float:
    """Run a trainer command to its end (its output kept in ``out_dir/stdout.txt``); the wall seconds.
    A failure raises RuntimeError with the end of the trainer's output."""
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    completed = subprocess.run(list(command), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    wall = time.perf_counter() - start
    with open(os.path.join(out_dir, "stdout.txt"), "w") as handle:
        handle.write(completed.stdout)
    if completed.returncode != 0:
        raise RuntimeError(f"trainer failed (exit {completed.returncode}): {' '.join(command)}\n"
                           + completed.stdout[-3000:])
    return wall
