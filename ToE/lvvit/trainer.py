"""The LV-ViT run: the shared classification loop plus what is LV-ViT's own, token-label data
(label-aware transforms, the roi_align target builder as the loop's per-batch target function),
the token-labelling loss and the cosine schedule with cooldown epochs."""

from __future__ import annotations

import timm
import torch
from timm.scheduler import create_scheduler_v2

from ToE.common.classification import SUPPORTED_MODEL_CLASSES, ClassificationTrainer
from ToE.common.errors import UserError
from ToE.lvvit.labels import TokenLabelDataset, TokenLabelTargets, TokenLabelTransform, check_label_folder
from ToE.lvvit.loss import TokenLabelLoss
from ToE.lvvit.model import LVViT


class Trainer(ClassificationTrainer):
    """LV-ViT classification with token labelling and Token Expansion; ``fit()`` trains and checkpoints."""

    supported_model_classes = SUPPORTED_MODEL_CLASSES + ("LVViT",)

    def _model_grid(self) -> int:
        """The patch-grid side of ``--model`` at ``--input-size`` (built on the meta device: no memory, no work)."""
        args = self.args
        kwargs = {key: value for key, value in args.model_kwargs.items() if key != "mix_token"}  # LV-ViT's own
        kwargs.setdefault("img_size", args.input_size)
        if args.patch_size is not None:
            kwargs.setdefault("patch_size", args.patch_size)
        try:
            with torch.device("meta"):
                model = timm.create_model(args.model, num_classes=self.num_classes, **kwargs)
        except (TypeError, ValueError) as error:
            raise UserError(f"model {args.model} cannot be built with these arguments ({error}). Check "
                            "--model/--model-kwargs/--input-size") from None
        if not isinstance(model, LVViT):
            raise UserError(f"model {args.model} is not an LV-ViT. Pick one of lvvit_t, lvvit_s, lvvit_m, lvvit_l, "
                            "lvvit_digits (or train other ViTs with ToE/deit/main.py)")
        return int(model.patch_embed.grid_size[0])

    def _build_data(self) -> None:
        super()._build_data()
        args = self.args
        grid = self._model_grid()
        images = self.train_set
        if args.token_label:
            if not args.token_label_data:
                raise UserError("--token-label needs the label folder: pass --token-label-data LABELS (write it with "
                                "python -m ToE.lvvit.generate_label)")
            check_label_folder(images, args.token_label_data, args.token_label_size, grid)
            images.transform = None  # the token-label dataset applies its own label-aware transform
            transform = TokenLabelTransform(args.input_size, scale=args.scale, hflip=args.hflip, auto_augment=args.aa,
                                            interpolation=args.train_interpolation, re_prob=args.reprob,
                                            re_mode=args.remode, re_count=args.recount)
            self.train_set = TokenLabelDataset(images, args.token_label_data, transform)
            self.train_loader = self.build_train_loader(args.batch_size)
        if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
            raise UserError(f"mixup/cutmix need an even --batch-size, not {args.batch_size}. Pass an even one, or "
                            "--mixup 0 --cutmix 0")
        # the per-batch target function: dense targets from the label maps (or smoothed one-hots)
        self.mixup_fn = TokenLabelTargets(self.num_classes, grid, smoothing=args.smoothing,
                                          legacy_coords=args.legacy_label_coords, mixup=args.mixup,
                                          cutmix=args.cutmix)

    def _build_optimization(self) -> None:
        super()._build_optimization()
        args = self.args
        if args.cooldown_epochs:
            # published: cosine over --epochs - cooldown, then the minimum lr for the cooldown epochs
            self.lr_scheduler, _ = create_scheduler_v2(self.optimizer, sched=args.sched,
                                                       num_epochs=args.epochs - args.cooldown_epochs,
                                                       warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                                       min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs)

    def build_criterion(self, base: torch.nn.Module) -> torch.nn.Module:
        args = self.args
        return TokenLabelLoss(dense_weight=args.dense_weight, cls_weight=args.cls_weight,
                              ground_truth=args.ground_truth, kept_only=args.dense_loss == "kept",
                              model=self.model_without_ddp)
