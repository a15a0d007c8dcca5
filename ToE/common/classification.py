"""Classification as a task of the run lifecycle (``ToE.common.lifecycle.Run``).

``ClassificationTask`` is DeiT's recipe on timm: data folders, RandAugment/mixup, a timm ViT with
the ToE operator after block 0, AdamW and an epoch schedule, EMA. The trainers differ in a few
public build steps, each called once from ``__init__`` in this order:

    build_plan()          the epochs and what each trains with (EfficientTrain: its curriculum)
    build_datasets()      train and val sets (LV-ViT: the token-label data)
    build_model(**extra)  the timm model, operator attached (LV-ViT: MixToken)
    build_targets()       the per-batch target function: mixup/cutmix (LV-ViT: dense token labels)
    build_criterion(base) the loss (images, outputs, targets) (DeiT: distillation; LV-ViT: token labels)
    build_scheduler()     the lr schedule (EfficientTrain: the published per-update curve)
"""

from __future__ import annotations

import argparse
import functools
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.layers import PatchDropout
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, DistributedSampler, Subset

import token_select
from ToE.common.args import toe_switches
from ToE.common.data import (SkipFirst, build_eval_transform, build_train_transform, check_images, epoch_loader,
                              train_val_folders)
from ToE.common.distributed import all_reduce_sum, autocast
from ToE.common.errors import UserError
from ToE.common.pretrained import finetune
from ToE.common.lifecycle import RunContext, Task
from ToE.common.schedule import constant_plan, EpochPlan, split_global_batch
from ToE.common.vpt import add_prompts, freeze_backbone, prompt_tokens

# The model classes the classification trainers build and are tested with: timm's VisionTransformer and
# its distilled subclass, and LV-ViT. Why another model cannot take a reduced sequence at all (relative or
# rotary positions, class attention, ...) is token_select.reduction_problem's to say, from the model itself.
SUPPORTED_MODEL_CLASSES = ("VisionTransformer", "VisionTransformerDistilled", "LVViT")


# LR schedules that step once per epoch without a metric; 'plateau' needs an evaluation metric
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant", "none")


# What the classification task reads for a flag group a trainer does not take (ToE.common.args:
# add_augment_args, add_mixup_args): that group off. args.yaml keeps only the trainer's own flags.
GROUP_DEFAULTS = {
    "aa": "none", "color_jitter": 0.0, "smoothing": 0.0, "train_interpolation": "bicubic", "scale": [0.08, 1.0],
    "hflip": 0.5, "crop_pct": None, "repeated_aug": False, "reprob": 0.0, "remode": "pixel", "recount": 1,
    "mixup": 0.0, "cutmix": 0.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "mixup_mode": "batch",
}


