"""Detection (YOLOS) as a task of the run lifecycle (``ToE.common.lifecycle.Run``).

Its own: the detector, COCO data, the matcher and set criterion, YOLOS's parameter groups and
epoch schedule, COCOeval. The lifecycle does the rest, as for classification: flags, outputs,
resume, preemption, AMP, DDP, checkpoints, logs.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Tuple

import torch
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, DistributedSampler, Subset

import token_select
from ToE.common.data import check_images, epoch_loader
from ToE.common.distributed import autocast
from ToE.common.errors import UserError
from ToE.common.lifecycle import RunContext, Task
from ToE.common.schedule import constant_plan, EpochPlan, SteppedAfterEpoch, split_global_batch
from ToE.yolos.data import CocoDetection, collate, eval_transform, train_transform
from ToE.yolos.evaluation import evaluate, write_results
from ToE.yolos.loss import HungarianMatcher, SetCriterion
from ToE.yolos.model import YOLOS, create_backbone, load_init_checkpoint, sincos_position_table

NO_DECAY_NAMES = ("pos_embed", "cls_token", "det_token")
LOSS_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "class_error")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """YOLOS's three groups: the heads (decayed, biases too); backbone tensors without decay (1-D,
    biases, position tables, class and detection tokens); the rest of the backbone, decayed
    (the mid-layer position tables included, as published)."""
    head, no_decay, decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(("class_embed.", "bbox_embed.")):
            head.append(param)
        elif param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": head, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


class DetectionTask(Task):
    """Detector, COCO data, set criterion and optimizer of one YOLOS run; the lifecycle drives it."""

    best_metric = "AP"
    weights_must_match = ("backbone_name", "backbone_kwargs", "det_token_num", "mid_pe_size")
    misfit = ("this detector", "Pass the --backbone_name/--backbone-kwargs/--det_token_num/--mid_pe_size it was "
                               "trained with")

    @staticmethod
    def check_flags(args: argparse.Namespace) -> List[str]:
        if args.eval and not args.resume:
            raise UserError("--eval needs the weights to evaluate: pass --resume CHECKPOINT")
        if not args.eval and args.start_epoch >= args.epochs:
            raise UserError(f"--start_epoch {args.start_epoch} is not below --epochs {args.epochs}: nothing to train")
        if args.torchcompile:
            raise UserError(f"--torchcompile {args.torchcompile}: YOLOS trains on images of many sizes (multi-scale "
                            "resizing and padding), each a graph of its own to compile. Leave --torchcompile out")
        if args.crop_size[0] > args.crop_size[1]:
            raise UserError(f"--crop-size {args.crop_size[0]} {args.crop_size[1]} must be MIN MAX with MIN <= MAX")
        if args.warmup_epochs >= args.epochs and not args.eval:
            return [f"--warmup-epochs {args.warmup_epochs} is as long as the run (--epochs {args.epochs}): the "
                    "learning rate never leaves the warmup (fine for a smoke test; lower --warmup-epochs otherwise)"]
        return []

    def __init__(self, args: argparse.Namespace, context: RunContext) -> None:
        self.args, self.env, self.device, self.toe = args, context.env, context.device, context.toe
        self.amp_dtype = context.amp_dtype
        world = self.env.world_size
        # the published global batch (8 GPUs x 2 for YOLOS-Ti) on any number of processes
        self.plan = constant_plan(args.epochs, *split_global_batch(args.global_batch or args.batch_size * world, world,
                                                                  args.batch_size))
        backbone = create_backbone(args.backbone_name, args.backbone_kwargs)
        if args.init_checkpoint:
            load_init_checkpoint(backbone, args.init_checkpoint)
        if args.pos_init_sincos:  # after the init checkpoint: its patch rows are replaced
            sincos_position_table(backbone, args.pos_init_sincos)
        self.patch_size = token_select.patch_size(backbone)
        self._build_data()
        model = YOLOS(backbone, self.num_classes, args.det_token_num, args.init_pe_size, args.mid_pe_size,
                      args.pe_resize_by_count)
        model.attach_toe(self.toe)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr,
                                           weight_decay=args.weight_decay)
        # a pure function of the epoch and the flags: a resume rebuilds it instead of loading it
        # published YOLOS steps its cosine after each epoch: epochs 0 and 1 at the base lr
        self.lr_scheduler = SteppedAfterEpoch(CosineLRScheduler(
            self.optimizer, t_initial=args.epochs, lr_min=args.min_lr, warmup_t=args.warmup_epochs,
            warmup_lr_init=args.warmup_lr))
        self.updates_per_epoch = None
        self.clip_grad = args.clip_max_norm or None
        self.ema_decay = None
        matcher = HungarianMatcher(args.set_cost_class, args.set_cost_bbox, args.set_cost_giou)
        weights = {"loss_ce": 1.0, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
        self.criterion = SetCriterion(self.num_classes, matcher, args.eos_coef, weights,
                                      distributed=self.env.distributed).to(self.device)
        # validation loss per process, without the box-count all-reduce: shards may differ by a batch
        self.eval_criterion = SetCriterion(self.num_classes, matcher, args.eos_coef, weights).to(self.device)

    def _build_data(self) -> None:
        args, env = self.args, self.env
        eval_max = args.eval_max_size or args.eval_size * 1333 // 800
        train_tf = train_transform(args.scales, args.max_size, args.select_scales, args.crop_size, self.patch_size,
                                   args.hflip)
        self.train_set = CocoDetection(args.data_path, "train", train_tf, args.num_classes)
        self.num_classes = args.num_classes or self.train_set.num_classes
        self.val_set = CocoDetection(args.data_path, "val", eval_transform(args.eval_size, eval_max, self.patch_size),
                                     self.num_classes)
        train_file, val_file = self.train_set.annotation_file, self.val_set.annotation_file
        if self.train_set.categories != self.val_set.categories:
            raise UserError(f"the categories (id, name) of {train_file} and {val_file} differ: the model would be "
                            "scored on other classes than it learns. Give both files the same 'categories' list")
        if not self.val_set.ids:
            raise UserError(f"{val_file} lists no images: every evaluation would score 0 on 0 images. Add the "
                            "validation images")
        if not args.check_only:  # a corrupt val image fails the set-up, not the first evaluation
            check_images(self.val_set, "val", range(env.rank, len(self.val_set), env.world_size),
                         num_workers=args.num_workers)
        update = self.plan[0].batch * self.plan[0].accum  # images per process and update
        if len(self.train_set) // env.world_size < update and not args.eval:
            raise UserError(f"the training split has {len(self.train_set)} images, fewer than one update of "
                            f"{update} per process ({env.world_size} processes). Lower --batch_size or "
                            "--global-batch")
        self.train_sampler = DistributedSampler(self.train_set, num_replicas=env.world_size, rank=env.rank,
                                                shuffle=True, seed=args.seed, drop_last=True)
        # each process takes every world_size-th image, so every image is scored exactly once
        shard = list(range(env.rank, len(self.val_set), env.world_size))
        self.val_loader = DataLoader(Subset(self.val_set, shard), batch_size=args.eval_batch_size or args.batch_size,
                                     shuffle=False, **self._loader_kwargs())

    def _loader_kwargs(self) -> Dict[str, Any]:
        return dict(num_workers=self.args.num_workers, collate_fn=collate, pin_memory=self.device.type == "cuda")

    # -- what the lifecycle calls ------------------------------------------------------------------
    def train_loader(self, epoch: int, plan: EpochPlan, skip: int) -> DataLoader:
        return epoch_loader(self.train_set, self.train_sampler, epoch, plan, skip, **self._loader_kwargs())

    def train_step(self, model: torch.nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, Any], int]:
        """Padded images and target lists -> the set loss; its terms and the patch tokens as metrics."""
        images, targets = batch
        images = images.to(self.device, non_blocking=True)
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        losses = self.criterion(model(images), targets)
        metrics: Dict[str, Any] = {k: losses[k].detach() for k in LOSS_TERMS}
        metrics["patch_tokens"] = (images.shape[2] // self.patch_size) * (images.shape[3] // self.patch_size)
        return losses["loss"], metrics, images.shape[0]

    def evaluate(self, model: torch.nn.Module) -> Dict[str, float]:
        with autocast(self.device, self.amp_dtype if self.args.eval_amp else None):
            stats, _, _ = evaluate(model, self.eval_criterion, self.val_loader, self.val_set.coco, self.device)
        return stats

    def eval_text(self, stats: Dict[str, float]) -> str:
        return f"AP {stats['AP']:.4f}, AP50 {stats['AP50']:.4f}"

    def describe(self) -> str:
        args = self.args
        grid = self.model.init_grid
        kept = token_select.kept_tokens_per_stage(grid[0] * grid[1], args.keep_rate, args.initialization_keep_rate,
                                                  args.expansion_multiple_stage)
        return (f"YOLOS on {args.backbone_name}: {args.det_token_num} detection tokens, {self.num_classes} classes "
                f"(on the {grid[0]}x{grid[1]} grid ToE keeps {kept} patch tokens); {len(self.train_set)} train / "
                f"{len(self.val_set)} val images; lr {args.lr:.2e} (--lr as given, as published)")

    def outputs_info(self) -> Dict[str, Any]:
        backbone = self.model.backbone
        return {"num_classes": self.num_classes, "embed_dim": backbone.embed_dim, "depth": len(backbone.blocks),
                "patch_size": self.patch_size}

    def evaluate_only(self, model: torch.nn.Module) -> None:
        args = self.args
        with autocast(self.device, self.amp_dtype if args.eval_amp else None):
            stats, results, summary = evaluate(model, self.eval_criterion, self.val_loader, self.val_set.coco,
                                               self.device, show_progress=self.env.is_main)
        if self.env.is_main:
            path = args.results_json or (os.path.join(args.output_dir, "detections_val2017.json")
                                         if args.output_dir else "")
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                write_results(results, path)
            if args.sparse_eval and self.toe.sparse_inference:
                print(f"sparse evaluation: ToE stage {self.toe.current_stage}")
            print(summary)
            print(f"AP {stats['AP']:.4f}, AP50 {stats['AP50']:.4f}, AP75 {stats['AP75']:.4f} on {stats['images']} "
                  f"val images; loss {stats['loss']:.4f}" + (f"; detections in {path}" if path else ""))
