"""The EfficientTrain run: the shared classification loop driven by a curriculum over the global
epoch (low-pass crop size, RandAugment magnitude, batch and accumulation per segment), with ToE
on the same epoch and the patch grid of the current crop.

Position embeddings across resolutions: the model keeps its full-resolution table and timm
interpolates it to the current grid in every forward (``dynamic_img_size``); see the README,
"EfficientTrain + ToE", for the measurement behind this choice. The parameter never changes shape,
so the optimizer always holds the live table, a resume across a resolution change is a plain
strict load, and every checkpoint is a plain timm model at the final resolution.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional

from timm.layers import PatchDropout

import token_select
from ToE.common.checkpoint import check_resume_args, load_checkpoint
from ToE.common.classification import ClassificationTrainer
from ToE.common.errors import UserError
from ToE.EfficientTrain.curriculum import LowPass, Segment, aa_policy, plan_curriculum, segment_at

# Flags whose change would make a resumed run another curriculum.
CURRICULUM_MUST_MATCH = ("curriculum", "segments", "global_batch", "low_pass")


def patch_size_of(args) -> int:
    """The patch side: ``--patch-size``, else the ``patchN`` in a timm name (16 when it has none)."""
    if args.patch_size:
        return int(args.patch_size)
    found = re.search(r"patch(\d+)", args.model)
    return int(found.group(1)) if found else 16


class Trainer(ClassificationTrainer):
    """EfficientTrain (+ ToE) classification; ``fit()`` trains the whole curriculum and checkpoints."""

    def __init__(self, args) -> None:
        # The curriculum is checked before anything is built (a bad table is one line, no work).
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.patch = patch_size_of(args)
        self.global_batch = args.global_batch or args.batch_size * world
        if args.curriculum == "etpp" and getattr(args, "budget_epochs", None) is None:
            args.budget_epochs = args.epochs  # etpp: --epochs is the budget in full-resolution epochs
        epochs = args.budget_epochs if args.curriculum == "etpp" else args.epochs
        self.segments = plan_curriculum(args.curriculum, epochs, args.input_size, self.patch, args.batch_size,
                                        self.global_batch, world, args.segments)
        args.epochs = self.segments[-1].end
        args.curriculum_plan = [segment.as_dict() for segment in self.segments]
        self.segment: Optional[Segment] = None
        super().__init__(args)
        updates = self.updates_per_epoch()
        if not args.eval and updates < 1:
            raise UserError(f"the training split has {len(self.train_set)} images, fewer than one update of "
                            f"--global-batch {self.global_batch}. Lower --global-batch")

    # -- model: one full-resolution position table, interpolated to the current grid -------------
    def _build_model(self) -> None:
        kwargs = self.args.model_kwargs
        self.args.model_kwargs = {**kwargs, "dynamic_img_size": True}
        try:
            super()._build_model()
        finally:
            self.args.model_kwargs = kwargs
        self.random_kept: Optional[int] = None
        if self.args.token_drop == "random":
            # the baseline: timm's PatchDropout keeps a random subset of the patch tokens before
            # block 0, as many as ToE keeps after block 0 (the operator only counts them)
            token_select.detach(self.model_without_ddp)
            self.model_without_ddp.patch_drop = PatchDropout(0.0, num_prefix_tokens=self.toe.num_prefix_tokens)

    # -- hooks of the shared loop ---------------------------------------------------------------
    def total_batch(self) -> int:
        return self.global_batch

    def updates_per_epoch(self) -> int:
        """Updates per epoch, the same in every segment: the process's images over its share of an update."""
        return len(self.train_sampler) // (self.global_batch // self.env.world_size)

    def prepare_epoch(self, epoch: int) -> None:
        self._enter_segment(segment_at(self.segments, epoch))
        if self.args.token_drop == "random":
            self.toe.update_current_stage(epoch)
            kept = self.toe.kept_patch_tokens(self.num_patches)
            # PatchDropout keeps int(P * (1 - prob)) tokens: aim between two integers
            self.model_without_ddp.patch_drop.prob = 0.0 if kept >= self.num_patches else \
                1.0 - (kept + 0.5) / self.num_patches
            self.random_kept = kept

    def _enter_segment(self, segment: Segment) -> None:
        if segment == self.segment:
            return
        self.segment = segment
        args = self.args
        self.train_set.transform = self.train_transform(args.input_size, aa_policy(args.aa, segment.magnitude))
        self.train_loader = self.build_train_loader(segment.batch)
        self.accum_steps = segment.accum
        self.input_transform = None if segment.crop == args.input_size else LowPass(segment.crop, args.low_pass)
        grid = segment.crop // self.patch
        self.num_patches = grid * grid
        # uniform seeds are laid out on the grid the operator sees now
        self.toe.grid_size = (grid, grid)
        if self.model_ema is not None:
            self.model_ema.module.token_select.grid_size = (grid, grid)
        if self.env.is_main:
            index = self.segments.index(segment)
            view = "full resolution" if self.input_transform is None else f"{args.low_pass} low-pass"
            print(f"segment {index} (epochs {segment.start}-{segment.end - 1}): {segment.crop} px "
                  f"({self.num_patches} patch tokens, {view}), RandAugment "
                  f"{aa_policy(args.aa, segment.magnitude)}, batch {segment.batch} x {segment.accum} accumulation "
                  f"x {self.env.world_size} process(es) = {self.global_batch}", flush=True)

    def counts_for_best(self, epoch: int) -> bool:
        # low-resolution epochs are evaluated at their own crop: not comparable with the final model
        return segment_at(self.segments, epoch).crop == self.args.input_size

    def epoch_log_fields(self, epoch: int) -> Dict[str, Any]:
        segment = segment_at(self.segments, epoch)
        return {"segment": self.segments.index(segment), "resolution": segment.crop,
                "magnitude": segment.magnitude if segment.magnitude >= 0 else None,
                "aa": aa_policy(self.args.aa, segment.magnitude), "patch_tokens": self.num_patches,
                "batch": segment.batch, "accum": segment.accum, "global_batch": self.global_batch,
                **({"kept_tokens": self.random_kept, "token_drop": "random"} if self.random_kept is not None else {})}

    def _resume(self, path: str) -> None:
        stored = load_checkpoint(path).get("args") or {}
        check_resume_args(path, stored, vars(self.args), CURRICULUM_MUST_MATCH)
        plan = stored.get("curriculum_plan")
        if not self.args.eval and plan is not None:
            keys = ("start", "end", "crop", "magnitude")
            before = [[row[k] for k in keys] for row in plan]
            now = [[row[k] for k in keys] for row in self.args.curriculum_plan]
            if before != now:
                raise UserError(f"resume file {path} was trained with the curriculum (start, end, crop, magnitude) "
                                f"{before}, this run plans {now}. Resume with the flags it was trained with "
                                "(--curriculum, --segments, --epochs, --input-size), or start a new run")
        super()._resume(path)
