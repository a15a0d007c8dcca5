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
from ToE.common.args import check_training_flags
from ToE.common.data import check_images, train_val_folders
from ToE.common.distributed import all_reduce_sum
from ToE.common.errors import UserError
from ToE.common.pretrained import finetune
from ToE.common.schedule import split_global_batch
from ToE.common.vpt import add_prompts, freeze_backbone, prompt_tokens
from ToE.common.lifecycle import ConstantPlan, EpochPlan, SkipFirst, autocast, epoch_loader, to_device
from ToE.common.transforms import build_eval_transform, build_train_transform

# The model classes the classification trainers build and are tested with: timm's VisionTransformer and
# its distilled subclass, and LV-ViT. Why another model cannot take a reduced sequence at all (relative or
# rotary positions, class attention, ...) is token_select.reduction_problem's to say, from the model itself.
SUPPORTED_MODEL_CLASSES = ("VisionTransformer", "VisionTransformerDistilled", "LVViT")


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


class ClassificationTask:
    """Model, data, loss and optimizer of one classification run; the lifecycle drives it."""

    best_metric = "acc1"
    weights_must_match = ("model", "model_kwargs", "patch_size", "vpt", "prompt_tokens")
    misfit = ("the model", "Resume with the --model and --model-kwargs it was trained with")

    @staticmethod
    def check_flags(args: argparse.Namespace) -> List[str]:
        if not timm.is_model(args.model):
            raise UserError(f"unknown model {args.model!r}. Pick a timm ViT name, e.g. deit_small_patch16_224 "
                            "(list them with: python -c \"import timm; print(timm.list_models('deit*'))\")")
        if args.data_backend == "dali":
            from ToE.common import dali

            dali.require_dali()
            dali.rand_augment_args(args.aa)  # a policy DALI cannot run is refused before any work
        return check_training_flags(args)

    def __init__(self, args: argparse.Namespace, run) -> None:
        self.args, self.env, self.device, self.toe = args, run.env, run.device, run.toe
        self.amp_dtype = run.amp_dtype
        self.plan = self.build_plan()
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
        extra = {"dynamic_img_size": True} if self.plan(0).crop not in (None, args.input_size) else {}
        self.model = self.build_model(**extra)
        self.num_patches = self.model.patch_embed.num_patches
        self.targets = self.build_targets()
        if isinstance(self.targets, Mixup):
            base = SoftTargetCrossEntropy()  # mixup already smooths the targets
        elif args.smoothing > 0:
            base = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            base = torch.nn.CrossEntropyLoss()
        self.criterion = self.build_criterion(base)
        self.lr = args.lr if args.unscale_lr else args.lr * self.total_batch / 512.0
        self.optimizer = create_optimizer_v2(self.model, opt=args.opt, lr=self.lr, weight_decay=args.weight_decay,
                                             eps=args.opt_eps, momentum=args.momentum)
        # a pure function of the epoch and the flags (timm's schedulers keep no other state): a
        # resume rebuilds it, and a resume with a larger --epochs follows the new length
        # updates per epoch, the same in every epoch of a plan (its batch x accumulation is constant)
        updates = len(self.train_sampler) // (self.plan(0).batch * self.plan(0).accum)
        if updates < 1 and not args.eval:
            raise UserError(f"the training split has {len(self.train_set)} images, fewer than one update of "
                            f"{self.total_batch} images. Lower --global-batch or --batch-size")
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
        return ConstantPlan(args.epochs + args.cooldown_epochs, batch, accum)

    def build_datasets(self) -> Tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
        """Train and val image folders; one class list (train's) labels both splits."""
        args = self.args
        train_set, val_set = train_val_folders(args.data_path, self.train_transform(args.input_size, args.aa),
                                               self.eval_transform(args.input_size))
        if not args.eval and not args.check_only:  # --check-only: the launched processes check it
            # a corrupt val image would otherwise surface only after the first epoch. Each process
            # decodes its share; the train split is not checked up front (its loader names a bad image)
            check_images(val_set, "val", range(self.env.rank, len(val_set), self.env.world_size),
                         num_workers=args.num_workers,
                         dali_device=self.device if args.data_backend == "dali" else None)  # the run's decoder
        return train_set, val_set

    def build_model(self, **extra) -> torch.nn.Module:
        """The timm model with the ToE operator after block 0 (or --token-drop random's PatchDropout)."""
        args = self.args
        kwargs = {"img_size": args.input_size, **({"patch_size": args.patch_size} if args.patch_size else {}),
                  **args.model_kwargs, **extra}
        try:
            model = timm.create_model(args.model, pretrained=False, num_classes=self.num_classes, drop_rate=args.drop,
                                      drop_path_rate=args.drop_path, **kwargs)
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

    def build_targets(self):
        """The per-batch target function ``(images, targets) -> (images, targets)``: mixup/cutmix or None."""
        args = self.args
        if args.mixup <= 0 and args.cutmix <= 0:
            return None
        return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                     switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                     num_classes=self.num_classes)

    def build_criterion(self, base: torch.nn.Module) -> torch.nn.Module:
        """The loss ``(images, outputs, targets) -> loss`` around ``base``."""
        return ClassificationLoss(base)

    def build_scheduler(self):
        """timm's --sched over --epochs (warmup included), then --cooldown-epochs at the minimum lr."""
        args = self.args
        return create_scheduler_v2(self.optimizer, sched=args.sched, num_epochs=args.epochs,
                                   warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr,
                                   cooldown_epochs=args.cooldown_epochs)[0]

    # -- pieces the build steps share --------------------------------------------------------------
    @property
    def total_batch(self) -> int:
        """Images per optimizer update over all processes (the lr scales with it)."""
        plan = self.plan(0)
        return plan.batch * plan.accum * self.env.world_size

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
        """Every batch the plan will ask for (a curriculum changes it) fits the data and the mixup."""
        args = self.args
        batches = sorted({self.plan(epoch).batch for epoch in range(self.plan.epochs)})
        if len(self.train_set) // self.env.world_size < batches[-1]:
            raise UserError(f"the training split has {len(self.train_set)} images, fewer than one batch of "
                            f"{batches[-1]} per process. Lower --batch-size (or --global-batch)")
        odd = [batch for batch in batches if batch % 2]
        if (args.mixup > 0 or args.cutmix > 0) and odd:  # timm's Mixup pairs each image with its mirror
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
        patch = getattr(patch_embed, "patch_size", None)
        patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch or 1)
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
            grid = plan.crop // int(self.model.patch_embed.patch_size[0])
            view = "full resolution" if plan.view is None else repr(plan.view)
            print(f"epoch {epoch} on: {plan.crop} px ({grid * grid} patch tokens, {view}), RandAugment {policy}, batch "
                  f"{plan.batch} x {plan.accum} accumulation x {self.env.world_size} process(es) = "
                  f"{plan.batch * plan.accum * self.env.world_size}", flush=True)
        self.announced = shown
        grid = (plan.crop or args.input_size) // int(self.model.patch_embed.patch_size[0])
        self.num_patches = grid * grid
        self.toe.grid_size = (grid, grid)  # uniform seeds are laid out on the grid the operator sees now
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
        from the run's seed, this process's rank and the epoch (so an epoch boundary resumes exactly)."""
        from ToE.common import dali

        self.train_sampler.set_epoch(epoch)
        order = list(SkipFirst(self.train_sampler, skip * plan.batch) if skip else self.train_sampler)
        seed = int(np.random.SeedSequence([self.args.seed, self.env.rank, epoch]).generate_state(1)[0])
        return dali.train_loader(self.train_set.samples, order, plan.batch, self.args.input_size, self.args, policy,
                                 self.device, seed)

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
                f"({'--lr as given' if args.unscale_lr else f'--lr {args.lr:g} x {self.total_batch} / 512'})")

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
