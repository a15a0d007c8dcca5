"""Checkpoints written atomically and loadable with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import shutil
from typing import Any, Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from .args import flag_name
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


def _fsync(path: str) -> None:
    """Flush ``path``'s data to its disk (an error, e.g. a network file system's full quota, is raised)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_folder(folder: str) -> None:
    """Flush ``folder``'s entries (a rename in it) to disk, where the file system can (some cannot
    fsync a folder: EINVAL, EBADF, ENOTSUP; the file itself is already on disk)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(handle)


@contextlib.contextmanager
def replacing(path: str, needed: Optional[int] = None) -> Iterator[str]:
    """Write ``path`` atomically: the caller writes the yielded temporary path, which then replaces
    ``path``. A kill leaves the old file intact; a failed write (WriteFailed) or an interrupted one
    (Ctrl-C) also removes the partial file, so no ``.tmp`` is left behind and its space is free again.
    The file is fsynced before the rename and its folder after it."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        # on disk before it takes the name: after a crash of the machine (not only of the process) the
        # name holds the old file or the whole new one, never a renamed file whose data were still cached
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_folder(os.path.dirname(os.path.abspath(path)))  # the rename itself
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


def frozen_checksum(model: torch.nn.Module) -> str:
    """A fingerprint of the frozen weights, stored with a checkpoint so that it is not resumed or
    evaluated on another backbone: the SHA-256 of each frozen parameter's name, dtype, shape and
    bytes (on the CPU, contiguous) in the order of their names. The same weights give the same
    fingerprint on any device and any machine: no sum whose rounding depends on the order of its
    terms (a float sum on a GPU differs from the CPU's in the last bits). "" when nothing is frozen."""
    import hashlib

    frozen = sorted((name, p) for name, p in model.named_parameters() if not p.requires_grad)
    if not frozen:
        return ""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in frozen:
            value = parameter.detach().cpu().contiguous()
            digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
            # bytes through a flat uint8 view (bfloat16 has no NumPy type)
            digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return f"sha256:{digest.hexdigest()}"


def _legacy_frozen_sum(model: torch.nn.Module) -> float:
    """The fingerprint checkpoints stored before the hash: the float64 sum of the frozen weights."""
    with torch.no_grad():
        return math.fsum(p.detach().cpu().double().sum().item() for p in model.parameters() if not p.requires_grad)


def frozen_matches(stored: Any, model: torch.nn.Module) -> bool:
    """Whether a checkpoint's stored fingerprint (``frozen_checksum``) is that of ``model``'s frozen
    weights. A checkpoint written before the hash holds their float64 sum: compared to 1e-12 of the
    weights' absolute sum (the sum's rounding differs between devices and summation orders by about
    1e-16 of it; another backbone differs by far more)."""
    if isinstance(stored, str):
        return stored == frozen_checksum(model)
    if isinstance(stored, (int, float)):
        with torch.no_grad():
            scale = sum(p.detach().cpu().double().abs().sum().item() for p in model.parameters()
                        if not p.requires_grad)
        return abs(float(stored) - _legacy_frozen_sum(model)) <= 1e-12 * max(scale, 1.0)
    return False
