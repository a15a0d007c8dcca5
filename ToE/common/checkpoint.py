"""Checkpoints written atomically and loadable with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

import os
import random
from typing import Any, Dict, Sequence

import numpy as np
import torch

from .errors import UserError


def seed_everything(seed: int) -> None:
    """Seed every random number generator training draws from (Python, NumPy, torch on all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> Dict[str, Any]:
    """The random number generators this process draws from, as tensors and plain Python values.

    Only this process's own GPU (``device``): another process owns each other GPU, and a state
    list of every visible GPU would not restore on a machine with fewer.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Restore what ``rng_state`` saved (the GPU stream onto this process's own ``device``)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    cuda_state = state.get("cuda")
    if device.type == "cuda" and torch.is_tensor(cuda_state):
        torch.cuda.set_rng_state(cuda_state, device)


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically: a kill while saving leaves the old file intact."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; missing or corrupt files are user errors."""
    if not os.path.isfile(path):
        raise UserError(f"resume file {path} does not exist. Pass --resume with a checkpoint.pth "
                        "written by this trainer, or leave --resume out to start afresh")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise UserError(f"resume file {path} is corrupt or not a checkpoint ({error.__class__.__name__}). "
                        "Use best_checkpoint.pth or an earlier copy, or start afresh") from None


def flag_name(key: str) -> str:
    """``keep_rate`` -> ``--keep-rate`` (the names that keep DeiT's underscores stay as they are)."""
    return f"--{key}" if key in ("output_dir", "start_epoch", "num_workers") else f"--{key.replace('_', '-')}"


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "(none)"
    return str(value)


def check_resume_args(path: str, stored: Dict[str, Any], given: Dict[str, Any], keys: Sequence[str]) -> None:
    """Refuse a resume whose ``keys`` (flags that change what the run computes) differ from the
    checkpoint's stored ones.

    The message names the flag, the stored value and the given one. A checkpoint without stored
    arguments (not written by this project) is not checked.
    """
    if not stored:
        return
    for key in keys:
        if key not in stored or key not in given:
            continue
        before, now = stored[key], given[key]
        if isinstance(before, (list, tuple)) and isinstance(now, (list, tuple)):
            same = list(before) == list(now)
        else:
            same = before == now
        if not same:
            raise UserError(f"resume file {path} was trained with {flag_name(key)} {_shown(before)}, this run gives "
                            f"{flag_name(key)} {_shown(now)}. Resume with the flags it was trained with, or start a "
                            "new run in another --output_dir")


def trained_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """What a checkpoint stores of ``model``: its state dict without the frozen parameters (all of it
    when everything trains; the prompts and the head of a VPT run, which load onto the backbone it
    was tuned from)."""
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    return {key: value for key, value in model.state_dict().items() if key not in frozen}


def frozen_checksum(model: torch.nn.Module) -> float:
    """A fingerprint of the frozen weights (their sum in float64; 0.0 when nothing is frozen): stored
    with a checkpoint, so that it is not resumed or evaluated on another backbone."""
    with torch.no_grad():
        return float(sum(p.double().sum().item() for p in model.parameters() if not p.requires_grad))
