"""The classification training run shared by the trainers: set-up from the parsed flags, then the
epoch loop with checkpoints, resume, logs and evaluation.

``ClassificationTrainer`` is DeiT's recipe on timm (data folders, RandAugment/mixup, a timm ViT
with the ToE operator after block 0, AdamW and an epoch schedule, EMA). A trainer that needs more
subclasses it and overrides what is its own: ``build_criterion`` (DeiT: distillation), and
later the model, data and curriculum hooks.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, Optional

import timm
import torch
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler, Subset

import token_select
from ToE.common.args import build_token_select, check_training_flags
from ToE.common.checkpoint import RESUME_MUST_MATCH, rng_state, seed_everything, set_rng_state
from ToE.common.data import check_images, train_val_folders
from ToE.common.distributed import cleanup, init_distributed
from ToE.common.errors import Preempted, TrainingInterrupted, UserError
from ToE.common.log import RunLog, check_no_other_run, check_output_dir
from ToE.common.preemption import StopWatch
from ToE.common.run import (auto_resume_path, check_resume_epochs, interrupted_message, open_resume, rng_to_restore,
                            save_run_checkpoint, start_outputs)
from ToE.common.transforms import build_eval_transform, build_train_transform
from ToE.common.engine import evaluate, train_one_epoch

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}
# timm's VisionTransformer and its distilled subclass: blocks that see tokens only through
# attention over the sequence they are given. Relative-position and rotary models (Eva, BEiT,
# VisionTransformerRelPos) index their position tables by the full grid and cannot take a
# reduced sequence.
SUPPORTED_MODEL_CLASSES = ("VisionTransformer", "VisionTransformerDistilled")


def resolve_amp_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """``--amp-dtype`` on ``device``: auto is bf16 on GPUs and off on the CPU; fp16 needs a GPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "float16" and device.type != "cuda":
        raise UserError("--amp-dtype float16 needs a GPU (its loss scaling is CUDA's). Use bfloat16 on the CPU")
    return AMP_DTYPES[name]



