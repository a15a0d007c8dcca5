"""One process per GPU under torchrun (NCCL), or CPU processes with gloo."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cuda") -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group.

    ``device`` "cuda" falls back to the CPU when no GPU is visible. NCCL on GPUs, gloo on CPU.
    """
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
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
