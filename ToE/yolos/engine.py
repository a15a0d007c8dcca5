"""One detection training epoch (the evaluation pass is ``ToE.yolos.evaluation.evaluate``)."""

from __future__ import annotations

import time
from typing import Dict, Optional

import torch
from tqdm import tqdm

from ToE.common.distributed import all_reduce_sum
from ToE.common.errors import TrainingStopped

LOSS_KEYS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error")


def _stop_if_non_finite(non_finite: torch.Tensor, epoch: int, distributed: bool) -> None:
    flag = non_finite.detach().to(torch.float32).reshape(1).cpu()
    if distributed:
        flag = all_reduce_sum(flag)
    if flag.item() > 0:
        raise TrainingStopped(f"the loss became nan or inf in epoch {epoch}; the checkpoints written before this "
                              "epoch are kept. Lower --lr or --clip_max_norm")


def train_one_epoch(model, criterion, loader, optimizer, device: torch.device, epoch: int,
                    clip_max_norm: Optional[float], toe=None, patch_size: int = 16, show_progress: bool = True,
                    log_interval: int = 50, distributed: bool = False) -> Dict[str, float]:
    """Train one pass over ``loader`` (padded image batches and target lists).

    Returns the mean of each loss term over the images, the lr, the seconds, and the mean patch
    tokens per image before (``patch_tokens``) and after (``kept_tokens``) the operator ``toe``.
    The loss is checked for nan/inf on the device and read every ``log_interval`` steps.
    """
    model.train()
    sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=device)
    non_finite = torch.zeros((), dtype=torch.bool, device=device)
    tokens = torch.zeros(3, dtype=torch.float64)  # patch tokens, kept patch tokens, steps
    samples = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=None if show_progress else True, dynamic_ncols=True,
               leave=False)
    for step, (images, targets) in enumerate(bar, start=1):
        images = images.to(device, non_blocking=True)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        outputs = model(images)
        losses = criterion(outputs, targets)
        loss = losses["loss"]
        patches = (images.shape[2] // patch_size) * (images.shape[3] // patch_size)
        index = toe.last_index if toe is not None else None
        kept = patches if index is None else index.shape[1] - toe.num_prefix_tokens - toe.num_suffix_tokens
        tokens += torch.tensor([patches, kept, 1.0], dtype=torch.float64)
        non_finite |= ~torch.isfinite(loss.detach())
        if step % log_interval == 0:
            _stop_if_non_finite(non_finite, epoch, distributed)
            bar.set_postfix(loss=f"{loss.item():.4f}", kept=f"{kept}/{patches}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_max_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        optimizer.step()
        sums += torch.stack([losses[k].detach().double() for k in LOSS_KEYS]) * images.shape[0]
        samples += images.shape[0]
    _stop_if_non_finite(non_finite, epoch, distributed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    totals = all_reduce_sum(torch.cat([sums.cpu(), torch.tensor([float(samples)], dtype=torch.float64)]))
    stats = {f"train_{k}": totals[i].item() / max(totals[-1].item(), 1.0) for i, k in enumerate(LOSS_KEYS)}
    stats.update({"lr": optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
                  "patch_tokens": tokens[0].item() / max(tokens[2].item(), 1.0),
                  "kept_tokens": tokens[1].item() / max(tokens[2].item(), 1.0)})
    return stats
