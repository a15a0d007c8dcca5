"""Helpers shared by the test modules: the tiny DeiT recipe, the generated data sets and the
subprocess runs of a trainer. Import what you need (``from helpers import FAST, run_main``);
the pytest fixtures and the ``e2e`` marker logic live in ``conftest.py``.

A test module never imports another test module: a helper that two modules need lives here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ToE.common.log import read_log  # noqa: F401  (the project's one log reader, for the tests)
from ToE.gpu_check import write_coco  # noqa: F401  (the project's one tiny COCO layout, for the tests)

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "ToE" / "deit" / "main.py"
RUN_DIR = ROOT / "ToE" / "deit" / "run"

# -- the tiny DeiT recipe ---------------------------------------------------------------------

CLASSES = 3
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = (3, 3, 1)  # 7 validation images: odd, so 2 processes get unequal shards
NUM_VAL = sum(VAL_PER_CLASS)
MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2}
INPUT, PATCH = 16, 4
NUM_PATCHES = (INPUT // PATCH) ** 2

TINY = ["--model", MODEL, "--model-kwargs", *[f"{k}={v}" for k, v in MODEL_KWARGS.items()],
        "--input-size", str(INPUT), "--patch-size", str(PATCH)]
FAST = ["--device", "cpu", "--num_workers", "0", "--batch-size", "4", "--no-pin-mem", "--warmup-epochs", "0",
        "--lr", "1e-3", "--unscale-lr"]
PLAIN = ["--no-repeated-aug", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0"]
# Full DeiT recipe on top of FAST: RandAugment, random erasing, mixup/cutmix, repeated augmentation,
# drop path, EMA (on by default) with a decay that makes it move within a few steps.
RECIPE = ["--repeated-aug", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
          "--drop-path", "0.1", "--model-ema-decay", "0.9"]
# Stage 1 in epochs 0-1, stage 2 in epoch 2, stage 3 in epoch 3: epochs 1-2 and 3-4 differ.
SCHEDULE = ["--expansion-step", "0", "2", "3", "--keep-rate", "0.5", "0.75", "1.0"]
KEEP_RATE, INIT_RATE, MULTIPLE = [0.5, 0.75, 1.0], 0.25, 2


# -- subprocesses -----------------------------------------------------------------------------

def child_env():
    """The environment of a trainer subprocess: one thread, no progress bars, not a torchrun rank."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    return env


def run_main(*args, timeout=240, cmd=None):
    """Run ``ToE/deit/main.py`` with ``args`` from the repository root; return the CompletedProcess."""
    cmd = cmd or [sys.executable, str(MAIN)]
    return subprocess.run([*cmd, *map(str, args)], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def run_script(name, *args, cwd, **env):
    """Run a launcher script with bash, ``env`` on top of a clean launcher environment."""
    environment = child_env()
    for key in ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "DRY_RUN"):
        environment.pop(key, None)
    environment.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run(["bash", str(name), *map(str, args)], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=60, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deit_run(*argv):
    """A DeiT ``Run`` built in this process (nothing trained yet)."""
    from ToE.common.lifecycle import Run
    from ToE.deit.main import parse_args
    from ToE.deit.trainer import DeiTTask

    return Run(parse_args([str(a) for a in argv]), DeiTTask)


# -- assertions -------------------------------------------------------------------------------

def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def assert_user_error(result, *needles):
    """One line ``error: ...`` on stderr naming the problem, no traceback, exit code 2."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{what}: {key} differs"


# -- outputs ----------------------------------------------------------------------------------

def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


# -- generated data sets ----------------------------------------------------------------------

def write_images(root: Path, seed: int = 0) -> Path:
    """A tiny ImageNet-layout folder: class c is brighter by c, so the classes are learnable."""
    rng = np.random.default_rng(seed)
    for split, counts in (("train", [TRAIN_PER_CLASS] * CLASSES), ("val", VAL_PER_CLASS)):
        for c, count in enumerate(counts):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (rng.random((32, 32, 3)) * 90 + 80 * c).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


