"""Checkpoints written atomically and loadable with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
from typing import Any, Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from .errors import UserError, WriteFailed


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


def _size(count: float) -> str:
    for unit in ("bytes", "kB", "MB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def write_problem(path: str, error: OSError, needed: Optional[int] = None) -> str:
    """``error`` (met writing ``path``) as "cannot write PATH: <problem>. <fix>": a full disk names
    the space left (and what the file needs, when known), a read-only folder says so."""
    folder = os.path.dirname(os.path.abspath(path))
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{_size(shutil.disk_usage(folder).free)} free"
        except OSError:
            free = "free space unknown"
        need = f", about {_size(needed)} needed" if needed else ""
        what = "no space left on the device" if code == errno.ENOSPC else "the disk quota is used up"
        return f"cannot write {path}: {what} of {folder} ({free}{need}). Free space there, or pass another --output_dir"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write {path}: {(error.strerror or 'permission denied').lower()} ({folder}). Make the "
                "folder writable, or pass another --output_dir")
    if code == errno.ENOENT and not os.path.isdir(folder):
        return f"cannot write {path}: the folder {folder} no longer exists. Recreate it, or pass another --output_dir"
    name = f" ({errno.errorcode[code]})" if code in errno.errorcode else ""
    return (f"cannot write {path}: {error.strerror or error}{name}. Check the disk of {folder}, or pass another "
            "--output_dir")


@contextlib.contextmanager
def writing(path: str, needed: Optional[int] = None) -> Iterator[None]:
    """Turn an OSError while writing ``path`` (``needed``: its size in bytes, when known) into one
    line (WriteFailed) that names the file, the problem and the fix."""
    try:
        yield
    except OSError as error:
        raise WriteFailed(write_problem(path, error, needed)) from None


@contextlib.contextmanager
def replacing(path: str, needed: Optional[int] = None) -> Iterator[str]:
    """Write ``path`` atomically: the caller writes the yielded temporary path, which then replaces
    ``path``. A kill leaves the old file intact; a failed write (WriteFailed) or an interrupted one
    (Ctrl-C) also removes the partial file, so no ``.tmp`` is left behind and its space is free again."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(error, OSError):  # told once the partial file is gone: the free space is what is left
            raise WriteFailed(write_problem(path, error, needed)) from None
        raise


def _nbytes(value: Any) -> int:
    """The bytes of the tensors in ``value`` (nested dicts, lists, tuples): about a checkpoint's size."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(item) for item in value)
    return 0


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically (``replacing``): a kill, a full disk or Ctrl-C while
    saving leaves the old file intact and no partial file."""
    needed = _nbytes(state)
    # opened here, not by torch: a read-only or vanished folder is then an OSError that names itself
    with replacing(path, needed) as tmp, open(tmp, "wb") as handle:
        try:
            torch.save(state, handle)
        except RuntimeError as error:
            # torch's zip writer reports a short write (what a full disk gives) as "unexpected pos"
            if "unexpected pos" not in str(error):
                raise
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None


CHECKPOINTS = ("checkpoint.pth", "best_checkpoint.pth")


def _holds(path: str) -> str:
    """Where the run stood when ``path`` was written ("the end of epoch 3", "step 12 of epoch 4"),
    read from the file (memory-mapped: its tensors are not read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        position = state.get("position")
        if position is not None:
            return f"step {int(position['step'])} of epoch {int(position['epoch'])}"
        return f"the end of epoch {int(state['epoch'])}"
    except (Exception, KeyboardInterrupt):  # a foreign or unreadable file, or a second Ctrl-C
        return "a state this trainer cannot read"


def saved_state(output_dir: str, resume: str = "", advice: bool = True) -> str:
    """What a stopped run leaves to continue from, read from the files in ``output_dir`` (not from
    what the run meant to write: a stop during a write, or before training, tells the truth).
    ``resume``: the --resume file the run started from, named when the folder holds no checkpoint;
    ``advice``: add how to continue. The one "what was saved" text of every stop: Ctrl-C, a stop
    signal, --time-limit, --stop-after-epochs, a failed write, a non-finite loss."""
    if not output_dir:
        saved = "nothing was saved (no --output_dir)"
        return f"{saved}; {resume} is unchanged" if resume else saved
    last, best = (os.path.join(output_dir, name) for name in CHECKPOINTS)
    best_text = f" (best_checkpoint.pth: {_holds(best)})" if os.path.isfile(best) else ""
    if os.path.isfile(last):
        how = f"; continue with the same command and --auto-resume (or --resume {last})" if advice else ""
        return f"{last} holds the run to {_holds(last)}{best_text}{how}"
    if resume:
        how = ": continue from it with the same command" if advice else ""
        return f"no checkpoint was written in {output_dir}; {resume} is unchanged{how}"
    return f"no checkpoint was written, nothing to resume{best_text}"


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
