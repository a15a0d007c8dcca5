"""The optimizer's schedule: what each epoch trains with (``EpochPlan``, ``Plan``), how many
images one update sees, and when an epoch schedule is stepped.

The global batch. A published run is defined by its images per optimizer update (DeiT-S and
LV-ViT-S: 4 GPUs x 256 = 1,024; YOLOS-Ti: 8 x 2 = 16), not by its GPU count. ``split_global_batch``
reaches that number on any number of processes with the per-process batch and gradient
accumulation, or refuses in one line when it cannot; the lr rule of each trainer then applies to
the same global batch, so a run on 1, 2, 4 or 8 GPUs trains the same schedule.

The stepping: the published DeiT and YOLOS ``main.py`` step the lr schedule AFTER an epoch.

Both create timm's scheduler (which sets the optimizer to the schedule's first lr: ``warmup_lr``
with a warm-up, the base lr without) and call ``lr_scheduler.step(epoch)`` after training epoch
``epoch``. So epoch 0 trains at lr(0), epoch 1 at lr(0) too, and epoch e >= 1 at lr(e - 1): the
whole curve runs one epoch behind the schedule's own indexing. LV-ViT's published ``step(epoch + 1)``
after the epoch is the other convention, epoch e at lr(e), which is what the run lifecycle does when
it calls ``step(epoch)`` before each epoch.

``SteppedAfterEpoch`` gives the published sequence under the lifecycle's before-the-epoch call. It is
a pure function of the epoch (timm's epoch schedulers keep no other state), so a resumed run trains
every epoch at the same lr as a straight run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

from .errors import UserError


def split_global_batch(global_batch: int, world_size: int, batch_size: int) -> Tuple[int, int]:
    """``(per-process batch, accumulation steps)`` that give ``global_batch`` images per update over
    ``world_size`` processes, with at most ``batch_size`` images per process and step: the
    per-process share is ``global_batch / world_size``, split into micro-batches of ``batch_size``
    (or the whole share when it is smaller). A split that does not divide is one UserError line."""
    if global_batch % world_size:
        fits = [n for n in (1, 2, 4, 8, 16, 32, 64) if global_batch % n == 0]
        raise UserError(f"--global-batch {global_batch} cannot be split evenly over {world_size} processes. Run on a "
                        f"number of processes that divides it (e.g. {', '.join(map(str, fits))}), or pass "
                        f"--global-batch {max(1, round(global_batch / world_size)) * world_size}")
    share = global_batch // world_size
    batch = min(batch_size, share)
    if share % batch:
        fit = max(divisor for divisor in range(1, batch + 1) if share % divisor == 0)
        raise UserError(f"--global-batch {global_batch} gives each of {world_size} process(es) {share} images per "
                        f"update, which micro-batches of --batch-size {batch_size} do not divide. Pass --batch-size "
                        f"{fit} (or another divisor of {share})")
    return batch, share // batch


def stepped_after_epoch(epoch: int) -> int:
    """The scheduler position whose lr epoch ``epoch`` trains at when ``step(e)`` follows epoch e:
    0, 0, 1, 2, ... (timm's lr(0) is the optimizer's first lr, so epoch 0 trains at it as well)."""
    return max(epoch - 1, 0)


class SteppedAfterEpoch:
    """A timm epoch scheduler stepped the published DeiT/YOLOS way (see the module docstring)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def step(self, epoch: int) -> None:
        self.scheduler.step(stepped_after_epoch(epoch))

    def state_dict(self) -> Dict[str, Any]:
        return self.scheduler.state_dict()


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains with. A curriculum (EfficientTrain) changes it per epoch; elsewhere
    it is constant. ``batch``: images per process and micro-batch; ``accum``: micro-batches per
    update; ``crop``/``aa``/``view``: the classification input (side in px, RandAugment policy, device-side
    low-resolution view), None for the flags' own; ``counts_for_best``: whether the epoch's metric
    may make best_checkpoint.pth; ``log``: extra fields of the epoch's log record."""

    batch: int
    accum: int = 1
    crop: Optional[int] = None
    aa: Optional[str] = None
    view: Any = None
    counts_for_best: bool = True
    log: Dict[str, Any] = dataclasses.field(default_factory=dict)


class Plan(list):
    """What each epoch of a run trains with: ``plan[epoch]`` is that epoch's EpochPlan. ``epochs``:
    how many; ``per_update``: the lr steps per update (else per epoch); ``identity``: derived values
    stored with the run and checked on resume (a curriculum's segments)."""

    def __init__(self, epochs, per_update: bool = False, identity: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(epochs)
        self.epochs, self.per_update, self.identity = len(self), per_update, dict(identity or {})

    def global_batch(self, world_size: int) -> int:
        """Images per optimizer update over ``world_size`` processes (every epoch's: a curriculum keeps it;
        the lr rules scale with it, args.yaml and the resume check record it)."""
        first = self[0]
        return first.batch * first.accum * world_size


def constant_plan(epochs: int, batch: int, accum: int = 1) -> Plan:
    """Every epoch alike: ``batch`` per process and ``accum`` micro-batches per update (see
    ``split_global_batch``), ``epochs`` epochs, the lr stepped per epoch."""
    return Plan([EpochPlan(batch=batch, accum=accum)] * epochs)
