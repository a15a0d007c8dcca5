"""When an epoch schedule is stepped: the published DeiT and YOLOS ``main.py`` step it AFTER an epoch.

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

from typing import Any, Dict


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
