"""The token-labelling loss (published ``TokenLabelCrossEntropy``), in the loop's
``loss(images, outputs, targets)`` form."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy -sum_c t_c log softmax(x)_c: (R, C), (R, C) -> (R,)."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


class TokenLabelLoss(nn.Module):
    """cls_weight * CE(x_cls, t_cls) + dense_weight * CE(x_aux, t_aux), the dense term averaged over
    the B * N tokens (published) or, with ``kept_only``, over the positions the model really computed
    under ToE (``model.dense_mask``; the others only hold the aux head's bias).

    Targets: (B, C, 2 + N) from ``TokenLabelTargets`` ([ground truth, class target, N dense]) or
    (B, C) without label data (repeated for every token). Outputs: the model's train tuple
    ``(x_cls (B, C), x_aux (B, N, C), box)``; under MixToken the class target is mixed with its batch
    mirror by lambda' = 1 - box area / N (the dense outputs are already un-mixed).
    ``ground_truth``: mix the class target with the ground truth, r t + (1 - r) gt with r = 0.5 where
    teacher and ground truth agree and 0.9 where they disagree (published; the opposite of its comment).
    A plain (B, C) output (eval, or a model without aux head) gets the class term alone.
    """

    def __init__(self, dense_weight: float = 1.0, cls_weight: float = 1.0, ground_truth: bool = False,
                 kept_only: bool = False, model: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.dense_weight = dense_weight
        self.cls_weight = cls_weight
        self.ground_truth = ground_truth
        self.kept_only = kept_only
        # a plain attribute, not a submodule: the loss must not own (or save) the model's weights
        object.__setattr__(self, "_model", model)

    def forward(self, images: torch.Tensor, outputs, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 3:
            t_gt, t_cls, t_aux = target[:, :, 0], target[:, :, 1], target[:, :, 2:]
        else:
            t_gt, t_cls, t_aux = target, target, None
        if not isinstance(outputs, (tuple, list)):
            return self.cls_weight * soft_cross_entropy(outputs, t_cls).mean()
        x_cls, x_aux, box = outputs
        batch, tokens, num_classes = x_aux.shape
        if self.ground_truth and target.dim() == 3:
            agree = (t_cls.argmax(1) == t_gt.argmax(1)).to(t_cls.dtype)[:, None]
            ratio = 0.5 * agree + 0.9 * (1.0 - agree)
            t_cls = ratio * t_cls + (1.0 - ratio) * t_gt
        # (a tensor box: no host read, and a compiled step keeps one graph; an empty box gives lambda' = 1,
        # which leaves t_cls exactly as it is)
        box = torch.as_tensor(box, device=x_cls.device, dtype=torch.float64)
        area = (box[2] - box[0]).clamp_min(0) * (box[3] - box[1]).clamp_min(0)
        lam = (1.0 - area / tokens).to(t_cls.dtype)
        t_cls = lam * t_cls + (1.0 - lam) * t_cls.flip(0)
        if t_aux is None:  # no label data: every token's target is its own image's (un-mixed) label
            t_aux = target[:, None, :].expand(batch, tokens, num_classes)
        else:
            t_aux = t_aux.transpose(1, 2)                                     # (B, N, C)
        cls_loss = soft_cross_entropy(x_cls, t_cls).mean()
        dense = soft_cross_entropy(x_aux.reshape(-1, num_classes), t_aux.reshape(-1, num_classes))
        mask = getattr(self._model, "dense_mask", None) if self.kept_only else None
        if mask is not None:
            weights = mask.reshape(-1).to(dense.dtype)
            dense_loss = (dense * weights).sum() / weights.sum().clamp_min(1.0)
        else:
            dense_loss = dense.mean()
        return self.cls_weight * cls_loss + self.dense_weight * dense_loss
