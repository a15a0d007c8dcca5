"""The EfficientTrain task: shared classification driven by a curriculum over the global epoch
(low-pass crop size, RandAugment magnitude, batch and accumulation per segment), with ToE on the
same epoch and the patch grid of the current crop.

The curriculum is the run's plan: the lifecycle asks it before each epoch, and the classification
task builds that epoch's loader, augmentation and view from the answer. Position embeddings across
resolutions: the model keeps its full-resolution table and timm interpolates it to the current grid
in every forward (``dynamic_img_size``); see the README, "EfficientTrain + ToE", for the measurement
behind this choice. The parameter never changes shape, so the optimizer always holds the live table,
a resume across a resolution change is a plain strict load, and every checkpoint is a plain timm
model at the final resolution.
"""

from __future__ import annotations

import math
from typing import List

import token_select
from ToE.common.classification import ClassificationTask
from ToE.common.errors import UserError
from ToE.common.schedule import EpochPlan, Plan
from ToE.EfficientTrain.curriculum import LowPass, Segment, aa_policy, plan_curriculum, segment_at


class PublishedCosine:
    """EfficientTrain's lr per update, as published: a linear warmup over ``warmup`` updates that
    includes both ends (``linspace(warmup_lr, base, warmup)``), then a cosine from the base lr to
    ``min_lr`` over the remaining ``total - warmup`` updates (it starts after the warmup).
    ``step_update(u)`` sets update u's lr in every parameter group; ``step(epoch)`` does nothing."""

    def __init__(self, optimizer, total: int, warmup: int, warmup_lr: float, min_lr: float) -> None:
        self.optimizer, self.total, self.warmup = optimizer, total, warmup
        self.warmup_lr, self.min_lr = warmup_lr, min_lr
        self.base = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self.step_update(0)

    def lr(self, base: float, update: int) -> float:
        if update < self.warmup:
            share = update / (self.warmup - 1) if self.warmup > 1 else 0.0
            return self.warmup_lr + (base - self.warmup_lr) * share
        progress = (update - self.warmup) / max(1, self.total - self.warmup)
        return self.min_lr + 0.5 * (base - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def step(self, epoch: int) -> None:
        """The lr changes per update only."""

    def step_update(self, num_updates: int, metric=None) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = self.lr(base, num_updates)

    def state_dict(self) -> dict:
        return {"total": self.total, "warmup": self.warmup, "warmup_lr": self.warmup_lr, "min_lr": self.min_lr}


def curriculum_plan(segments: List[Segment], args, global_batch: int) -> Plan:
    """The segments as the run's plan: epoch e's EpochPlan is its segment's crop, RandAugment
    magnitude, batch and accumulation (every segment's updates hold ``global_batch`` images); the lr
    steps per update (published); the segments are stored with the run (a resume must plan the same)."""
    epochs = []
    for epoch in range(segments[-1].end):
        segment = segment_at(segments, epoch)
        full = segment.crop == args.input_size
        aa = aa_policy(args.aa, segment.magnitude)
        epochs.append(EpochPlan(
            batch=segment.batch, accum=segment.accum, crop=segment.crop, aa=aa,
            view=None if full else LowPass(segment.crop, args.low_pass),
            # low-resolution epochs are evaluated at their own crop: not comparable
            counts_for_best=full,
            log={"segment": segments.index(segment), "resolution": segment.crop,
                 "magnitude": segment.magnitude if segment.magnitude >= 0 else None, "aa": aa,
                 "batch": segment.batch, "accum": segment.accum, "global_batch": global_batch}))
    return Plan(epochs, per_update=True,
                identity={"curriculum_plan": [[s.start, s.end, s.crop, s.magnitude] for s in segments]})


class EfficientTrainTask(ClassificationTask):
    """EfficientTrain (+ ToE) classification: the classification task on the curriculum's plan."""

    def build_plan(self) -> Plan:
        args, world = self.args, self.env.world_size
        global_batch = args.global_batch or args.batch_size * world
        # etpp: --epochs is the budget in full-resolution epochs
        segments = plan_curriculum(args.curriculum, args.epochs, args.input_size,
                                   token_select.patch_size(self.meta_model()),
                                   args.batch_size, global_batch, world, args.segments)
        return curriculum_plan(segments, args, global_batch)

    @staticmethod
    def check_flags(args) -> List[str]:
        warnings = ClassificationTask.check_flags(args)
        if args.cooldown_epochs:
            raise UserError(f"--cooldown-epochs {args.cooldown_epochs}: EfficientTrain's schedule has no cooldown (its "
                            "cosine ends at --min-lr with the last segment). Leave --cooldown-epochs out")
        if args.sched != "cosine":
            raise UserError(f"--sched {args.sched}: EfficientTrain trains with its published per-update cosine. Leave "
                            "--sched out")
        if args.segments and args.curriculum != "table":
            raise UserError(f"--segments is read by --curriculum table only, this run gives --curriculum "
                            f"{args.curriculum}. Add --curriculum table, or leave --segments out")
        return warnings

    def build_scheduler(self) -> PublishedCosine:
        args, updates = self.args, self.updates_per_epoch
        return PublishedCosine(self.optimizer, self.plan.epochs * updates, args.warmup_epochs * updates,
                               args.warmup_lr, args.min_lr)
