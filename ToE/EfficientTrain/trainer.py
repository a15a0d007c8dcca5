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

import re
from typing import List

from ToE.common.classification import ClassificationTask
from ToE.common.lifecycle import EpochPlan
from ToE.EfficientTrain.curriculum import LowPass, Segment, aa_policy, plan_curriculum, segment_at


def patch_size_of(args) -> int:
    """The patch side: ``--patch-size``, else the ``patchN`` in a timm name (16 when it has none)."""
    if args.patch_size:
        return int(args.patch_size)
    found = re.search(r"patch(\d+)", args.model)
    return int(found.group(1)) if found else 16


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

    # a resume with another curriculum would be another run
    resume_must_match = ClassificationTask.resume_must_match + ("curriculum", "segments", "global_batch", "low_pass")

    def build_plan(self) -> Curriculum:
        args, world = self.args, self.env.world_size
        global_batch = args.global_batch or args.batch_size * world
        # etpp: --epochs is the budget in full-resolution epochs
        segments = plan_curriculum(args.curriculum, args.epochs, args.input_size, patch_size_of(args),
                                   args.batch_size, global_batch, world, args.segments)
        return Curriculum(segments, args, global_batch)