def with_group_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the flags of the groups its trainer leaves out, set to off."""
    missing = {key: value for key, value in GROUP_DEFAULTS.items() if not hasattr(args, key)}
    return argparse.Namespace(**vars(args), **missing) if missing else args


def check_training_flags(args: argparse.Namespace) -> List[str]:
    """Cross-flag checks of a classification run (DeiT, and the trainers built on its loop).

    Raises ``UserError`` for a value that cannot work, before any data or model is touched;
    returns warnings for values that work but are probably not what was meant.
    """
    import timm.optim
    from timm.data import create_transform

    warnings: List[str] = []
    if args.eval:
        if not args.resume:
            raise UserError("--eval needs the weights to evaluate: pass --resume CHECKPOINT "
                            "(evaluating a random initialisation says nothing)")
        return warnings
    if args.opt.lower() not in timm.optim.list_optimizers() and args.opt.lower().split("_")[-1] \
            not in timm.optim.list_optimizers():
        raise UserError(f"unknown optimizer --opt {args.opt}. Pick one of timm's, e.g. adamw, sgd, lamb "
                        "(all: python -c \"import timm.optim; print(timm.optim.list_optimizers())\")")
    if args.sched not in SCHEDULERS:
        raise UserError(f"unknown or unsupported scheduler --sched {args.sched}. Pick one of {', '.join(SCHEDULERS)}")
    if args.aa not in ("", "none"):
        # timm reads each part after the policy name as a key and a number and passes over a part
        # without a digit in silence ("rand-zz" trains RandAugment at its default magnitude 10)
        name, *parts = args.aa.split("-")
        skipped = [part for part in parts
                   if not re.search(r"\d", part) and not (name == "rand" and part.startswith("t"))]
        if skipped:
            raise UserError(f"--aa {args.aa}: timm would skip {', '.join(skipped)} without a word (each part is a key "
                            "and a number, e.g. rand-m9-mstd0.5-inc1). Fix or remove those parts")
        try:  # timm parses the policy string when the transform is built; tiny and cheap
            create_transform(8, is_training=True, auto_augment=args.aa)
        except (AssertionError, ValueError, KeyError, IndexError) as error:
            raise UserError(f"unknown augmentation policy --aa {args.aa} ({error}). Use a timm policy such as "
                            "rand-m9-mstd0.5-inc1, augmix-m5, original, or 'none'") from None
    if args.warmup_epochs >= args.epochs:
        # a warning, as in timm and DeiT: "--epochs 1" is the usual smoke test of any recipe
        warnings.append(f"--warmup-epochs {args.warmup_epochs} is as long as the run (--epochs {args.epochs}): the "
                        "learning rate never leaves the warmup (fine for a smoke test; lower --warmup-epochs "
                        "otherwise)")
    if args.start_epoch >= args.epochs:
        raise UserError(f"--start_epoch {args.start_epoch} is not below --epochs {args.epochs}: nothing to train")
    ablations = toe_switches(args)
    if args.token_drop != "toe" and ablations:
        raise UserError(f"{' '.join(ablations)} switches a part of ToE's operator, which --token-drop "
                        f"{args.token_drop} replaces. Leave them out, or use --token-drop toe")
    reducer = getattr(args, "reducer", "toe")
    if args.token_drop != "toe" and reducer != "toe":
        raise UserError(f"--reducer {reducer} chooses the tokens after block 0, and --token-drop {args.token_drop} "
                        "drops them before block 0 instead (the operator only counts them): pick one. Use "
                        "--token-drop toe with --reducer, or leave --reducer out")
    if args.vpt and not args.finetune:
        raise UserError(f"--vpt {args.vpt} tunes prompts for a trained backbone: pass it with --finetune FILE (a "
                        "random backbone would stay random)")
    if args.scale[0] > args.scale[1] or args.scale[0] == 0:
        raise UserError(f"--scale {args.scale[0]} {args.scale[1]} must be a range MIN MAX with 0 < MIN <= MAX <= 1")
    unreached = [step for step in args.expansion_step if step >= args.epochs + args.cooldown_epochs]
    if unreached:
        warnings.append(f"ToE stages starting at epochs {unreached} are never reached in "
                        f"{args.epochs + args.cooldown_epochs} epochs "
                        f"(--expansion-step {' '.join(map(str, args.expansion_step))})")
    return warnings


def to_device(value, device: torch.device):
    """``value`` on ``device``: a tensor, or a tuple/list/dict of them (other values as they are)."""
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value.to(device, non_blocking=True) if torch.is_tensor(value) else value


class ClassificationLoss(torch.nn.Module):
    """``loss(images, outputs, targets)``: the signature of the step, so a trainer's loss can also
    look at the images (DeiT's distillation asks a teacher). Here: the base loss of the logits."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, images: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.base(outputs, targets)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             sharded: bool = True, view=None) -> Dict[str, float]:
    """Top-1, top-5 and loss over the validation images.

    ``sharded``: ``loader`` holds this process's shard; the sums are added over all processes, and
    as each image sits in exactly one shard, every image is counted exactly once. Otherwise every
    process evaluates the whole set on its own. ``view``: the training run's device-side view of
    the images (e.g. a low-pass crop). No host sync per batch: the sums stay on the device.
    """
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits
    images_seen = 0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if view is not None:
            images = view(images)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               hits[:, :1].sum().double(), hits.sum().double()])
        images_seen += targets.shape[0]
    totals = torch.cat([totals.cpu(), torch.tensor([float(images_seen)], dtype=torch.float64)])
    if sharded:
        totals = all_reduce_sum(totals)
    images = max(totals[3].item(), 1.0)
    return {"loss": totals[0].item() / images, "acc1": 100.0 * totals[1].item() / images,
            "acc5": 100.0 * totals[2].item() / images, "images": int(totals[3].item())}


