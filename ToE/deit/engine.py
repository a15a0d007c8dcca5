"""One training epoch and one evaluation pass (DeiT classification)."""

from __future__ import annotations

import math
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
    """torch.amp autocast on CUDA with bf16/fp16; full precision elsewhere or when off."""
    if amp_dtype is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=amp_dtype)


def train_one_epoch(model: nn.Module, criterion, loader, optimizer, device: torch.device, epoch: int,
                    scaler: torch.amp.GradScaler, amp_dtype: Optional[torch.dtype] = None,
                    clip_grad: Optional[float] = None, mixup_fn=None, model_ema=None,
                    show_progress: bool = True) -> Dict[str, float]:
    """Train ``model`` for one pass over ``loader``; return the mean loss, the lr and the seconds."""
    model.train()
    criterion.train() if isinstance(criterion, nn.Module) else None
    loss_sum = torch.zeros((), dtype=torch.float64)
    samples = 0
    start = time.perf_counter()
    # disable=None: a bar on terminals only, so log files and CI output stay readable
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=None if show_progress else True, dynamic_ncols=True,
               leave=False)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with autocast_context(device, amp_dtype):
            outputs = model(images)
            loss = criterion(images, outputs, targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingStopped(f"the loss became {loss_value} in epoch {epoch}; the checkpoints written "
                                  "before this epoch are kept. Lower --lr, raise --warmup-epochs or set --clip-grad")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if model_ema is not None:
            model_ema.update(getattr(model, "module", model))  # the EMA follows the unwrapped model
        loss_sum += loss_value * images.shape[0]
        samples += images.shape[0]
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    totals = all_reduce_sum(torch.tensor([loss_sum.item(), float(samples)], dtype=torch.float64))
    return {"train_loss": totals[0].item() / max(totals[1].item(), 1.0),
            "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": seconds}


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
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, images
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        totals += torch.tensor([F.cross_entropy(logits, targets, reduction="sum").item(),
                                hits[:, :1].sum().item(), hits.sum().item(), targets.numel()],
                               dtype=torch.float64)
    if sharded:
        totals = all_reduce_sum(totals)
    images = max(totals[3].item(), 1.0)
    return {"loss": totals[0].item() / images, "acc1": 100.0 * totals[1].item() / images,
            "acc5": 100.0 * totals[2].item() / images, "images": int(totals[3].item())}
