"""One training epoch and one evaluation pass (DeiT classification)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ToE.common.distributed import all_reduce_sum
from ToE.common.errors import TrainingStopped


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """torch.amp autocast with ``amp_dtype`` (bf16/fp16) on the run's device; full precision when None."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _stop_if_non_finite(non_finite: torch.Tensor, epoch: int, distributed: bool) -> None:
    """Raise TrainingStopped on every process if any process saw a non-finite loss.

    Reading the flag waits for the device, so it is done at logging intervals only; summed over
    the processes so that all of them stop together (one message, no process left waiting).
    """
    flag = non_finite.detach().to(torch.float32).reshape(1)
    if distributed:
        flag = all_reduce_sum(flag)
    if flag.item() > 0:
        raise TrainingStopped(f"the loss became nan or inf in epoch {epoch}; the checkpoints written before this "
                              "epoch are kept. Lower --lr, raise --warmup-epochs or set --clip-grad")


def train_one_epoch(model: nn.Module, criterion, loader, optimizer, device: torch.device, epoch: int,
                    scaler: torch.amp.GradScaler, amp_dtype: Optional[torch.dtype] = None,
                    clip_grad: Optional[float] = None, mixup_fn=None, model_ema=None,
                    show_progress: bool = True, log_interval: int = 50, toe=None,
                    distributed: bool = False) -> Dict[str, float]:
    """Train ``model`` for one pass over ``loader``; return the mean loss, the lr, the seconds and
    ``kept_tokens``: the patch tokens the operator ``toe`` really passed on (None: it did not reduce).

    No per-step host sync: the loss is summed and checked for nan/inf on the device, and read
    every ``log_interval`` steps (before that step's update) and at the end of the epoch. A
    non-finite loss stops training on every process with TrainingStopped; with ``log_interval``
    1 no update is ever made from a non-finite loss.
    """
    model.train()
    criterion.train() if isinstance(criterion, nn.Module) else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    non_finite = torch.zeros((), dtype=torch.bool, device=device)
    samples = 0
    kept_tokens = set()
    start = time.perf_counter()
    # disable=None: a bar on terminals only, so log files and CI output stay readable
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=None if show_progress else True, dynamic_ncols=True,
               leave=False)
    for step, (images, targets) in enumerate(bar, start=1):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with autocast_context(device, amp_dtype):
            outputs = model(images)
            loss = criterion(images, outputs, targets)
        if toe is not None:  # what the forward really ran on, not what the schedule says
            index = toe.last_index
            kept_tokens.add(None if index is None else index.shape[1] - toe.num_prefix_tokens - toe.num_suffix_tokens)
        loss_value = loss.detach()
        non_finite |= ~torch.isfinite(loss_value)
        if step % log_interval == 0:
            _stop_if_non_finite(non_finite, epoch, distributed)
            bar.set_postfix(loss=f"{loss_value.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if model_ema is not None:
            model_ema.update(getattr(model, "module", model))  # the EMA follows the unwrapped model
        loss_sum += loss_value.to(torch.float64) * images.shape[0]
        samples += images.shape[0]
    _stop_if_non_finite(non_finite, epoch, distributed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    totals = all_reduce_sum(torch.stack([loss_sum.cpu(), torch.tensor(float(samples), dtype=torch.float64)]))
    reduced = {k for k in kept_tokens if k is not None}
    return {"train_loss": totals[0].item() / max(totals[1].item(), 1.0),
            "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
            "kept_tokens": max(reduced) if reduced else None}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             sharded: bool = True) -> Dict[str, float]:
    """Top-1, top-5 and loss over the validation images.

    ``sharded``: ``loader`` holds this process's shard; the sums are added over all processes, and
    as each image sits in exactly one shard, every image is counted exactly once. Otherwise every
    process evaluates the whole set on its own (no sums, which would count each image per process).
    Pass the unwrapped model: DDP's forward may talk to the other processes, whose shards can hold
    one batch fewer.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        # summed on the device: no host sync per batch
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               hits[:, :1].sum().double(), hits.sum().double(),
                               torch.tensor(float(targets.numel()), dtype=torch.float64, device=device)])
    totals = totals.cpu()
    if sharded:
        totals = all_reduce_sum(totals)
    images = max(totals[3].item(), 1.0)
    return {"loss": totals[0].item() / images, "acc1": 100.0 * totals[1].item() / images,
            "acc5": 100.0 * totals[2].item() / images, "images": int(totals[3].item())}