class ClassificationTask(Task):
    """Model, data, loss and optimizer of one classification run; the lifecycle drives it."""

    best_metric = "acc1"
    weights_must_match = ("model", "model_kwargs", "patch_size", "vpt", "prompt_tokens")
    misfit = ("the model", "Resume with the --model and --model-kwargs it was trained with")

    @staticmethod
    def check_flags(args: argparse.Namespace) -> List[str]:
        args = with_group_defaults(args)
        if not timm.is_model(args.model):
            raise UserError(f"unknown model {args.model!r}. Pick a timm ViT name, e.g. deit_small_patch16_224 "
                            "(list them with: python -c \"import timm; print(timm.list_models('deit*'))\")")
        if args.data_backend == "dali":
            from ToE.common import dali

            dali.require_dali()
            dali.rand_augment_args(args.aa)  # a policy DALI cannot run is refused before any work
        return check_training_flags(args)

    def __init__(self, args: argparse.Namespace, context: RunContext) -> None:
        args = with_group_defaults(args)
        self.args, self.env, self.device, self.toe = args, context.env, context.device, context.toe
        self.amp_dtype = context.amp_dtype
        self.plan = self.build_plan()
        first = self.plan[0]
        self.global_batch = self.plan.global_batch(self.env.world_size)
        self.train_set, self.val_set = self.build_datasets()
        self.num_classes = len(self.val_set.classes)
        self._check_batch()
        self.train_sampler = self._train_sampler()
        # evaluation: each process takes every world_size-th image, so each is counted once
        env = self.env
        val_indices = range(env.rank, len(self.val_set), env.world_size) if args.dist_eval else range(len(self.val_set))
        if args.data_backend == "dali":
            from ToE.common import dali

            self.val_loader = dali.eval_loader(self.val_set.samples, val_indices, int(1.5 * args.batch_size),
                                               args.input_size, args.crop_pct, self.device, args.num_workers)
        else:
            self.val_loader = DataLoader(Subset(self.val_set, list(val_indices)),
                                         batch_size=int(1.5 * args.batch_size), shuffle=False, **self._loader_kwargs())
        # more than one resolution: one full-resolution position table, interpolated per forward
        extra = {"dynamic_img_size": True} if first.crop not in (None, args.input_size) else {}
        self.model = self.build_model(**extra)
        self.patch_size = token_select.patch_size(self.model)
        self.num_patches = self.model.patch_embed.num_patches
        self.targets = self.build_targets()
        self._check_mixup_batch()
        self.criterion = self.build_criterion(self.build_loss())
        self.lr = args.lr if args.unscale_lr else args.lr * self.global_batch / 512.0
        self.optimizer = self.build_optimizer()
        # a pure function of the epoch and the flags (timm's schedulers keep no other state): a
        # resume rebuilds it, and a resume with a larger --epochs follows the new length
        # updates per epoch, the same in every epoch of a plan (its batch x accumulation is constant)
        updates = len(self.train_sampler) // (first.batch * first.accum)
        if updates < 1 and not args.eval:
            raise UserError(f"the training split has {len(self.train_set)} images, fewer than one update of "
                            f"{self.global_batch} images. Lower --global-batch or --batch-size")
        self.updates_per_epoch = updates if self.plan.per_update else None
        self.lr_scheduler = self.build_scheduler()
        self.clip_grad = args.clip_grad
        # VPT trains a few tokens and a head on a frozen backbone: no average of the weights
        self.ema_decay = args.model_ema_decay if args.model_ema and not args.vpt else None
        self.view = None  # the current plan's device-side view of the images
        self.announced = None  # the plan last announced (a curriculum says when it changes)
        self.policy = args.aa  # the RandAugment policy the training transform was built with
        self.random_kept: Optional[int] = None  # --token-drop random: the patch tokens PatchDropout keeps

    # -- build steps (a trainer replaces what is its own) ---------------------------------------------
    def build_plan(self):
        # timm's convention: --cooldown-epochs at the minimum lr come after the --epochs of the schedule
        args, world = self.args, self.env.world_size
        batch, accum = split_global_batch(args.global_batch or args.batch_size * world, world, args.batch_size)
        return constant_plan(args.epochs + args.cooldown_epochs, batch, accum)

    def build_datasets(self) -> Tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
        """Train and val image folders; one class list (train's) labels both splits."""
        args = self.args
        if args.data_backend == "dali" and type(self).train_transform is not ClassificationTask.train_transform:
            raise UserError(f"--data-backend dali augments with DALI's own graph, and {type(self).__name__} has its "
                            "own train_transform, which DALI would skip. Use --data-backend torch")
        train_set, val_set = train_val_folders(args.data_path, self.train_transform(args.input_size, args.aa),
                                               self.eval_transform(args.input_size))
        if not args.eval and not args.check_only:  # --check-only: the launched processes check it
            # a corrupt val image would otherwise surface only after the first epoch. Each process
            # decodes its share; the train split is not checked up front (its loader names a bad image)
            decoder = None  # the run's decoder checks them: PIL, or DALI's
            if args.data_backend == "dali":
                from ToE.common import dali

                decoder = functools.partial(dali.undecodable, device=self.device)
            check_images(val_set, "val", range(self.env.rank, len(val_set), self.env.world_size),
                         num_workers=args.num_workers, decoder=decoder)
        return train_set, val_set

    def build_model(self, **extra) -> torch.nn.Module:
        """The timm model with the ToE operator after block 0 (or --token-drop random's PatchDropout)."""
        args = self.args
        try:
            model = timm.create_model(args.model, pretrained=False, num_classes=self.num_classes, drop_rate=args.drop,
                                      drop_path_rate=args.drop_path, **self._model_kwargs(), **extra)
        except TypeError as error:
            raise UserError(f"model {args.model} does not take these arguments ({error}). "
                            "Pick a timm ViT (e.g. deit_small_patch16_224) and check --model-kwargs/--patch-size"
                            ) from None
        self._check_model(model)
        if args.finetune:
            for note in finetune(model, args.finetune):
                if self.env.is_main:
                    print(f"note: {note}", flush=True)
        if args.vpt:
            if getattr(model, "global_pool", "token") != "token":
                raise UserError(f"--vpt: model {args.model} pools by {model.global_pool!r}, which would average the "
                                "prompts in. Pick a class-token model (deit_*, vit_* with the default pool)")
            add_prompts(model, args.prompt_tokens, deep=args.vpt == "deep")
            freeze_backbone(model)
        token_select.attach(model, self.toe)
        if args.vpt:  # the prompts are prefix tokens for the operator: passed through, never merged or dropped
            self.toe.num_prefix_tokens += prompt_tokens(model)
        if args.token_drop == "random":
            # the baseline: PatchDropout keeps a random subset of the patch tokens before block 0, as
            # many as ToE keeps after block 0 (the operator stays attached only to count them). It runs
            # before block 0 puts VPT's prompts in, so its prefix is the model's own (class,
            # distillation), not the operator's, which counts the prompts too
            token_select.detach(model)
            model.patch_drop = PatchDropout(0.0, num_prefix_tokens=int(model.num_prefix_tokens))
        return model.to(self.device)

    def _model_kwargs(self) -> Dict[str, Any]:
        args = self.args
        return {"img_size": args.input_size, **({"patch_size": args.patch_size} if args.patch_size else {}),
                **args.model_kwargs}

    def meta_model(self) -> torch.nn.Module:
        """The model of the flags on the meta device (no memory, no work): its geometry (patch size,
        grid) before the data and the real model exist."""
        args = self.args
        try:
            with torch.device("meta"):
                return timm.create_model(args.model, num_classes=1, **self._model_kwargs())
        except (TypeError, ValueError) as error:
            raise UserError(f"model {args.model} cannot be built with these arguments ({error}). Check "
                            "--model/--model-kwargs/--input-size/--patch-size") from None

    def build_targets(self):
        """The per-batch target function ``(images, targets) -> (images, targets)``: mixup/cutmix or None."""
        args = self.args
        if args.mixup <= 0 and args.cutmix <= 0:
            return None
        return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                     switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                     num_classes=self.num_classes)

    def build_loss(self) -> torch.nn.Module:
        """The base loss of logits and targets: soft-target cross-entropy after mixup (it already
        smooths the targets), else label smoothing (``--smoothing``), else cross-entropy."""
        if isinstance(self.targets, Mixup):
            return SoftTargetCrossEntropy()
        if self.args.smoothing > 0:
            return LabelSmoothingCrossEntropy(smoothing=self.args.smoothing)
        return torch.nn.CrossEntropyLoss()

    def build_criterion(self, base: torch.nn.Module) -> torch.nn.Module:
        """The loss ``(images, outputs, targets) -> loss`` around ``base`` (DeiT: distillation)."""
        return ClassificationLoss(base)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """timm's ``--opt`` at the scaled lr (``self.lr``), weight decay off for norms and biases."""
        args = self.args
        return create_optimizer_v2(self.model, opt=args.opt, lr=self.lr, weight_decay=args.weight_decay,
                                   eps=args.opt_eps, momentum=args.momentum)

    def build_scheduler(self):
        """timm's --sched over --epochs (warmup included), then --cooldown-epochs at the minimum lr."""
        args = self.args
        return create_scheduler_v2(self.optimizer, sched=args.sched, num_epochs=args.epochs,
                                   warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr,
                                   cooldown_epochs=args.cooldown_epochs)[0]

    # -- pieces the build steps share --------------------------------------------------------------
    def train_transform(self, input_size: int, auto_augment: str):
        args = self.args
        return build_train_transform(
            input_size, auto_augment=auto_augment, color_jitter=args.color_jitter,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
            scale=tuple(args.scale), hflip=args.hflip)

    def eval_transform(self, input_size: int):
        kwargs = {} if self.args.crop_pct is None else {"crop_pct": self.args.crop_pct}
        return build_eval_transform(input_size, interpolation="bicubic", **kwargs)

    def _loader_kwargs(self) -> Dict[str, Any]:
        return dict(num_workers=self.args.num_workers, pin_memory=self.args.pin_mem and self.device.type == "cuda",
                    persistent_workers=False)

    def _check_batch(self) -> None:
        """Every batch the plan will ask for (a curriculum changes it) fits the data."""
        batches = sorted({self.plan[epoch].batch for epoch in range(self.plan.epochs)})
        if len(self.train_set) // self.env.world_size < batches[-1]:
            raise UserError(f"the training split has {len(self.train_set)} images, fewer than one batch of "
                            f"{batches[-1]} per process. Lower --batch-size (or --global-batch)")

    def _check_mixup_batch(self) -> None:
        """The built mixup (not the flags: a trainer may build none) needs even batches."""
        odd = sorted({self.plan[epoch].batch for epoch in range(self.plan.epochs)} - {0})
        odd = [batch for batch in odd if batch % 2]
        if isinstance(self.targets, Mixup) and odd:  # timm's Mixup pairs each image with its mirror
            raise UserError(f"mixup/cutmix need even batches, and this run trains batches of {odd[0]} images per "
                            "process. Pass an even --batch-size (and --global-batch), or --mixup 0 --cutmix 0")

    def _train_sampler(self):
        env = self.env
        if self.args.repeated_aug:
            return RepeatAugSampler(self.train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True)
        return DistributedSampler(self.train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                  seed=self.args.seed, drop_last=True)

    def _check_model(self, model: torch.nn.Module) -> None:
        """Refuse, in one line, a model ToE cannot reduce or an input its patches do not tile."""
        args = self.args
        name = type(model).__name__
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None or not hasattr(patch_embed, "num_patches") or not hasattr(model, "blocks"):
            raise UserError(f"model {args.model} ({name}) has no patch embedding and transformer blocks for Token "
                            "Expansion to reduce. Pick a timm ViT, e.g. deit_small_patch16_224")
        problem = token_select.reduction_problem(model)  # what attach refuses, said before any training
        if problem is not None or name not in SUPPORTED_MODEL_CLASSES:
            raise UserError(f"model {args.model} ({name}) " + (f"cannot take Token Expansion: {problem}" if problem else
                            "is not a model the classification trainers build and reduce (timm's VisionTransformer "
                            "and LV-ViT)") + ". Pick a model of timm's VisionTransformer family: deit_*, deit3_*, "
                            "vit_* (not vit_relpos_*)")
        patch = token_select.patch_size(model)
        if args.input_size % patch:
            raise UserError(f"--input-size {args.input_size} is not a multiple of the patch size {patch}: the "
                            f"last {args.input_size % patch} pixels would be cut off. Use e.g. --input-size "
                            f"{args.input_size - args.input_size % patch} or another --patch-size")

    # -- what the lifecycle calls ------------------------------------------------------------------
    def train_loader(self, epoch: int, plan: EpochPlan, skip: int) -> DataLoader:
        """This epoch's batches (the plan's batch, augmentation and view) without the first ``skip``."""
        args = self.args
        policy = plan.aa or args.aa
        if policy != self.policy and args.data_backend == "torch":  # a curriculum changed the magnitude
            self.train_set.transform = self.train_transform(args.input_size, policy)
            self.policy = policy
        self.view = plan.view
        shown = (plan.crop, policy, plan.batch, plan.accum)
        if plan.crop is not None and shown != self.announced and self.env.is_main:
            grid = plan.crop // self.patch_size
            view = "full resolution" if plan.view is None else repr(plan.view)
            print(f"epoch {epoch} on: {plan.crop} px ({grid * grid} patch tokens, {view}), RandAugment {policy}, batch "
                  f"{plan.batch} x {plan.accum} accumulation x {self.env.world_size} process(es) = "
                  f"{plan.batch * plan.accum * self.env.world_size}", flush=True)
        self.announced = shown
        grid = (plan.crop or args.input_size) // self.patch_size
        self.num_patches = grid * grid
        self.toe.grid_size = (grid, grid)  # uniform seeds are laid out on the grid the operator sees now
        self.toe.prepare(self.num_patches, self.device)  # the stage's caches filled eagerly (--torchcompile)
        if args.token_drop == "random":
            self.toe.update_current_stage(epoch)
            kept = self.toe.kept_patch_tokens(self.num_patches)
            # PatchDropout keeps int(P * (1 - prob)) tokens: aim between two integers
            self.model.patch_drop.prob = 0.0 if kept >= self.num_patches else 1.0 - (kept + 0.5) / self.num_patches
            self.random_kept = kept
        if args.data_backend == "dali":
            return self._dali_loader(epoch, plan, skip, policy)
        return epoch_loader(self.train_set, self.train_sampler, epoch, plan, skip, **self._loader_kwargs())

    def _dali_loader(self, epoch: int, plan: EpochPlan, skip: int, policy: str):
        """The DALI batches of ``epoch``: the torch path's sampler order and skip; augmentation seeded
        from the run's seed, this process's rank and the epoch (so an epoch boundary resumes exactly),
        from the run's one DALI loader (its pipeline built at the first epoch, kept for the others)."""
        from ToE.common import dali

        self.train_sampler.set_epoch(epoch)
        order = list(SkipFirst(self.train_sampler, skip * plan.batch) if skip else self.train_sampler)
        seed = int(np.random.SeedSequence([self.args.seed, self.env.rank, epoch]).generate_state(1)[0])
        if getattr(self, "dali_train", None) is None:
            self.dali_train = dali.TrainLoader(self.train_set.samples, self.args.input_size, self.args, self.device,
                                               max_batch=max(p.batch for p in self.plan))
        return self.dali_train.epoch(order, plan.batch, policy, seed, first_batch=skip)

    def train_step(self, model: torch.nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, Any], int]:
        images, targets = batch
        images, targets = images.to(self.device, non_blocking=True), to_device(targets, self.device)
        if self.view is not None:
            images = self.view(images)
        if self.targets is not None:
            images, targets = self.targets(images, targets)
        loss = self.criterion(images, model(images), targets)
        metrics: Dict[str, Any] = {"patch_tokens": self.num_patches}
        if self.random_kept is not None:
            metrics["kept_tokens"] = self.random_kept
        return loss, metrics, images.shape[0]

    def evaluate(self, model: torch.nn.Module) -> Dict[str, float]:
        return evaluate(model, self.val_loader, self.device, self.amp_dtype if self.args.eval_amp else None,
                        self.args.dist_eval, self.view)

    def eval_text(self, stats: Dict[str, float]) -> str:
        return f"top-1 {stats['acc1']:.2f} %"

    def describe(self) -> str:
        args = self.args
        kept = token_select.kept_tokens_per_stage(self.num_patches, args.keep_rate, args.initialization_keep_rate,
                                                  args.expansion_multiple_stage)
        return (f"{args.model}: {self.num_patches} patch tokens, the ToE stages keeping {kept} patch tokens; "
                f"{len(self.train_set)} train / {len(self.val_set)} val images; lr {self.lr:.2e} "
                f"({'--lr as given' if args.unscale_lr else f'--lr {args.lr:g} x {self.global_batch} / 512'})")

    def outputs_info(self) -> Dict[str, Any]:
        # the class count comes from the data: the summary's FLOP count needs the head
        return {"num_classes": self.num_classes}

    def evaluate_only(self, model: torch.nn.Module) -> None:
        stats = self.evaluate(model)
        if self.env.is_main:
            if self.args.sparse_eval and self.toe.reducing:
                print(f"sparse evaluation: {self.toe.kept_patch_tokens(self.num_patches)} of "
                      f"{self.num_patches} patch tokens (stage {self.toe.current_stage})")
            print(f"Accuracy on {stats['images']} test images: top-1 {stats['acc1']:.2f} %, "
                  f"top-5 {stats['acc5']:.2f} %, loss {stats['loss']:.4f}")
