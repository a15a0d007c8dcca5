"""DeiT's loss wrapper: the base loss, plus distillation from a frozen teacher when asked."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class DistillationLoss(nn.Module):
    """``loss(images, outputs, targets)`` so the training loop does not branch on the variant.

    ``outputs`` is a tensor, or for a distilled student in training mode the pair
    (class-token logits, distillation-token logits). Without a teacher both heads learn the
    labels. With one, the distillation head learns the teacher: ``soft`` is the KL divergence at
    temperature ``tau`` (scaled by tau^2, averaged over logits as DeiT does), ``hard`` the
    cross-entropy with the teacher's argmax;
    ``alpha`` weighs the two heads.
    """

    def __init__(self, base_criterion: nn.Module, teacher: Optional[nn.Module] = None,
                 distillation_type: str = "none", alpha: float = 0.5, tau: float = 1.0) -> None:
        super().__init__()
        if distillation_type not in ("none", "soft", "hard"):
            raise ValueError(f"unknown distillation type {distillation_type!r}")
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, images: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, (tuple, list)):
            return self.base_criterion(outputs, targets)
        class_logits, dist_logits = outputs
        base = self.base_criterion(class_logits, targets)
        if self.distillation_type == "none" or self.teacher is None:
            return 0.5 * (base + self.base_criterion(dist_logits, targets))
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        if self.distillation_type == "soft":
            tau = self.tau
            distill = F.kl_div(F.log_softmax(dist_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                               reduction="sum", log_target=True) * tau * tau / dist_logits.numel()
        else:
            distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
        return (1.0 - self.alpha) * base + self.alpha * distill

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher is frozen and always full-token
        return self
