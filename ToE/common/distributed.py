"""The processes and the device of a run: one process per GPU under torchrun (NCCL), or CPU processes
with gloo; the mixed precision the device computes in (``resolve_amp_dtype``, ``autocast``)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = field(init=False)  # more than one process
    is_main: bool = field(init=False)  # rank 0: the process that prints and writes

    def __post_init__(self) -> None:
        self.distributed, self.is_main = self.world_size > 1, self.rank == 0


# -- the device: "auto", "cuda" or "cpu" ----------------------------------------------------------
# The wheel indices of PyTorch's CUDA builds, newest last: the message for a GPU this torch cannot use
# suggests the newest one the driver runs (its CUDA version is nvidia-smi's "CUDA Version").
TORCH_CUDA_INDICES = ("cu118", "cu121", "cu124", "cu126", "cu128", "cu129", "cu130")
TORCH_INDEX_URL = "https://download.pytorch.org/whl/{}"


def _nvidia_smi(*args: str) -> Optional[str]:
    """nvidia-smi's output with ``args``; None when it is not on PATH, fails or hangs."""
    program = shutil.which("nvidia-smi")
    if program is None:
        return None
    try:
        result = subprocess.run([program, *args], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def _listed_gpus() -> Tuple[List[str], str, str]:
    """What nvidia-smi says: (the GPU names, the driver version, the newest CUDA version the driver
    runs); ([], "", "") without nvidia-smi or when it lists none."""
    import re

    table = _nvidia_smi("--query-gpu=name,driver_version", "--format=csv,noheader")
    rows = [[part.strip() for part in line.split(",")] for line in (table or "").splitlines() if line.strip()]
    names = [row[0] for row in rows if row and row[0]]
    if not names:
        return [], "", ""
    driver = rows[0][1] if len(rows[0]) > 1 else ""
    header = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", _nvidia_smi() or "")
    return names, driver, header.group(1) if header else ""


def _hidden_by_env() -> bool:
    """Whether CUDA_VISIBLE_DEVICES hides every GPU on purpose (empty, -1, NoDevFiles)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and (value.strip() in ("", "NoDevFiles") or value.strip().startswith("-"))


def _suggested_index(driver_cuda: str) -> str:
    """The newest of PyTorch's CUDA wheel indices the driver runs ("" when the driver's CUDA is unknown)."""
    try:
        major, minor = (int(part) for part in driver_cuda.split("."))
    except ValueError:
        return ""
    fitting = [name for name in TORCH_CUDA_INDICES if (int(name[2:-1]), int(name[-1])) <= (major, minor)]
    return fitting[-1] if fitting else ""


def _arch_problem() -> Optional[str]:
    """Why torch cannot run kernels on GPU 0 although it sees it (its build has no code for the
    GPU's architecture); None when it can."""
    arch = torch.cuda.get_arch_list()
    if not arch:
        return None
    major, minor = torch.cuda.get_device_capability(0)
    # a cubin runs on the same major architecture at an equal or higher minor; PTX is compiled for any newer one
    for name in arch:
        kind, _, number = name.partition("_")
        if not number.isdigit():
            continue
        built = (int(number[:-1]), int(number[-1]))
        if kind == "sm" and built[0] == major and built[1] <= minor:
            return None
        if kind == "compute" and built <= (major, minor):
            return None
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) has no kernels for "
            f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor}; it is built for "
            f"{' '.join(arch)}). Install a torch build that supports this GPU (README: which torch build)")


