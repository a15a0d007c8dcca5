"""The DeiT training run: set-up from the parsed flags, then the epoch loop with checkpoints."""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional

import timm
import torch
from timm.data import Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler, Subset

import token_select
from ToE.common.args import build_token_select
from ToE.common.checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from ToE.common.data import image_folder
from ToE.common.distributed import barrier, cleanup, init_distributed
from ToE.common.errors import UserError
from ToE.common.log import RunLog, check_output_dir, save_args
from ToE.deit.engine import evaluate, train_one_epoch
from ToE.deit.losses import DistillationLoss

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


class Trainer:
    """Everything one DeiT run needs, built from ``args``; ``fit()`` trains and checkpoints."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.toe = build_token_select(args)  # a bad schedule fails before any work
        if not timm.is_model(args.model):
            raise UserError(f"unknown model {args.model!r}. Pick a timm ViT name, e.g. deit_small_patch16_224 "
                            "(list them with: python -c \"import timm; print(timm.list_models('deit*'))\")")
        check_output_dir(args.output_dir)
        self.env = init_distributed(args.device)
        self.device = self.env.device
        self.amp_dtype = AMP_DTYPES[args.amp_dtype] if self.device.type == "cuda" else None
        seed_everything(args.seed + self.env.rank)

        self._build_data()
        self._build_model()
        self._build_optimization()
        self.start_epoch = args.start_epoch
        self.best_acc1 = 0.0
        self.rng_to_restore: Optional[Dict[str, Any]] = None
        if args.resume:
            self._resume(args.resume)
        self.log = RunLog(args.output_dir, enabled=self.env.is_main)

    # -- set-up ------------------------------------------------------------------------------
    def _build_data(self) -> None:
        args, env = self.args, self.env
        train_transform = create_transform(
            args.input_size, is_training=True, color_jitter=args.color_jitter,
            auto_augment=None if args.aa in ("", "none") else args.aa, interpolation=args.train_interpolation,
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=tuple(args.scale),
            hflip=args.hflip)
        eval_kwargs = {} if args.crop_pct is None else {"crop_pct": args.crop_pct}
        eval_transform = create_transform(args.input_size, is_training=False, interpolation="bicubic", **eval_kwargs)
        self.train_set = image_folder(args.data_path, "train", train_transform)
        self.val_set = image_folder(args.data_path, "val", eval_transform)
        self.num_classes = len(self.train_set.classes)
        if args.repeated_aug:
            self.train_sampler = RepeatAugSampler(self.train_set, num_replicas=env.world_size, rank=env.rank,
                                                  shuffle=True)
        else:
            self.train_sampler = DistributedSampler(self.train_set, num_replicas=env.world_size, rank=env.rank,
                                                    shuffle=True, seed=args.seed, drop_last=True)
        # Evaluation: each process takes every world_size-th image, so each is counted once.
        val_indices = range(env.rank, len(self.val_set), env.world_size) if args.dist_eval else range(len(self.val_set))
        loader_kwargs = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and self.device.type == "cuda",
                             persistent_workers=False)
        per_process_batch = args.batch_size
        if len(self.train_set) // env.world_size < per_process_batch:
            raise UserError(f"the training split has {len(self.train_set)} images, fewer than one batch of "
                            f"{per_process_batch} per process. Lower --batch-size")
        self.train_loader = DataLoader(self.train_set, batch_size=per_process_batch, sampler=self.train_sampler,
                                       drop_last=True, **loader_kwargs)
        self.val_loader = DataLoader(Subset(self.val_set, list(val_indices)), batch_size=int(1.5 * per_process_batch),
                                     shuffle=False, **loader_kwargs)
        self.mixup_fn = None
        if args.mixup > 0 or args.cutmix > 0:
            if args.batch_size % 2:  # timm's Mixup pairs each image with its mirror in the batch
                raise UserError(f"mixup/cutmix need an even --batch-size, not {args.batch_size}. "
                                "Pass an even one, or --mixup 0 --cutmix 0")
            self.mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                                  switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                                  label_smoothing=args.smoothing, num_classes=self.num_classes)

    def _build_model(self) -> None:
        args = self.args
        kwargs = dict(args.model_kwargs)
        kwargs.setdefault("img_size", args.input_size)
        if args.patch_size is not None:
            kwargs.setdefault("patch_size", args.patch_size)
        try:
            model = timm.create_model(args.model, pretrained=False, num_classes=self.num_classes, drop_rate=args.drop,
                                      drop_path_rate=args.drop_path, **kwargs)
        except TypeError as error:
            raise UserError(f"model {args.model} does not take these arguments ({error}). "
                            "Pick a timm ViT (e.g. deit_small_patch16_224) and check --model-kwargs/--patch-size"
                            ) from None
        try:
            token_select.attach(model, self.toe)
        except ValueError as error:  # not a transformer with model.blocks (e.g. a CNN)
            raise UserError(f"model {args.model} cannot take Token Expansion ({error}). "
                            "Pick a timm ViT, e.g. deit_small_patch16_224") from None
        model.to(self.device)
        self.model_without_ddp = model
        self.model = model
        if self.env.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device=self.device) if args.model_ema else None
        self.num_patches = model.patch_embed.num_patches

    def _build_optimization(self) -> None:
        args, env = self.args, self.env
        lr = args.lr if args.unscale_lr else args.lr * args.batch_size * env.world_size / 512.0
        self.lr = lr
        self.optimizer = create_optimizer_v2(self.model_without_ddp, opt=args.opt, lr=lr,
                                             weight_decay=args.weight_decay, eps=args.opt_eps, momentum=args.momentum)
        self.lr_scheduler, _ = create_scheduler_v2(self.optimizer, sched=args.sched, num_epochs=args.epochs,
                                                   warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                                   min_lr=args.min_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        if self.mixup_fn is not None:
            base = SoftTargetCrossEntropy()  # mixup already smooths the targets
        elif args.smoothing > 0:
            base = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            base = torch.nn.CrossEntropyLoss()
        teacher = None
        if args.distillation_type != "none":
            teacher = self._load_teacher()
            # timm's distilled DeiT returns the (class, distillation) logit pair in training only when
            # asked; without this the loss gets averaged logits and the teacher is never consulted
            self.model_without_ddp.set_distilled_training(True)
        self.criterion = DistillationLoss(base, teacher, args.distillation_type, args.distillation_alpha,
                                          args.distillation_tau)

    def _load_teacher(self) -> torch.nn.Module:
        args = self.args
        if not hasattr(self.model_without_ddp, "head_dist"):
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

    def _resume(self, path: str) -> None:
        checkpoint = load_checkpoint(path)
        try:
            self.model_without_ddp.load_state_dict(checkpoint["model"])
        except (KeyError, RuntimeError) as error:
            raise UserError(f"resume file {path} does not fit model {self.args.model} ({error.__class__.__name__}). "
                            "Resume with the --model and --model-kwargs it was trained with") from None
        if self.args.eval:
            # --eval --sparse-eval reduces tokens as the checkpoint's last epoch did
            self.toe.update_current_stage(int(checkpoint.get("epoch", 0)))
            return
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        if self.model_ema is not None and checkpoint.get("model_ema") is not None:
            self.model_ema.module.load_state_dict(checkpoint["model_ema"])
        self.start_epoch = int(checkpoint["epoch"]) + 1
        self.best_acc1 = float(checkpoint.get("best_acc1", 0.0))
        rng = checkpoint.get("rng", {})
        self.rng_to_restore = rng.get(str(self.env.rank)) or rng.get("0")

    # -- the run ------------------------------------------------------------------------------
    def checkpoint_state(self, epoch: int) -> Dict[str, Any]:
        return {
            "model": self.model_without_ddp.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            # the EMA's plain weights (timm keys, no "module." prefix): they load into timm.create_model
            "model_ema": self.model_ema.module.state_dict() if self.model_ema is not None else None,
            "epoch": epoch,
            "best_acc1": self.best_acc1,
            "rng": {str(self.env.rank): rng_state()},
            "args": vars(self.args),
        }

    def fit(self) -> None:
        args, env = self.args, self.env
        try:
            if args.eval:
                stats = evaluate(self.model_without_ddp, self.val_loader, self.device, self.amp_dtype,
                                 args.dist_eval)
                if env.is_main:
                    if args.sparse_eval and self.toe.reducing:
                        print(f"sparse evaluation: {self.toe.kept_patch_tokens(self.num_patches)} of "
                              f"{self.num_patches} patch tokens (stage {self.toe.current_stage})")
                    print(f"Accuracy on {stats['images']} test images: top-1 {stats['acc1']:.2f} %, "
                          f"top-5 {stats['acc5']:.2f} %, loss {stats['loss']:.4f}")
                return
            if env.is_main and args.output_dir:
                save_args(vars(args), args.output_dir)
            if env.is_main:
                kept = token_select.kept_tokens_per_stage(self.num_patches, args.keep_rate,
                                                          args.initialization_keep_rate, args.expansion_multiple_stage)
                print(f"{args.model}: {self.num_patches} patch tokens; ToE stages start at epochs "
                      f"{args.expansion_step}, keeping {kept} patch tokens; {len(self.train_set)} train / "
                      f"{len(self.val_set)} val images; lr {self.lr:.2e}; {env.world_size} process(es) on "
                      f"{self.device.type}", flush=True)
            if self.rng_to_restore is not None:
                set_rng_state(self.rng_to_restore)
            last_epoch = args.epochs
            if args.stop_after_epochs is not None:
                last_epoch = min(args.epochs, self.start_epoch + args.stop_after_epochs)
            for epoch in range(self.start_epoch, last_epoch):
                self.train_epoch(epoch)
        finally:
            self.log.close()
            cleanup()

    def train_epoch(self, epoch: int) -> None:
        args, env = self.args, self.env
        stage = self.toe.update_current_stage(epoch)
        if self.model_ema is not None:
            # the EMA is a deep copy with its own operator: keep its stage in step for --sparse-eval
            self.model_ema.module.token_select.update_current_stage(epoch)
        self.train_sampler.set_epoch(epoch)
        self.lr_scheduler.step(epoch)
        train_stats = train_one_epoch(self.model, self.criterion, self.train_loader, self.optimizer, self.device,
                                      epoch, self.scaler, self.amp_dtype, args.clip_grad, self.mixup_fn,
                                      self.model_ema, show_progress=env.is_main)
        # the unwrapped model: shards may differ by a batch, and DDP's forward may sync the processes
        test_stats = evaluate(self.model_without_ddp, self.val_loader, self.device, self.amp_dtype, args.dist_eval)
        ema_stats = evaluate(self.model_ema.module, self.val_loader, self.device, self.amp_dtype, args.dist_eval) \
            if self.model_ema is not None else None
        is_best = test_stats["acc1"] > self.best_acc1
        self.best_acc1 = max(self.best_acc1, test_stats["acc1"])
        record = {"epoch": epoch, "stage": stage, "kept_tokens": self.toe.kept_patch_tokens(self.num_patches),
                  **train_stats, "test_loss": test_stats["loss"], "test_acc1": test_stats["acc1"],
                  "test_acc5": test_stats["acc5"], "test_images": test_stats["images"],
                  "best_acc1": self.best_acc1}
        if ema_stats is not None:
            record["ema_acc1"] = ema_stats["acc1"]
        if env.is_main:
            ema_text = f", EMA {ema_stats['acc1']:.2f} %" if ema_stats is not None else ""
            print(f"epoch {epoch}: stage {stage}, {record['kept_tokens']} patch tokens, loss "
                  f"{train_stats['train_loss']:.4f}, {train_stats['epoch_seconds']:.1f} s, top-1 "
                  f"{test_stats['acc1']:.2f} %{ema_text}", flush=True)
        self.log.write(record, step=epoch)
        self._save(epoch, is_best)

    def _save(self, epoch: int, is_best: bool) -> None:
        if not self.args.output_dir:
            return
        state = self.checkpoint_state(epoch)
        if self.env.distributed:
            # every process's RNG state goes into the one file, so each resumes its own stream
            gathered = [None] * self.env.world_size
            torch.distributed.all_gather_object(gathered, state["rng"][str(self.env.rank)])
            state["rng"] = {str(rank): rng for rank, rng in enumerate(gathered)}
        if self.env.is_main:
            save_checkpoint(state, os.path.join(self.args.output_dir, "checkpoint.pth"))
            if is_best:
                save_checkpoint(state, os.path.join(self.args.output_dir, "best_checkpoint.pth"))
        barrier()

