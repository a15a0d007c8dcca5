"""LV-ViT with token labelling and Token Expansion.

    python ToE/lvvit/main.py --model lvvit_s --data-path /data/imagenet --token-label \
        --token-label-data /data/imagenet_labels --token-label-size 14 --output_dir runs/lvvit_s
    torchrun --nproc_per_node 4 ToE/lvvit/main.py ...             # one process per GPU

The shared classification task (ToE/common/classification.py) with LV-ViT's recipe as defaults:
AdamW at --lr 1.6e-3 used as given (not batch-scaled, as published), cosine over --epochs (300)
then --cooldown-epochs (10) at the minimum lr, 310 epochs in all, 5 warmup epochs, drop path 0.1,
EMA (decay 0.99992 per step), RandAugment, random erasing, no mixup/cutmix, MixToken, token labels.
The published LV-ViT flag names are accepted beside the project's: -b (--batch-size), --img-size
(--input-size), --token-label, --token-label-data, --token-label-size, --dense-weight, --cls-weight,
--model-ema, --apex-amp.
"""

from __future__ import annotations

import argparse

from ToE.common.args import (OneLineParser, add_classification_args, add_toe_args, non_negative_float,
                             positive_int)
from ToE.common.lifecycle import trainer_entry
from ToE.common.config import config_path, set_config_defaults

# published name -> the project's flag it is another name for
ALIASES = {"-b": ("batch_size", positive_int), "--img-size": ("input_size", positive_int)}


def get_args_parser() -> argparse.ArgumentParser:
    """The shared classification and ToE flags, LV-ViT's own, and the published aliases."""
    parser = OneLineParser("LV-ViT training with token labelling and Token Expansion", add_help=False)
    add_classification_args(parser)
    for option, (dest, kind) in ALIASES.items():
        # a second flag with the same destination and check (argparse's public way to spell a flag twice);
        # SUPPRESS: it sets no default of its own
        parser.add_argument(option, dest=dest, type=kind, default=argparse.SUPPRESS,
                            help=f"same as --{dest.replace('_', '-')}")
    lv = parser.add_argument_group("LV-ViT and token labelling")
    lv.add_argument("--token-label", action=argparse.BooleanOptionalAction, default=False,
                    help="train every patch token against the dense teacher labels of --token-label-data")
    lv.add_argument("--token-label-data", default="", help="label folder <dir>/<class>/<stem>.pt (published format)")
    lv.add_argument("--token-label-size", type=positive_int, default=14,
                    help="side of the dense target grid; must equal the model's patch grid (default: 14)")
    lv.add_argument("--dense-weight", type=non_negative_float, default=1.0,
                    help="weight of the patch-token (dense) loss (default: 1.0)")
    lv.add_argument("--cls-weight", type=non_negative_float, default=1.0,
                    help="weight of the class-token loss (default: 1.0)")
    lv.add_argument("--ground-truth", action="store_true",
                    help="mix the ground truth into the class target (published weighting: 0.5 where teacher and "
                         "label agree, 0.9 teacher where they disagree)")
    lv.add_argument("--dense-loss", choices=["all", "kept"], default="all",
                    help="under ToE, average the dense loss over all positions (published: the dropped ones only "
                         "train the aux bias) or over the kept positions only (default: all)")
    lv.add_argument("--legacy-label-coords", action="store_true",
                    help="the published label crop, which swaps x and y in the roi_align boxes (for exact "
                         "reproduction; off: the crop box is right)")
    lv.add_argument("--mix-token", action=argparse.BooleanOptionalAction, default=True,
                    help="MixToken (published: on for every step)")
    lv.add_argument("--apex-amp", action="store_const", dest="amp_dtype", const="float16",
                    help="published flag: fp16 mixed precision, here through torch.amp (autocast + GradScaler; "
                         "apex is not needed). Same as --amp-dtype float16")
    add_toe_args(parser)
    # LV-ViT's defaults are its published LV-ViT-S recipe, as in the published main.py; the one copy is the YAML
    set_config_defaults(parser, config_path("lvvit", "imagenet_small"))
    # except its images per update: the run scripts (-c the recipe) train the published 1,024; a bare
    # command line trains --batch-size x processes, as every trainer does without a recipe
    parser.set_defaults(global_batch=None)
    return parser


parse_args, main, cli = trainer_entry("LV-ViT training with token labelling and Token Expansion", get_args_parser,
                                      "ToE.lvvit.trainer:LVViTTask")


if __name__ == "__main__":
    cli()
