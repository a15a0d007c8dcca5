"""One training epoch and one evaluation pass (DeiT classification)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ToE.common.distributed import all_reduce_sum
from ToE.common.errors import TrainingStopped


def to_device(targets, device: torch.device):
    """``targets`` on ``device``: a tensor, or a tuple/list/dict of them (e.g. token-label targets)."""
    if isinstance(targets, (tuple, list)):
        return type(targets)(to_device(item, device) for item in targets)
    if isinstance(targets, dict):
        return {key: to_device(item, device) for key, item in targets.items()}
    return targets.to(device, non_blocking=True) if torch.is_tensor(targets) else targets


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
                    distributed: bool = False, input_transform: Optional[Callable] = None,
                    accum_steps: int = 1, lr_scheduler=None, first_update: int = 0,
                    max_updates: Optional[int] = None, start_step: int = 0,
                    stop_check: Optional[Callable[[], bool]] = None, carry: Optional[Dict[str, float]] = None,
                    after_iter: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Train ``model`` for one pass over ``loader``; return the mean loss, the lr, the seconds and
    ``kept_tokens``: the patch tokens the operator ``toe`` really passed on (None: it did not reduce).

    Optional hooks (the defaults are the plain loop): ``input_transform`` maps the images (N, C, H, W)
    on the device, before mixup; ``accum_steps`` micro-batches are accumulated into each update (the
    loss divided by it; a trailing incomplete group is not trained on); ``lr_scheduler`` gets
    ``step_update(first_update + u)`` before update u (a per-update schedule); ``max_updates`` caps the
    updates of the epoch.

    Preemption (a scheduler's SIGTERM, a time limit): ``stop_check`` is asked every ``log_interval``
    steps at an update boundary (its answer summed over the processes, so all stop at the same
    step); on yes the epoch ends there and the result holds ``stopped_at_step`` and the totals so
    far, for a mid-epoch checkpoint. A resumed epoch passes ``start_step`` (steps already done;
    ``loader`` yields only the rest), ``carry`` (the totals of the interrupted part) and
    ``after_iter``, called once the loader's iterator exists (creating it draws from the global
    RNG), to restore the random state of the moment of the stop.

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
    batches = iter(loader)
    if after_iter is not None:
        after_iter()
    # disable=None: a bar on terminals only, so log files and CI output stay readable
    bar = tqdm(batches, total=len(loader), desc=f"epoch {epoch}", disable=None if show_progress else True,
               dynamic_ncols=True, leave=False)
    micro_steps = ((len(loader) + start_step) // accum_steps) * accum_steps
    if max_updates is not None:
        micro_steps = min(micro_steps, max_updates * accum_steps)
    check_every = max(1, log_interval // accum_steps) * accum_steps  # steps between stop checks
    stopped_at_step = None
    for step, (images, targets) in enumerate(bar, start=start_step + 1):
        if step > micro_steps:
            break
        first_of_update = (step - 1) % accum_steps == 0
        last_of_update = step % accum_steps == 0
        if first_of_update and lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=first_update + (step - 1) // accum_steps)
        images = images.to(device, non_blocking=True)
        targets = to_device(targets, device)
        if input_transform is not None:
            images = input_transform(images)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        # DDP: all-reduce the gradients only on the micro-batch that completes an update
        sync = nullcontext if last_of_update or not hasattr(model, "no_sync") else model.no_sync
        with sync(), autocast_context(device, amp_dtype):
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
        if first_of_update:
            optimizer.zero_grad(set_to_none=True)
        with sync():
            scaler.scale(loss if accum_steps == 1 else loss / accum_steps).backward()
        if last_of_update:
            if clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
            if model_ema is not None:
                model_ema.update(getattr(model, "module", model))  # the EMA follows the unwrapped model
        loss_sum += loss_value.to(torch.float64) * images.shape[0]
        samples += images.shape[0]
        if stop_check is not None and last_of_update and step % check_every == 0 and step < micro_steps:
            flag = torch.tensor([1.0 if stop_check() else 0.0])
            if distributed:
                flag = all_reduce_sum(flag)
            if flag.item() > 0:
                stopped_at_step = step
                break
    _stop_if_non_finite(non_finite, epoch, distributed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    totals = all_reduce_sum(torch.stack([loss_sum.cpu(), torch.tensor(float(samples), dtype=torch.float64)]))
    carry = carry or {}
    loss_total = totals[0].item() + float(carry.get("loss_sum", 0.0))
    sample_total = totals[1].item() + float(carry.get("samples", 0.0))
    seconds += float(carry.get("seconds", 0.0))
    reduced = {k for k in kept_tokens if k is not None}
    result = {"train_loss": loss_total / max(sample_total, 1.0),
              "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
              "kept_tokens": max(reduced) if reduced else None}
    if stopped_at_step is not None:
        result.update(stopped_at_step=stopped_at_step, loss_sum=loss_total, samples=sample_total)
    return result


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             sharded: bool = True, input_transform: Optional[Callable] = None) -> Dict[str, float]:
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
        if input_transform is not None:  # the training run's device-side view (e.g. a low-pass crop)
            images = input_transform(images)
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
