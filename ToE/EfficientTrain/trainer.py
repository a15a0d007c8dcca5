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
import re
from typing import List

from ToE.common.classification import ClassificationTask
from ToE.common.errors import UserError
from ToE.common.lifecycle import EpochPlan
from ToE.EfficientTrain.curriculum import LowPass, Segment, aa_policy, plan_curriculum, segment_at


def patch_size_of(args) -> int:
    """The patch side: ``--patch-size``, else ``--model-kwargs patch_size=N``, else the ``patchN`` in a
    timm name (16 when it has none). The model built from the same flags is checked against it."""
    if args.patch_size:
        return int(args.patch_size)
    if "patch_size" in args.model_kwargs:
        return int(args.model_kwargs["patch_size"])
    found = re.search(r"patch(\d+)", args.model)
    return int(found.group(1)) if found else 16


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


class Curriculum:
    """The segments as the run's plan: ``curriculum(epoch)`` is that epoch's EpochPlan; the lr
    steps per update (published), and every segment's updates hold ``global_batch`` images."""

    per_update = True

    def __init__(self, segments: List[Segment], args, global_batch: int) -> None:
        self.segments, self.args, self.global_batch = segments, args, global_batch
        self.epochs = segments[-1].end
        # stored with the run (args.yaml, checkpoints): a resume must plan the same curriculum
        self.identity = {"curriculum_plan": [[s.start, s.end, s.crop, s.magnitude] for s in segments]}

    def __call__(self, epoch: int) -> EpochPlan:
        segment = segment_at(self.segments, epoch)
        args = self.args
        full = segment.crop == args.input_size
        aa = aa_policy(args.aa, segment.magnitude)
        return EpochPlan(batch=segment.batch, accum=segment.accum, crop=segment.crop, aa=aa,
                         view=None if full else LowPass(segment.crop, args.low_pass),
                         # low-resolution epochs are evaluated at their own crop: not comparable
                         counts_for_best=full,
                         log={"segment": self.segments.index(segment), "resolution": segment.crop,
                              "magnitude": segment.magnitude if segment.magnitude >= 0 else None, "aa": aa,
                              "batch": segment.batch, "accum": segment.accum, "global_batch": self.global_batch})


class EfficientTrainTask(ClassificationTask):
    """EfficientTrain (+ ToE) classification: the classification task on the curriculum's plan."""

    def build_plan(self) -> Curriculum:
        args, world = self.args, self.env.world_size
        global_batch = args.global_batch or args.batch_size * world
        # etpp: --epochs is the budget in full-resolution epochs
        segments = plan_curriculum(args.curriculum, args.epochs, args.input_size, patch_size_of(args),
                                   args.batch_size, global_batch, world, args.segments)
        return Curriculum(segments, args, global_batch)

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
