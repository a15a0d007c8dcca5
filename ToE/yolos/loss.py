"""Hungarian matching and the set criterion of DETR/YOLOS.

Boxes are (cx, cy, w, h) relative to the unpadded transformed image; GIoU is taken on xyxy.
Targets are a list (one per image) of dicts with ``labels`` (M,) int64 and ``boxes`` (M, 4).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss

from ToE.common.distributed import all_reduce_sum


class HungarianMatcher(nn.Module):
    """One-to-one assignment of detection tokens to ground-truth boxes, per image.

    Cost (T queries x M targets) = ``cost_bbox`` * L1(cxcywh) - ``cost_class`` * p(target class)
    - ``cost_giou`` * GIoU, with p the softmax over all C+1 logits (published weights 1/5/2).
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def cost_matrices(self, outputs: Dict[str, torch.Tensor], targets: List[Dict]) -> List[torch.Tensor]:
        """The (T, M_b) cost matrix of every image b."""
        probs = outputs["pred_logits"].float().softmax(-1)                      # (B, T, C+1)
        boxes = outputs["pred_boxes"].float()                                   # (B, T, 4)
        costs = []
        for b, target in enumerate(targets):
            labels, tgt = target["labels"], target["boxes"].float()
            cost = (self.cost_bbox * torch.cdist(boxes[b], tgt, p=1)
                    - self.cost_class * probs[b][:, labels]
                    - self.cost_giou * generalized_box_iou(box_convert(boxes[b], "cxcywh", "xyxy"),
                                                           box_convert(tgt, "cxcywh", "xyxy")))
            costs.append(cost)
        return costs

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per image: (query indices, target indices), int64, of equal length min(T, M)."""
        matches = []
        for cost in self.cost_matrices(outputs, targets):
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches


class SetCriterion(nn.Module):
    """Classification (with the no-object weight ``eos_coef``), L1 and GIoU losses of matched pairs.

    ``forward(outputs, targets)`` returns a dict with the weighted total ``loss`` and each term:
    ``loss_ce`` = weighted CE over all T tokens (unmatched -> class C, "no object"; the mean is
    divided by the sum of the weights); ``loss_bbox`` = sum of L1 / num_boxes; ``loss_giou`` =
    sum of (1 - GIoU) / num_boxes, num_boxes = the boxes of the whole batch averaged over the
    processes and clamped at 1. Logged only: ``class_error`` (top-1 error of matched tokens, %).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, eos_coef: float = 0.1,
                 loss_weights: Dict[str, float] = None, distributed: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(loss_weights or {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0})
        self.distributed = distributed
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def num_boxes(self, targets: List[Dict], device: torch.device) -> torch.Tensor:
        count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], dtype=torch.float64)
        if self.distributed:
            count = all_reduce_sum(count)
            count = count / torch.distributed.get_world_size()
        return count.clamp_min(1.0).to(device=device, dtype=torch.float32)[0]

    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict]) -> Dict[str, torch.Tensor]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]           # (B, T, C+1), (B, T, 4)
        matches = self.matcher(outputs, targets)
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matches)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in matches]).to(logits.device)
        matched_labels = torch.cat([t["labels"][tg.to(t["labels"].device)] for t, (_, tg) in zip(targets, matches)])
        matched_boxes = torch.cat([t["boxes"][tg.to(t["boxes"].device)] for t, (_, tg) in zip(targets, matches)])

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, query_idx] = matched_labels.to(logits.device)
        loss_ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.empty_weight)

        num_boxes = self.num_boxes(targets, logits.device)
        src_boxes = boxes[batch_idx, query_idx].float()                        # (M, 4)
        matched_boxes = matched_boxes.to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, matched_boxes, reduction="sum") / num_boxes
        loss_giou = generalized_box_iou_loss(box_convert(src_boxes, "cxcywh", "xyxy"),
                                             box_convert(matched_boxes, "cxcywh", "xyxy"), reduction="sum") / num_boxes
        losses = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        losses["loss"] = sum(self.weight_dict[k] * v for k, v in losses.items())
        with torch.no_grad():
            if len(matched_labels):
                hits = logits[batch_idx, query_idx].argmax(-1).eq(matched_labels.to(logits.device)).float().mean()
                losses["class_error"] = 100.0 * (1.0 - hits)
            else:
                losses["class_error"] = torch.zeros((), device=logits.device)
        return losses
