"""DeiT classification with Token Expansion.

    python ToE/deit/main.py --model deit_small_patch16_224 --data-path /data/imagenet --output_dir runs/small
    torchrun --nproc_per_node 8 ToE/deit/main.py ...            # one process per GPU

Models come from timm's registry unmodified; ``token_select.attach`` puts the ToE operator after
block 0, and the stage is set from the epoch before every epoch. Evaluation (and the EMA copy)
always runs the plain full-token model unless ``--sparse-eval``.
"""

from __future__ import annotations

import argparse

from ToE.common.args import (OneLineParser, add_classification_args, add_toe_args, positive_float,
                             probability)
from ToE.common.lifecycle import trainer_entry


def get_args_parser() -> argparse.ArgumentParser:
    """The shared classification flags (DeiT's names), DeiT's distillation flags and the shared ToE
    group; ``add_help=False`` so launchers reuse it as a parent."""
    parser = OneLineParser("DeiT training with Token Expansion", add_help=False)
    add_classification_args(parser)
    distill = parser.add_argument_group("distillation (distilled DeiT models)")
    distill.add_argument("--teacher-model", default="regnety_160",
                         help="timm name of the teacher (default: regnety_160)")
    distill.add_argument("--teacher-path", default="", help="teacher checkpoint on disk (model weights)")
    distill.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"],
                         help="distillation from the teacher (default: none)")
    distill.add_argument("--distillation-alpha", default=0.5, type=probability,
                         help="weight of the distillation loss (default: 0.5)")
    distill.add_argument("--distillation-tau", default=1.0, type=positive_float,
                         help="soft distillation temperature (default: 1.0)")

    add_toe_args(parser)
    return parser


parse_args, main, cli = trainer_entry("DeiT training with Token Expansion", get_args_parser,
                                      "ToE.deit.trainer:DeiTTask")


if __name__ == "__main__":
    cli()
