"""EfficientTrain (+ Token Expansion) classification: one process runs the whole curriculum.

    python ToE/EfficientTrain/main.py --model deit_small_patch16_224 --data-path /data/imagenet \
        --output_dir runs/et_small --curriculum et --global-batch 4096 --batch-size 256 ...
    torchrun --nproc_per_node 8 ToE/EfficientTrain/main.py ...      # one process per GPU

The curriculum (``--curriculum et|etpp|table|none``) sets, per global epoch, the low-pass crop
size B (the model's input side), the RandAugment magnitude of ``--aa``, and the per-process batch
with gradient accumulation so that ``--global-batch`` stays fixed; the lr schedule steps per update.
ToE's stages follow the same global epoch, and its kept counts the patch grid of B. The best
checkpoint is chosen among full-resolution epochs only.
"""

from __future__ import annotations

import argparse

from ToE.common.args import (OneLineParser, add_classification_args, add_toe_args)
from ToE.common.lifecycle import trainer_entry
from ToE.EfficientTrain.curriculum import PRESETS


def add_curriculum_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("EfficientTrain curriculum")
    group.add_argument("--curriculum", default="et", choices=PRESETS,
                       help="et: the published 5 segments scaled to --epochs; etpp: EfficientTrain++'s 10 "
                            "segments, --epochs being the budget in full-resolution epochs; table: --segments; "
                            "none: plain training (default: et)")
    group.add_argument("--segments", nargs="+", default=None, metavar="END:CROP:MAGNITUDE[:BATCH]",
                       help="--curriculum table: each segment's last epoch + 1, crop size in px, RandAugment "
                            "magnitude and optional per-process batch, e.g. 9:24:1 18:24:3 27:24:5 36:28:7 45:32:9")
    group.add_argument("--low-pass", default="fft", choices=["fft", "resize"],
                       help="low-resolution view: fft, the published low-frequency crop; resize, "
                            "EfficientTrain++'s downscaling (bicubic, antialiased, on the device) (default: fft)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser("EfficientTrain training with Token Expansion", add_help=False)
    add_classification_args(parser)
    add_curriculum_args(parser)
    add_toe_args(parser)
    return parser


parse_args, main, cli = trainer_entry("EfficientTrain training with Token Expansion", get_args_parser,
                                      "ToE.EfficientTrain.trainer:EfficientTrainTask")


if __name__ == "__main__":
    cli()
