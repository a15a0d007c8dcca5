"""The DeiT task: shared classification plus what is DeiT's own, distillation from a frozen
teacher loaded from disk (distilled DeiT students)."""

from __future__ import annotations

import os

import timm
import torch

from ToE.common.classification import ClassificationTask
from ToE.common.errors import UserError
from ToE.common.schedule import SteppedAfterEpoch
from ToE.deit.losses import DistillationLoss


class DeiTTask(ClassificationTask):
    """DeiT classification with Token Expansion (the loss may distil from a teacher)."""

    def build_scheduler(self):
        """timm's schedule stepped as the published DeiT ``main.py`` steps it, after each epoch:
        epochs 0 and 1 train at ``--warmup-lr``, epoch e at lr(e - 1) (``ToE.common.schedule``)."""
        return SteppedAfterEpoch(super().build_scheduler())

    def build_criterion(self, base: torch.nn.Module) -> torch.nn.Module:
        args = self.args
        teacher = None
        if args.distillation_type != "none":
            teacher = self._load_teacher()
            # timm's distilled DeiT returns the (class, distillation) logit pair in training only when
            # asked; without this the loss gets averaged logits and the teacher is never consulted
            self.model.set_distilled_training(True)
        return DistillationLoss(base, teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau)

    def _load_teacher(self) -> torch.nn.Module:
        args = self.args
        if not hasattr(self.model, "head_dist"):
            raise UserError(f"--distillation-type {args.distillation_type} needs a distilled student "
                            f"(e.g. deit_small_distilled_patch16_224), not {args.model}")
        if not timm.is_model(args.teacher_model):
            raise UserError(f"unknown teacher model {args.teacher_model!r}. Pass a timm name with --teacher-model")
        if not args.teacher_path or not os.path.isfile(args.teacher_path):
            raise UserError(f"teacher checkpoint {args.teacher_path or '(none)'} not found. Pass --teacher-path "
                            "with the teacher's weights on disk")
        teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=self.num_classes)
        try:
            state = torch.load(args.teacher_path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UserError(f"teacher checkpoint {args.teacher_path} is unreadable ({error.__class__.__name__}). "
                            "Pass a torch.save'd state_dict") from None
        state = state.get("model", state) if isinstance(state, dict) else state
        try:
            teacher.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise UserError(f"teacher checkpoint {args.teacher_path} does not fit {args.teacher_model} ({first}). "
                            "Check --teacher-model") from None
        return teacher.to(self.device).eval()
