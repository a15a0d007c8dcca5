"""COCO bbox evaluation: detections of every process gathered, scored once by pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ToE.common.distributed import all_reduce_sum
from ToE.yolos.model import postprocess

STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def to_coco_results(predictions, image_ids) -> List[Dict]:
    """Postprocessed detections -> COCO results (image_id, category_id, bbox xywh in pixels, score)."""
    results = []
    for image_id, pred in zip(image_ids, predictions):
        boxes = pred["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        for box, score, label in zip(boxes.tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": score})
    return results


def score_detections(coco_gt, results: List[Dict], image_ids=None) -> Tuple[Dict[str, float], str]:
    """COCOeval (bbox) of ``results`` against ``coco_gt`` -> (the 12 stats by name, printed summary).

    No detections at all score 0 (pycocotools cannot load an empty result list).
    """
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in STAT_NAMES}, "no detections"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    stats = [float(v) for v in np.asarray(evaluator.stats)]
    return dict(zip(STAT_NAMES, stats)), summary.getvalue().rstrip()


def gather_results(results: List[Dict]) -> List[Dict]:
    """All processes' results on every process (as is without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return results
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    return [item for part in gathered for item in part]


@torch.no_grad()
def evaluate(model, criterion, loader, coco_gt, device: torch.device, show_progress: bool = False):
    """Detections of this process's shard, gathered from all processes and scored once.

    Returns (stats dict with AP... and the mean validation ``loss``, the COCO results of all
    processes, the printed COCOeval summary). Every process gets the same numbers. The loss and
    the detections stay on the device until the end of the pass (no host sync per batch).
    """
    from tqdm import tqdm

    model.eval()
    predictions, image_ids = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # loss x images
    for images, targets in tqdm(loader, desc="eval", disable=None if show_progress else True, leave=False):
        images = images.to(device, non_blocking=True)
        outputs = model(images)
        if criterion is not None:
            on_device = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            loss_sum += criterion(outputs, on_device)["loss"].detach().double() * len(targets)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device, non_blocking=True)
        predictions += postprocess(outputs, orig_sizes)
        image_ids += [int(t["image_id"]) for t in targets]
    on_host = [{k: v.cpu() for k, v in pred.items()} for pred in predictions]
    sums = all_reduce_sum(torch.stack([loss_sum.cpu(), torch.tensor(float(len(image_ids)), dtype=torch.float64)]))
    results = gather_results(to_coco_results(on_host, image_ids))
    all_ids = gather_results(image_ids)
    distributed = dist.is_available() and dist.is_initialized()
    scored = [None]
    if not distributed or dist.get_rank() == 0:  # scored once, by rank 0, and sent to the others
        scored = [score_detections(coco_gt, results, all_ids)]
    if distributed:
        dist.broadcast_object_list(scored, src=0)
    stats, summary = scored[0]
    stats["loss"] = sums[0].item() / max(sums[1].item(), 1.0)
    stats["images"] = len(set(all_ids))
    return stats, results, summary


def write_results(results: List[Dict], path: str) -> None:
    with open(path, "w") as handle:
        json.dump(results, handle)
