"""The YOLOS detection run: set-up from the parsed flags, then the epoch loop.

Its own: the detector, COCO data, the matcher and set criterion, YOLOS's parameter groups and
epoch schedule, COCOeval. Shared with the other trainers (ToE/common): flags, the ToE operator
(``token_select.attach``), checkpoints and resume checks, RNG hand-over, logs and the run-folder
guard, errors, distributed set-up.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional

import torch
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, DistributedSampler, Subset

import token_select
from ToE.common.args import build_token_select
from ToE.common.checkpoint import rng_state, seed_everything, set_rng_state
from ToE.common.distributed import cleanup, init_distributed
from ToE.common.errors import TrainingInterrupted, UserError
from ToE.common.log import RunLog, check_no_other_run, check_output_dir
from ToE.common.run import (auto_resume_path, check_resume_epochs, interrupted_message, open_resume, rng_to_restore,
                            save_run_checkpoint, start_outputs)
from ToE.yolos.data import CocoDetection, collate, eval_transform, train_transform
from ToE.yolos.engine import train_one_epoch
from ToE.yolos.evaluation import evaluate, write_results
from ToE.yolos.loss import HungarianMatcher, SetCriterion
from ToE.yolos.model import YOLOS, create_backbone, load_init_checkpoint, sincos_position_table

# Flags that define what a run trains: a resume with other values would mix two runs.
RESUME_MUST_MATCH = (
    "backbone_name", "backbone_kwargs", "det_token_num", "init_pe_size", "mid_pe_size", "pe_resize_by_count",
    "init_checkpoint", "pos_init_sincos",
    "lr", "min_lr", "warmup_epochs", "warmup_lr", "weight_decay", "eos_coef", "bbox_loss_coef", "giou_loss_coef",
    "expansion_step", "keep_rate", "initialization_keep_rate", "expansion_multiple_stage", "distance",
    "initialization",
)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "det_token")


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


def schedule_epoch(epoch: int) -> int:
    """The scheduler position of ``epoch``: published YOLOS steps the cosine with ``step(e)`` AFTER
    epoch e, so epochs 0 and 1 both train at the base lr and epoch e >= 1 at cosine(e - 1)."""
    return max(epoch - 1, 0)


class DetectionTrainer:
    """Everything one detection run needs, built from ``args``; ``fit()`` trains and checkpoints."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.toe = build_token_select(args)  # flag mistakes first, before data, model or outputs
        self._check_flags()
        if args.auto_resume and not args.eval:
            args.resume = auto_resume_path(args)
        self.finished = False  # --auto-resume met a run that has trained all its epochs
        self.writes = bool(args.output_dir) and not args.eval
        if args.output_dir:
            check_output_dir(args.output_dir)
        if self.writes:
            check_no_other_run(args.output_dir, args.resume, args.overwrite)
        self.env = init_distributed("cpu" if args.check_only else args.device)
        self.device = self.env.device
        seed_everything(args.seed + self.env.rank)

        backbone = create_backbone(args.backbone_name, args.backbone_kwargs)
        if args.init_checkpoint:
            load_init_checkpoint(backbone, args.init_checkpoint)
        if args.pos_init_sincos:  # after the init checkpoint: its patch rows are replaced
            sincos_position_table(backbone, args.pos_init_sincos)
        patch = backbone.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self._build_data()
        model = YOLOS(backbone, self.num_classes, args.det_token_num, args.init_pe_size, args.mid_pe_size,
                      args.pe_resize_by_count)
        model.attach_toe(self.toe)
        model.to(self.device)
        self.model_without_ddp = model
        self.model = model
        if self.env.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr,
                                           weight_decay=args.weight_decay)
        # a pure function of the epoch and the flags: a resume rebuilds it instead of loading it
        self.lr_scheduler = CosineLRScheduler(self.optimizer, t_initial=args.epochs, lr_min=args.min_lr,
                                              warmup_t=args.warmup_epochs, warmup_lr_init=args.warmup_lr)
        matcher = HungarianMatcher(args.set_cost_class, args.set_cost_bbox, args.set_cost_giou)
        weights = {"loss_ce": 1.0, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
        self.criterion = SetCriterion(self.num_classes, matcher, args.eos_coef, weights,
                                      distributed=self.env.distributed).to(self.device)
        # validation loss per process, without the box-count all-reduce: shards may differ by a batch
        self.eval_criterion = SetCriterion(self.num_classes, matcher, args.eos_coef, weights).to(self.device)
        self.start_epoch = args.start_epoch
        self.best_ap = 0.0
        self.rng_to_restore: Optional[Dict[str, Any]] = None
        self.last_checkpoint: Optional[str] = None
        if args.resume:
            self._resume(args.resume)
        self.log = RunLog("", enabled=False)

    # -- set-up ------------------------------------------------------------------------------
    def _check_flags(self) -> None:
        args = self.args
        if args.eval and not args.resume:
            raise UserError("--eval needs the weights to evaluate: pass --resume CHECKPOINT")
        if not args.eval and args.start_epoch >= args.epochs:
            raise UserError(f"--start_epoch {args.start_epoch} is not below --epochs {args.epochs}: nothing to train")
        if args.crop_size[0] > args.crop_size[1]:
            raise UserError(f"--crop-size {args.crop_size[0]} {args.crop_size[1]} must be MIN MAX with MIN <= MAX")
        if args.warmup_epochs >= args.epochs and not args.eval:
            raise UserError(f"--warmup-epochs {args.warmup_epochs} is as long as the run (--epochs {args.epochs}). "
                            "Lower --warmup-epochs")

    def _build_data(self) -> None:
        args, env = self.args, self.env
        patch = self.patch_size
        eval_max = args.eval_max_size or args.eval_size * 1333 // 800
        train_tf = train_transform(args.scales, args.max_size, args.select_scales, args.crop_size, patch, args.hflip)
        self.train_set = CocoDetection(args.data_path, "train", train_tf, args.num_classes)
        self.num_classes = args.num_classes or self.train_set.num_classes
        self.val_set = CocoDetection(args.data_path, "val", eval_transform(args.eval_size, eval_max, patch),
                                     self.num_classes)
        if len(self.train_set) // env.world_size < args.batch_size and not args.eval:
            raise UserError(f"the training split has {len(self.train_set)} images, fewer than one batch of "
                            f"{args.batch_size} per process ({env.world_size} processes). Lower --batch_size")
        self.train_sampler = DistributedSampler(self.train_set, num_replicas=env.world_size, rank=env.rank,
                                                shuffle=True, seed=args.seed, drop_last=True)
        kwargs = dict(num_workers=args.num_workers, collate_fn=collate, pin_memory=self.device.type == "cuda")
        self.train_loader = DataLoader(self.train_set, batch_size=args.batch_size, sampler=self.train_sampler,
                                       drop_last=True, **kwargs)
        # each process takes every world_size-th image, so every image is scored exactly once
        shard = list(range(env.rank, len(self.val_set), env.world_size))
        self.val_loader = DataLoader(Subset(self.val_set, shard), batch_size=args.eval_batch_size or args.batch_size,
                                     shuffle=False, **kwargs)

    def _resume(self, path: str) -> None:
        args, env = self.args, self.env
        checkpoint, stored, epoch = open_resume(
            path, args, self.model_without_ddp, self.num_classes, RESUME_MUST_MATCH,
            ("backbone_name", "backbone_kwargs", "det_token_num", "mid_pe_size"),
            ("this detector", "Pass the --backbone_name/--backbone-kwargs/--det_token_num/--mid_pe_size it was "
                              "trained with"), classes_fix=" (or --num-classes)")
        if args.eval:
            self.toe.update_current_stage(epoch)  # --sparse-eval reduces as the checkpoint's last epoch did
            return
        self.start_epoch = epoch + 1
        if check_resume_epochs(path, args, stored, self.start_epoch, may_extend=False):
            self.finished = True  # re-submitting a finished job is not an error
            return
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.best_ap = float(checkpoint.get("best_ap", 0.0))
        self.last_checkpoint = path
        self.rng_to_restore = rng_to_restore(checkpoint, env, args.seed, self.start_epoch, path)

    # -- the run ------------------------------------------------------------------------------
    def checkpoint_state(self, epoch: int) -> Dict[str, Any]:
        return {"model": self.model_without_ddp.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": epoch, "best_ap": self.best_ap, "num_classes": self.num_classes,
                "world_size": self.env.world_size, "rng": {str(self.env.rank): rng_state(self.device)},
                "args": vars(self.args)}

    def fit(self) -> None:
        args, env = self.args, self.env
        try:
            if args.check_only:
                if env.is_main:
                    print(f"check passed: flags, data in {args.data_path}, output folder {args.output_dir or '(none)'}"
                          + (f", resume file {args.resume}" if args.resume else ""))
                return
            if args.eval:
                self._evaluate_only()
                return
            if self.finished:
                if env.is_main:
                    print(f"{args.resume} has trained all {args.epochs} epochs: nothing to do")
                return
            dims = {"num_classes": self.num_classes, "embed_dim": self.model_without_ddp.backbone.embed_dim,
                    "depth": len(self.model_without_ddp.backbone.blocks), "patch_size": self.patch_size}
            self.log = start_outputs(args, env, self.start_epoch, dims)
            if env.is_main:
                grid = self.model_without_ddp.init_grid
                kept = token_select.kept_tokens_per_stage(grid[0] * grid[1], args.keep_rate,
                                                          args.initialization_keep_rate, args.expansion_multiple_stage)
                print(f"YOLOS on {args.backbone_name}: {args.det_token_num} detection tokens, {self.num_classes} "
                      f"classes; ToE stages start at epochs {args.expansion_step} (on the {grid[0]}x{grid[1]} grid "
                      f"they keep {kept} patch tokens); {len(self.train_set)} train / {len(self.val_set)} val "
                      f"images; {env.world_size} process(es) on {self.device.type}", flush=True)
            if self.rng_to_restore is not None:
                set_rng_state(self.rng_to_restore, self.device)
            last_epoch = args.epochs
            if args.stop_after_epochs is not None:
                last_epoch = min(args.epochs, self.start_epoch + args.stop_after_epochs)
            for epoch in range(self.start_epoch, last_epoch):
                self.train_epoch(epoch)
        except KeyboardInterrupt:
            raise TrainingInterrupted(interrupted_message(args.output_dir, self.last_checkpoint)) from None
        finally:
            self.log.close()
            cleanup()

    def _evaluate_only(self) -> None:
        args = self.args
        stats, results, summary = evaluate(self.model_without_ddp, self.eval_criterion, self.val_loader,
                                           self.val_set.coco, self.device, show_progress=self.env.is_main)
        if self.env.is_main:
            path = args.results_json or (os.path.join(args.output_dir, "detections_val2017.json")
                                         if args.output_dir else "")
            if path:
                write_results(results, path)
            if args.sparse_eval and self.toe.sparse_inference:
                print(f"sparse evaluation: ToE stage {self.toe.current_stage}")
            print(summary)
            print(f"AP {stats['AP']:.4f}, AP50 {stats['AP50']:.4f}, AP75 {stats['AP75']:.4f} on {stats['images']} "
                  f"val images; loss {stats['loss']:.4f}" + (f"; detections in {path}" if path else ""))

    def train_epoch(self, epoch: int) -> None:
        args, env = self.args, self.env
        stage = self.toe.update_current_stage(epoch)
        self.train_sampler.set_epoch(epoch)
        self.lr_scheduler.step(schedule_epoch(epoch))
        train_stats = train_one_epoch(self.model, self.criterion, self.train_loader, self.optimizer, self.device,
                                      epoch, args.clip_max_norm, toe=self.toe, patch_size=self.patch_size,
                                      show_progress=env.is_main, log_interval=args.log_interval,
                                      distributed=env.distributed)
        stats, _, _ = evaluate(self.model_without_ddp, self.eval_criterion, self.val_loader, self.val_set.coco,
                               self.device)
        is_best = stats["AP"] > self.best_ap
        self.best_ap = max(self.best_ap, stats["AP"])
        record = {"epoch": epoch, "stage": stage, **train_stats, "test_loss": stats["loss"],
                  **{f"test_{k}": v for k, v in stats.items() if k.startswith(("AP", "AR"))},
                  "test_images": stats["images"],
                  "best_AP": self.best_ap}
        if env.is_main:
            print(f"epoch {epoch}: stage {stage}, {train_stats['kept_tokens']:.1f} of "
                  f"{train_stats['patch_tokens']:.1f} patch tokens, loss {train_stats['train_loss']:.4f}, "
                  f"{train_stats['epoch_seconds']:.1f} s, AP {stats['AP']:.4f}, AP50 {stats['AP50']:.4f}", flush=True)
        self.log.write(record, step=epoch)
        if args.output_dir:
            self.last_checkpoint = save_run_checkpoint(self.checkpoint_state(epoch), args.output_dir, env, is_best)