@functools.lru_cache(maxsize=None)
def _diagnosis() -> Tuple[Optional[str], bool]:
    """(why torch cannot use a GPU here or None, whether a GPU is there that it should be able to use)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # torch warns once about an old driver: into the line
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        problem = _arch_problem()
        return problem, problem is not None
    names, driver, driver_cuda = _listed_gpus()
    if not names:
        where = "nvidia-smi lists none" if shutil.which("nvidia-smi") else "nvidia-smi is not on PATH"
        return f"no GPU visible (torch.cuda.is_available() is false and {where})", False
    if _hidden_by_env():
        return (f"no GPU visible: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides the "
                f"{len(names)} GPU(s) nvidia-smi lists"), False
    gpus = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    if torch.version.cuda is None:
        built = "is a CPU-only build"
    else:
        built = f"is built for CUDA {torch.version.cuda}"
    runs = f", which runs CUDA up to {driver_cuda}" if driver_cuda else ""
    said = [str(w.message).strip().splitlines()[0] for w in caught if "CUDA" in str(w.message) or "driver" in
            str(w.message)]
    suggested = _suggested_index(driver_cuda)
    index = TORCH_INDEX_URL.format(suggested or "cuXYZ") + ("" if suggested else
                                                            " (XYZ: the driver's CUDA version or older)")
    return (f"nvidia-smi lists {gpus} (driver {driver or 'unknown'}{runs}) but torch {torch.__version__} cannot use "
            f"it: it {built}{' (torch says: ' + said[0] + ')' if said else ''}. Install a torch build for this "
            f"driver: TOE_TORCH_INDEX={index} bash run/gpu_check.sh (TOE_TORCH=VERSION for a version that index "
            "has; README: which torch build)"), True


def cuda_problem() -> Optional[str]:
    """None when torch can use a GPU here; else one line that says why not: no GPU visible, or a GPU
    (nvidia-smi lists it) that this torch build cannot use (its CUDA version, the driver's, and how
    to install a matching build)."""
    return _diagnosis()[0]


def unusable_gpu() -> Optional[str]:
    """``cuda_problem()`` where a GPU is there that torch should use (nvidia-smi lists it, no
    CUDA_VISIBLE_DEVICES hides it) but cannot; None where torch can use the GPU or there is none."""
    problem, gpu_there = _diagnosis()
    return problem if gpu_there else None


def resolve_device(device: str) -> torch.device:
    """``--device``: "cuda" is a GPU or a UserError that says why there is none; "auto" (the default)
    is a GPU when torch can use one, the CPU when no GPU is there, and a UserError when there is a GPU
    torch cannot use (a broken install is no reason to train on the CPU); "cpu" is the CPU."""
    if device == "cpu":
        return torch.device("cpu")
    if device not in ("auto", "cuda"):
        raise UserError(f"--device {device}: pass auto, cuda or cpu")
    problem = cuda_problem()
    if problem is None:
        return torch.device("cuda")
    if device == "cuda":
        raise UserError(f"--device cuda: {problem}" + ("" if unusable_gpu() else
                        ". Run on a machine with a GPU, or pass --device cpu (or auto) to train on the CPU"))
    if unusable_gpu():
        raise UserError(f"--device auto: {problem}; or pass --device cpu to train on the CPU")
    return torch.device("cpu")


def device_note(device: str, resolved: torch.device) -> str:
    """What the run's start line adds about the device: why ``--device auto`` chose the CPU."""
    if device == "auto" and resolved.type == "cpu":
        return f" (--device auto: {cuda_problem()})"
    return ""


# One TF32 policy for the trainers and the benchmarks: float32 means IEEE float32 (PyTorch's default
# for matmuls; cuDNN's convolutions too). The speed comes from the mixed precision (--amp-dtype, bf16
# or fp16 autocast on GPUs); what autocast keeps in float32 (the operator's token selection, YOLOS's
# box head, losses) stays exact, and a float32 run (--amp-dtype float32) computes what the CPU does.
TF32 = False


def set_float32_policy() -> None:
    """Apply the project's TF32 policy (``TF32``) to CUDA matmuls and cuDNN convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = TF32
    torch.backends.cudnn.allow_tf32 = TF32


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group.

    ``device``: auto, cuda or cpu (``resolve_device``: cuda without a usable GPU is a UserError that
    says why; never a silent fall back to the CPU). NCCL on GPUs, gloo on CPU.
    """
    use_cuda = resolve_device(device).type == "cuda"
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this machine shows {torch.cuda.device_count()}. "
                            "Start at most that many processes per machine (--nproc_per_node, NPROC, GPUS_PER_NODE)")
        set_float32_policy()
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(rank, world_size, local_rank, dev)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (no-op without a process group); returns it on its own device.

    Every reduction of the project goes through here. NCCL reduces GPU tensors only ("No backend
    type associated with device type cpu"): a CPU tensor makes the round trip through this
    process's GPU.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and values.device.type != "cuda":
            on_gpu = values.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            values.copy_(on_gpu)
        else:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_ints(values, env: DistEnv):
    """Every process's ``values`` (a list of ints), on every process: [rank 0's, rank 1's, ...]."""
    table = torch.zeros(env.world_size, len(values), dtype=torch.float64)
    table[env.rank] = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return [[int(v) for v in row] for row in all_reduce_sum(table).tolist()]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


def resolve_amp_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """``--amp-dtype`` on ``device``: auto is bf16 on GPUs that compute it natively (Ampere on),
    fp16 with loss scaling on older ones (T4, V100 only emulate bf16), off on the CPU."""
    if name == "auto":
        if device.type != "cuda":
            return None
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    if name == "float16" and device.type != "cuda":
        raise UserError("--amp-dtype float16 needs a GPU (its loss scaling is CUDA's). Use bfloat16 on the CPU")
    return AMP_DTYPES[name]


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """torch.amp autocast with ``amp_dtype`` on the run's device; full precision when None."""
    return nullcontext() if amp_dtype is None else torch.autocast(device_type=device.type, dtype=amp_dtype)
