"""The LV-ViT task: shared classification plus what is LV-ViT's own, token-label data (label-aware
transforms, the roi_align target builder as the per-batch target function), MixToken and the
token-labelling loss. Its cosine-with-cooldown schedule is the shared ``--cooldown-epochs``."""

from __future__ import annotations

from typing import List

import torch

from ToE.common.classification import ClassificationTask
from ToE.common.errors import UserError
from ToE.common.data import NO_AUTO_AUGMENT
from ToE.lvvit.labels import TokenLabelDataset, TokenLabelTargets, TokenLabelTransform, check_label_folder
from ToE.lvvit.loss import TokenLabelLoss
from ToE.lvvit.model import LVViT


class LVViTTask(ClassificationTask):
    """LV-ViT classification with token labelling and Token Expansion."""

    @staticmethod
    def check_flags(args) -> List[str]:
        if args.data_backend == "dali":
            raise UserError("--data-backend dali: LV-ViT keeps the torch input path, because its token-label maps "
                            "follow every crop, flip and RandAugment op of the image. Leave --data-backend out")
        # LV-ViT's dense head scores every patch token on the grid (its output, its token-label loss): the two
        # shared features that change which tokens the model carries are refused before any work
        if args.vpt:
            # VPT's prompt tokens would sit between the class token and the patches that LV-ViT puts back on the
            # grid and scores with its dense head, and the frozen backbone would freeze the new dense head too
            raise UserError(f"--vpt {args.vpt}: LV-ViT puts every token after the class token back on the patch grid "
                            "for its dense head, and prompt tokens have no place there. Fine-tune LV-ViT without "
                            "--vpt (--finetune alone), or prompt-tune a timm ViT with ToE/deit/main.py")
        if args.token_drop == "random":
            raise UserError("--token-drop random: LV-ViT's forward has no patch-dropout step (timm's "
                            "VisionTransformer has one), so the run would train on all tokens while its log said "
                            "otherwise. Compare against LV-ViT with all tokens (--expansion-step 0 --keep-rate 1.0), "
                            "or run the random baseline on a timm ViT with ToE/deit/main.py")
        warnings = ClassificationTask.check_flags(args)
        if args.token_label_data and not args.token_label:
            raise UserError(f"--token-label-data {args.token_label_data} is read only with --token-label: without it "
                            "the run would train on class labels alone. Add --token-label, or leave "
                            "--token-label-data out")
        if args.token_label and args.aa not in NO_AUTO_AUGMENT and not args.aa.startswith("rand"):
            raise UserError(f"--aa {args.aa}: the label-aware augmentation of --token-label follows RandAugment "
                            "policies only (rand-...), warping the label maps with the image. Use e.g. "
                            "--aa rand-m9-mstd0.5-inc1, or --aa none")
        return warnings

    def _model_grid(self) -> int:
        """The patch-grid side of ``--model`` at ``--input-size`` (built on the meta device: no memory, no work)."""
        args = self.args
        model = self.meta_model()
        if not isinstance(model, LVViT):
            raise UserError(f"model {args.model} is not an LV-ViT. Pick one of lvvit_t, lvvit_s, lvvit_m, lvvit_l, "
                            "lvvit_digits (or train other ViTs with ToE/deit/main.py)")
        return int(model.patch_embed.grid_size[0])

    def build_datasets(self):
        train_set, self.val_set = super().build_datasets()
        args = self.args
        self.grid = self._model_grid()
        if not args.token_label:
            return train_set, self.val_set
        if not args.token_label_data:
            raise UserError("--token-label needs the label folder: pass --token-label-data LABELS (write it with "
                            "python -m ToE.lvvit.generate_label)")
        # every label file is read once before training, each process its share
        env = self.env
        check_label_folder(train_set, args.token_label_data, args.token_label_size, self.grid,
                           shard=range(env.rank, len(train_set.samples), env.world_size))
        train_set.transform = None  # the token-label dataset applies its own label-aware transform
        transform = TokenLabelTransform(args.input_size, scale=args.scale, hflip=args.hflip, auto_augment=args.aa,
                                        interpolation=args.train_interpolation, re_prob=args.reprob,
                                        re_mode=args.remode, re_count=args.recount)
        return TokenLabelDataset(train_set, args.token_label_data, transform), self.val_set

    def build_model(self, **extra) -> torch.nn.Module:
        return super().build_model(mix_token=self.args.mix_token, **extra)

    def build_targets(self):
        # dense targets from the label maps (or smoothed one-hots), with LV-ViT's own mixup/cutmix
        args = self.args
        return TokenLabelTargets(self.num_classes, self.grid, smoothing=args.smoothing,
                                 legacy_coords=args.legacy_label_coords, mixup=args.mixup, cutmix=args.cutmix)

    def build_criterion(self, base: torch.nn.Module) -> torch.nn.Module:
        args = self.args
        return TokenLabelLoss(dense_weight=args.dense_weight, cls_weight=args.cls_weight,
                              ground_truth=args.ground_truth, kept_only=args.dense_loss == "kept", model=self.model)