class SkipFirst(torch.utils.data.Sampler):
    """``sampler``'s order for the current epoch without its first ``count`` indices (mid-epoch resume)."""

    def __init__(self, sampler, count: int) -> None:
        self.sampler, self.count = sampler, count

    def __iter__(self):
        return iter(list(self.sampler)[self.count:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.count)


class ClassificationLoss(torch.nn.Module):
    """``loss(images, outputs, targets)``: the signature of the loop, so a trainer's loss can also
    look at the images (DeiT's distillation asks a teacher). Here: the base loss of the logits."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, images: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.base(outputs, targets)


class ClassificationTrainer:
    """Everything one classification run needs, built from ``args``; ``fit()`` trains and checkpoints."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # Flag mistakes fail here, before any data, model or output is touched.
        self.toe = build_token_select(args)
        if not timm.is_model(args.model):
            raise UserError(f"unknown model {args.model!r}. Pick a timm ViT name, e.g. deit_small_patch16_224 "
                            "(list them with: python -c \"import timm; print(timm.list_models('deit*'))\")")
        warnings = check_training_flags(args)
        if args.auto_resume:
            args.resume = auto_resume_path(args)
        self.writes = bool(args.output_dir) and not args.eval
        if self.writes:
            check_output_dir(args.output_dir)
            check_no_other_run(args.output_dir, args.resume, args.overwrite)
        self.env = init_distributed("cpu" if args.check_only else args.device)
        self.device = self.env.device
        self.amp_dtype = resolve_amp_dtype(args.amp_dtype, self.device)
        if self.env.is_main:
            for warning in warnings:
                print(f"warning: {warning}", flush=True)
        seed_everything(args.seed + self.env.rank)

        self._build_data()
        self._build_model()
        self._build_optimization()
        self.start_epoch = args.start_epoch
        self.best_acc1 = 0.0
        self.rng_to_restore: Optional[Dict[str, Any]] = None
        self.last_checkpoint: Optional[str] = None  # what an interruption leaves to resume from
        self.resume_position: Optional[Dict[str, Any]] = None  # where inside an epoch a preempted run stopped
        self.finished = False  # --auto-resume found a run that has trained all its epochs
        self.watch = StopWatch(args.time_limit)
        if args.resume:
            self._resume(args.resume)
        self.log = RunLog("", enabled=False)  # the run's log opens in fit(), once the outputs are set up

    # -- set-up ------------------------------------------------------------------------------
    # -- hooks a trainer may override (the defaults are the plain DeiT loop) ----------------------
    accum_steps = 1  # micro-batches per optimizer update
    supported_model_classes = SUPPORTED_MODEL_CLASSES  # model classes whose blocks take a reduced sequence
    input_transform = None  # device-side image map (N, C, H, W) -> (N, C, H', W'), before mixup and at evaluation

    def prepare_epoch(self, epoch: int) -> None:
        """Called before each training epoch: a curriculum may change data, transforms or resolution."""

    def counts_for_best(self, epoch: int) -> bool:
        """Whether ``epoch``'s accuracy may make ``best_checkpoint.pth`` (e.g. full-resolution epochs only)."""
        return True

    def epoch_log_fields(self, epoch: int) -> Dict[str, Any]:
        """Extra fields of the epoch's log record."""
        return {}

    def total_batch(self) -> int:
        """Images per optimizer update over all processes (the lr scales with it)."""
        return self.args.batch_size * self.env.world_size

    def updates_per_epoch(self) -> Optional[int]:
        """None: the lr schedule steps per epoch; an int: it steps per update (timm's ``step_update``)."""
        return None

    def train_transform(self, input_size: int, auto_augment: str):
        """The training transform at ``input_size`` with the ``--aa`` policy ``auto_augment``."""
        args = self.args
        return build_train_transform(
            input_size, auto_augment=auto_augment, color_jitter=args.color_jitter,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
            scale=tuple(args.scale), hflip=args.hflip)

    def eval_transform(self, input_size: int):
        eval_kwargs = {} if self.args.crop_pct is None else {"crop_pct": self.args.crop_pct}
        return build_eval_transform(input_size, interpolation="bicubic", **eval_kwargs)

    def build_train_loader(self, batch_size: int) -> DataLoader:
        return DataLoader(self.train_set, batch_size=batch_size, sampler=self.train_sampler, drop_last=True,
                          num_workers=self.args.num_workers,
                          pin_memory=self.args.pin_mem and self.device.type == "cuda", persistent_workers=False)

    # -- set-up ------------------------------------------------------------------------------
    def _build_data(self) -> None:
        args, env = self.args, self.env
        train_transform = self.train_transform(args.input_size, args.aa)
        eval_transform = self.eval_transform(args.input_size)
        # One class list (train's) labels both splits; differing class folders are refused.
        self.train_set, self.val_set = train_val_folders(args.data_path, train_transform, eval_transform)
        self.num_classes = len(self.train_set.classes)
        if not args.eval and not args.check_only:  # --check-only: the launched processes check it
            # A corrupt val image would otherwise surface only after the first training epoch. Each
            # process decodes its share; the train split (1.28 M images on ImageNet) is not checked
            # up front: its loader names a bad image when it meets it.
            check_images(self.val_set, "val", range(env.rank, len(self.val_set), env.world_size),
                         num_workers=args.num_workers)
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
        self.train_loader = self.build_train_loader(per_process_batch)
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
        self._check_model(model)
        token_select.attach(model, self.toe)
        model.to(self.device)
        self.model_without_ddp = model
        self.model = model
        if self.env.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.model_ema = self._new_ema() if args.model_ema else None
        self.num_patches = model.patch_embed.num_patches

    def _new_ema(self) -> ModelEmaV3:
        """An EMA copy of the current weights (operator included, so --sparse-eval follows it)."""
        return ModelEmaV3(self.model_without_ddp, decay=self.args.model_ema_decay, device=self.device)

    def _check_model(self, model: torch.nn.Module) -> None:
        """Refuse, in one line, a model ToE cannot reduce or an input its patches do not tile."""
        args = self.args
        name = type(model).__name__
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None or not hasattr(patch_embed, "num_patches") or not hasattr(model, "blocks"):
            raise UserError(f"model {args.model} ({name}) has no patch embedding and transformer blocks for Token "
                            "Expansion to reduce. Pick a timm ViT, e.g. deit_small_patch16_224")
        if name not in self.supported_model_classes:
            raise UserError(f"model {args.model} ({name}) uses relative or rotary position tables over the full "
                            "token grid in every block, so it cannot run on the reduced sequence. Pick a model of "
                            "timm's VisionTransformer family: deit_*, deit3_*, vit_* (not vit_relpos_*)")
        patch = getattr(patch_embed, "patch_size", None)
        patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch or 1)
        if args.input_size % patch:
            raise UserError(f"--input-size {args.input_size} is not a multiple of the patch size {patch}: the "
                            f"last {args.input_size % patch} pixels would be cut off. Use e.g. --input-size "
                            f"{args.input_size - args.input_size % patch} or another --patch-size")

    def _build_optimization(self) -> None:
        args = self.args
        lr = args.lr if args.unscale_lr else args.lr * self.total_batch() / 512.0
        self.lr = lr
        self.optimizer = create_optimizer_v2(self.model_without_ddp, opt=args.opt, lr=lr,
                                             weight_decay=args.weight_decay, eps=args.opt_eps, momentum=args.momentum)
        # The schedule is a pure function of the epoch and these flags (timm's epoch schedulers keep
        # no other state), so a resume rebuilds it rather than loading it: a resume with a larger
        # --epochs then follows the schedule over the new length from the checkpoint's epoch.
        per_update = self.updates_per_epoch()
        self.lr_scheduler, _ = create_scheduler_v2(self.optimizer, sched=args.sched, num_epochs=args.epochs,
                                                   warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                                   min_lr=args.min_lr, step_on_epochs=per_update is None,
                                                   updates_per_epoch=per_update or 0)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        if self.mixup_fn is not None:
            base = SoftTargetCrossEntropy()  # mixup already smooths the targets
        elif args.smoothing > 0:
            base = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            base = torch.nn.CrossEntropyLoss()
        self.criterion = self.build_criterion(base)

    def build_criterion(self, base: torch.nn.Module) -> torch.nn.Module:
        """The loss ``(images, outputs, targets) -> loss`` around ``base`` (a trainer may wrap it)."""
        return ClassificationLoss(base)

    def _resume(self, path: str) -> None:
        """Load ``path``; a checkpoint of another model, schedule or class count is refused by name."""
        args, env = self.args, self.env
        checkpoint, stored, epoch = open_resume(
            path, args, self.model_without_ddp, self.num_classes, RESUME_MUST_MATCH,
            ("model", "model_kwargs", "patch_size"),
            (f"model {args.model}", "Resume with the --model and --model-kwargs it was trained with"))
        if args.eval:
            self._follow_checkpoint_schedule(stored, epoch)
            return
        self.start_epoch = epoch + 1
        position = checkpoint.get("position")
        if position is not None:  # written mid-epoch by a preempted run: continue inside that epoch
            self.resume_position = dict(position)
            self.start_epoch = int(position["epoch"])
        planned = int(stored.get("epochs", args.epochs))  # for the extension note below
        if check_resume_epochs(path, args, stored, self.start_epoch, may_extend=True):
            self.finished = True  # re-submitting a finished job is not an error
            return
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        if args.epochs > planned and env.is_main:
            lr_then = self.lr_scheduler._get_lr(self.start_epoch * (self.updates_per_epoch() or 1))[0] \
                if hasattr(self.lr_scheduler, "_get_lr") else None
            then = f" (lr {lr_then:.2e} at epoch {self.start_epoch})" if lr_then is not None else ""
            print(f"extending the run from {planned} to {args.epochs} epochs: the {args.sched} schedule now spans "
                  f"{args.epochs} epochs and continues from epoch {self.start_epoch}{then}", flush=True)
        if self.model_ema is not None:
            if checkpoint.get("model_ema") is not None:
                self.model_ema.module.load_state_dict(checkpoint["model_ema"])
            else:  # the checkpoint has none: start the average from the loaded weights, not the random init
                self.model_ema = self._new_ema()
                if env.is_main:
                    print(f"note: {path} holds no EMA weights; the EMA starts from its model weights", flush=True)
        self.best_acc1 = float(checkpoint.get("best_acc1", 0.0))
        self.last_checkpoint = path
        lr_note = f", and with the total batch the learning rate becomes {self.lr:.2e}"
        self.rng_to_restore = rng_to_restore(checkpoint, env, args.seed, self.start_epoch, path, lr_note)

    def _follow_checkpoint_schedule(self, stored: Dict[str, Any], epoch: int) -> None:
        """--eval --sparse-eval: reduce tokens as the checkpoint's last epoch did, by its own ToE flags."""
        toe_keys = ("expansion_step", "keep_rate", "initialization_keep_rate", "expansion_multiple_stage",
                    "distance", "initialization")
        if all(key in stored for key in toe_keys):
            merged = argparse.Namespace(**{**vars(self.args), **{key: stored[key] for key in toe_keys}})
            self.toe = build_token_select(merged)
            token_select.attach(self.model_without_ddp, self.toe)
        self.toe.update_current_stage(epoch)

    # -- the run ------------------------------------------------------------------------------
    def checkpoint_state(self, epoch: int) -> Dict[str, Any]:
        return {
            "model": self.model_without_ddp.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # for reference only: resume rebuilds the schedule from the flags (see _build_optimization)
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            # the EMA's plain weights (timm keys, no "module." prefix): they load into timm.create_model
            "model_ema": self.model_ema.module.state_dict() if self.model_ema is not None else None,
            "epoch": epoch,
            "best_acc1": self.best_acc1,
            "num_classes": self.num_classes,
            "world_size": self.env.world_size,
            "rng": {str(self.env.rank): rng_state(self.device)},
            "args": vars(self.args),
        }

    def fit(self) -> None:
        args, env = self.args, self.env
        try:
            if args.check_only:
                if env.is_main:
                    print(f"check passed: flags, data in {args.data_path}, output folder "
                          f"{args.output_dir or '(none)'}" + (f", resume file {args.resume}" if args.resume else ""))
                return
            if args.eval:
                self._evaluate_only()
                return
            if self.finished:
                if env.is_main:
                    print(f"the run in {args.output_dir} has trained all {args.epochs} epochs: nothing to do "
                          "(raise --epochs to train longer)")
                return
            self._start_outputs()
            if env.is_main:
                kept = token_select.kept_tokens_per_stage(self.num_patches, args.keep_rate,
                                                          args.initialization_keep_rate, args.expansion_multiple_stage)
                print(f"{args.model}: {self.num_patches} patch tokens; ToE stages start at epochs "
                      f"{args.expansion_step}, keeping {kept} patch tokens; {len(self.train_set)} train / "
                      f"{len(self.val_set)} val images; lr {self.lr:.2e}; {env.world_size} process(es) on "
                      f"{self.device.type}", flush=True)
            if self.rng_to_restore is not None and self.resume_position is None:
                set_rng_state(self.rng_to_restore, self.device)  # mid-epoch: restored by train_epoch instead
            last_epoch = args.epochs
            if args.stop_after_epochs is not None:
                last_epoch = min(args.epochs, self.start_epoch + args.stop_after_epochs)
            self.watch.install()
            for epoch in range(self.start_epoch, last_epoch):
                self.train_epoch(epoch)
                if epoch + 1 < last_epoch and self.watch.should_stop():
                    raise Preempted(f"{self.watch.reason()} after epoch {epoch}; "
                                    + self._continue_message(self.last_checkpoint))
        except KeyboardInterrupt:
            raise TrainingInterrupted(self._interrupted_message()) from None
        finally:
            self.watch.uninstall()
            self.log.close()
            cleanup()

    def _continue_message(self, path: Optional[str]) -> str:
        if path is None:
            return "nothing was saved (no --output_dir)"
        return f"{path} holds the run; continue with the same command and --auto-resume (or --resume {path})"

    def _evaluate_only(self) -> None:
        args = self.args
        stats = evaluate(self.model_without_ddp, self.val_loader, self.device, self.amp_dtype, args.dist_eval,
                         input_transform=self.input_transform)
        if self.env.is_main:
            if args.sparse_eval and self.toe.reducing:
                print(f"sparse evaluation: {self.toe.kept_patch_tokens(self.num_patches)} of "
                      f"{self.num_patches} patch tokens (stage {self.toe.current_stage})")
            print(f"Accuracy on {stats['images']} test images: top-1 {stats['acc1']:.2f} %, "
                  f"top-5 {stats['acc5']:.2f} %, loss {stats['loss']:.4f}")

    def _start_outputs(self) -> None:
        """Say where the run writes (or that it writes nothing); open the log at the first epoch."""
        # num_classes too (it comes from the data): the summary's FLOP count needs the head
        # and the module that defines the model: importing it registers a trainer's own models (LV-ViT)
        # in timm, so shared tools (the summary) can build them without knowing the trainer
        extra = {"num_classes": self.num_classes, "model_module": type(self.model_without_ddp).__module__}
        self.log = start_outputs(self.args, self.env, self.start_epoch, extra)

    def _interrupted_message(self) -> str:
        return interrupted_message(self.args.output_dir, self.last_checkpoint)

    def train_epoch(self, epoch: int) -> None:
        args, env = self.args, self.env
        self.prepare_epoch(epoch)
        stage = self.toe.update_current_stage(epoch)
        if self.model_ema is not None:
            # the EMA is a deep copy with its own operator: keep its stage in step for --sparse-eval
            self.model_ema.module.token_select.update_current_stage(epoch)
        self.train_sampler.set_epoch(epoch)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step(epoch)
        loader, resumed = self.train_loader, {}
        position = self.resume_position if self.resume_position and self.resume_position["epoch"] == epoch else None
        if position is not None:
            # the same batches as the interrupted epoch, from the one after the stop, and the random
            # state of the moment of the stop (restored once the loader's iterator exists)
            self.resume_position = None
            loader = self._loader_from_step(int(position["step"]))
            rng = self.rng_to_restore
            resumed = dict(start_step=int(position["step"]), carry=position,
                           after_iter=(lambda: set_rng_state(rng, self.device)) if rng is not None else None)
        train_stats = train_one_epoch(self.model, self.criterion, loader, self.optimizer, self.device,
                                      epoch, self.scaler, self.amp_dtype, args.clip_grad, self.mixup_fn,
                                      self.model_ema, show_progress=env.is_main, log_interval=args.log_interval,
                                      toe=self.toe, distributed=env.distributed, input_transform=self.input_transform,
                                      accum_steps=self.accum_steps, stop_check=self.watch.should_stop,
                                      **resumed, **self._update_schedule(epoch))
        if train_stats.get("stopped_at_step") is not None:
            self._save_position(epoch, train_stats)
            raise Preempted(f"{self.watch.reason()} in epoch {epoch} after step {train_stats['stopped_at_step']}; "
                            + self._continue_message(self.last_checkpoint))
        # logged from what the forward passes really ran on (None: the operator passed all tokens)
        if train_stats["kept_tokens"] is None:
            train_stats["kept_tokens"] = self.num_patches
        # the unwrapped model: shards may differ by a batch, and DDP's forward may sync the processes
        test_stats = evaluate(self.model_without_ddp, self.val_loader, self.device, self.amp_dtype, args.dist_eval,
                              input_transform=self.input_transform)
        ema_stats = evaluate(self.model_ema.module, self.val_loader, self.device, self.amp_dtype, args.dist_eval,
                             input_transform=self.input_transform) if self.model_ema is not None else None
        is_best = self.counts_for_best(epoch) and test_stats["acc1"] > self.best_acc1
        if is_best:
            self.best_acc1 = test_stats["acc1"]
        record = {"epoch": epoch, "stage": stage, **train_stats, "test_loss": test_stats["loss"],
                  "test_acc1": test_stats["acc1"], "test_acc5": test_stats["acc5"],
                  "test_images": test_stats["images"], "best_acc1": self.best_acc1, **self.epoch_log_fields(epoch)}
        if ema_stats is not None:
            record["ema_acc1"] = ema_stats["acc1"]
        if env.is_main:
            ema_text = f", EMA {ema_stats['acc1']:.2f} %" if ema_stats is not None else ""
            print(f"epoch {epoch}: stage {stage}, {record['kept_tokens']} patch tokens, loss "
                  f"{train_stats['train_loss']:.4f}, {train_stats['epoch_seconds']:.1f} s, top-1 "
                  f"{test_stats['acc1']:.2f} %{ema_text}", flush=True)
        self.log.write(record, step=epoch)
        self._save(epoch, is_best)

    def _update_schedule(self, epoch: int) -> Dict[str, Any]:
        """The engine's per-update lr arguments (none for a per-epoch schedule)."""
        per_update = self.updates_per_epoch()
        if per_update is None or self.lr_scheduler is None:
            return {}
        return {"lr_scheduler": self.lr_scheduler, "first_update": epoch * per_update, "max_updates": per_update}

    def _loader_from_step(self, step: int) -> DataLoader:
        """The training loader of this epoch without its first ``step`` batches (they are not read)."""
        batch_size = self.train_loader.batch_size
        pin_memory = self.args.pin_mem and self.device.type == "cuda"
        return DataLoader(self.train_set, batch_size=batch_size,
                          sampler=SkipFirst(self.train_sampler, step * batch_size), drop_last=True,
                          num_workers=self.args.num_workers, pin_memory=pin_memory)

    def _save_position(self, epoch: int, stats: Dict[str, Any]) -> None:
        """A checkpoint inside ``epoch``: the state after its step ``stats['stopped_at_step']``."""
        position = {"epoch": epoch, "step": int(stats["stopped_at_step"]), "loss_sum": float(stats["loss_sum"]),
                    "samples": float(stats["samples"]), "seconds": float(stats["epoch_seconds"])}
        self._save(epoch - 1, is_best=False, position=position)

    def _save(self, epoch: int, is_best: bool, position: Optional[Dict[str, Any]] = None) -> None:
        if not self.args.output_dir:
            return
        started = time.monotonic()
        state = self.checkpoint_state(epoch)
        if position is not None:
            state["position"] = position
        # every process's RNG state goes into the one file, so each resumes its own stream
        self.last_checkpoint = save_run_checkpoint(state, self.args.output_dir, self.env, is_best)
        self.watch.saved(time.monotonic() - started)
