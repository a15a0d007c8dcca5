"""DeiT classification with Token Expansion.

    python ToE/deit/main.py --model deit_small_patch16_224 --data-path /data/imagenet --output_dir runs/small
    torchrun --nproc_per_node 8 ToE/deit/main.py ...            # one process per GPU

Models come from timm's registry unmodified; ``token_select.attach`` puts the ToE operator after
block 0, and the stage is set from the epoch before every epoch. Evaluation (and the EMA copy)
always runs the plain full-token model unless ``--sparse-eval``.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ToE.common.args import (  # noqa: E402
    OneLineParser, ParseKwargs, add_toe_args, decay_rate, non_negative_float, non_negative_int, positive_float,
    positive_int, probability, unit_interval_open)
from ToE.common.errors import run_main  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    """DeiT's flags plus the shared ToE group; ``add_help=False`` so launchers reuse it as a parent."""
    parser = OneLineParser("DeiT training with Token Expansion", add_help=False)
    parser.add_argument("--batch-size", default=64, type=positive_int, help="batch size per process (default: 64)")
    parser.add_argument("--epochs", default=300, type=positive_int, help="training epochs (default: 300)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="deit_small_patch16_224",
                       help="timm model name (default: deit_small_patch16_224)")
    model.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                       help="extra timm.create_model arguments, e.g. embed_dim=96 depth=6 num_heads=3")
    model.add_argument("--input-size", default=224, type=positive_int, help="image side in pixels (default: 224)")
    model.add_argument("--patch-size", default=None, type=positive_int,
                       help="patch side in pixels (default: the model's)")
    model.add_argument("--drop", type=unit_interval_open, default=0.0, help="dropout rate (default: 0)")
    model.add_argument("--drop-path", type=unit_interval_open, default=0.1, help="drop path rate (default: 0.1)")
    model.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True,
                       help="keep an exponential moving average of the weights, "
                            "evaluated with all tokens (default: on)")
    model.add_argument("--model-ema-decay", type=decay_rate, default=0.99996, help="EMA decay (default: 0.99996)")

    optim = parser.add_argument_group("optimizer and schedule")
    optim.add_argument("--opt", default="adamw", help="timm optimizer name (default: adamw)")
    optim.add_argument("--opt-eps", default=1e-8, type=positive_float, help="optimizer epsilon (default: 1e-8)")
    optim.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum (default: 0.9)")
    optim.add_argument("--weight-decay", type=non_negative_float, default=0.05, help="weight decay (default: 0.05)")
    optim.add_argument("--clip-grad", type=positive_float, default=None, help="clip gradient norm (default: off)")
    optim.add_argument("--sched", default="cosine", help="timm LR scheduler name (default: cosine)")
    optim.add_argument("--lr", type=positive_float, default=5e-4,
                       help="learning rate for a total batch of 512; scaled by total batch / 512 (default: 5e-4)")
    optim.add_argument("--unscale-lr", action="store_true", help="use --lr as given, without batch scaling")
    optim.add_argument("--warmup-lr", type=non_negative_float, default=1e-6,
                       help="warmup start learning rate (default: 1e-6)")
    optim.add_argument("--min-lr", type=non_negative_float, default=1e-5,
                       help="lowest learning rate of the cycle (default: 1e-5)")
    optim.add_argument("--warmup-epochs", type=non_negative_int, default=5, help="linear warmup epochs (default: 5)")

    aug = parser.add_argument_group("augmentation and regularisation")
    aug.add_argument("--color-jitter", type=non_negative_float, default=0.3,
                     help="colour jitter (default: 0.3; off with --aa)")
    aug.add_argument("--aa", default="rand-m9-mstd0.5-inc1",
                     help="timm AutoAugment policy, 'none' for off (default: rand-m9-mstd0.5-inc1)")
    aug.add_argument("--smoothing", type=unit_interval_open, default=0.1, help="label smoothing (default: 0.1)")
    aug.add_argument("--train-interpolation", default="bicubic",
                     help="training resize interpolation (default: bicubic)")
    aug.add_argument("--scale", type=probability, nargs=2, default=[0.08, 1.0],
                     help="random-resized-crop area range (default: 0.08 1.0)")
    aug.add_argument("--hflip", type=probability, default=0.5, help="horizontal flip probability (default: 0.5)")
    aug.add_argument("--crop-pct", type=probability, default=None,
                     help="evaluation centre-crop share (default: timm's 0.875)")
    aug.add_argument("--repeated-aug", action=argparse.BooleanOptionalAction, default=True,
                     help="repeated augmentation sampler, 3 repeats (default: on)")
    aug.add_argument("--reprob", type=probability, default=0.25, help="random erasing probability (default: 0.25)")
    aug.add_argument("--remode", default="pixel", help="random erasing mode (default: pixel)")
    aug.add_argument("--recount", type=positive_int, default=1, help="random erasing count (default: 1)")
    aug.add_argument("--mixup", type=non_negative_float, default=0.8, help="mixup alpha, 0 for off (default: 0.8)")
    aug.add_argument("--cutmix", type=non_negative_float, default=1.0, help="cutmix alpha, 0 for off (default: 1.0)")
    aug.add_argument("--mixup-prob", type=probability, default=1.0,
                     help="probability of mixup or cutmix (default: 1.0)")
    aug.add_argument("--mixup-switch-prob", type=probability, default=0.5,
                     help="probability of cutmix over mixup (default: 0.5)")
    aug.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"],
                     help="mixup mode: batch, pair or elem (default: batch)")

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

    run = parser.add_argument_group("data and run")
    run.add_argument("--data-path", default="data/digits",
                     help="folder with train/<class>/ and val/<class>/ (default: data/digits)")
    run.add_argument("--output_dir", "--output-dir", default="",
                     help="where to write checkpoints and logs (default: nothing written)")
    run.add_argument("--device", default="cuda",
                     help="cuda or cpu; cuda falls back to cpu without a GPU (default: cuda)")
    run.add_argument("--amp-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                     help="mixed precision via torch.amp: auto is bfloat16 on GPUs and float32 (off) on the CPU; "
                          "bfloat16 also runs on the CPU, float16 on GPUs only (default: auto)")
    run.add_argument("--seed", default=0, type=non_negative_int, help="random seed (default: 0)")
    run.add_argument("--resume", default="", help="checkpoint to continue from (e.g. OUT/checkpoint.pth)")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in an --output_dir that holds another run: its checkpoints, log and "
                          "TensorBoard events are deleted first (without it such a folder is refused)")
    run.add_argument("--check-only", action="store_true",
                     help="check the flags, the data folders, the output folder and the resume file, then exit "
                          "(the run scripts do this once before starting torchrun)")
    run.add_argument("--log-interval", default=50, type=positive_int,
                     help="steps between reads of the loss (progress bar, non-finite check); reading it "
                          "waits for the GPU, so not every step (default: 50)")
    run.add_argument("--start_epoch", default=0, type=non_negative_int,
                     help="first epoch when not resuming (default: 0)")
    run.add_argument("--stop-after-epochs", default=None, type=positive_int,
                     help="train at most this many epochs in this run, then exit; continue later with --resume "
                          "(for time-limited jobs)")
    run.add_argument("--eval", action="store_true", help="only evaluate (with --resume: the checkpoint)")
    run.add_argument("--dist-eval", action=argparse.BooleanOptionalAction, default=True,
                     help="split evaluation over the processes, each image exactly once (default: on)")
    run.add_argument("--num_workers", "--num-workers", default=8, type=non_negative_int,
                     help="data loading workers per process (default: 8)")
    run.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=True,
                     help="pin host memory (default: on)")

    add_toe_args(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser("DeiT training with Token Expansion", parents=[get_args_parser()])
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    from ToE.deit.trainer import Trainer

    Trainer(args).fit()


def cli(argv=None) -> None:
    run_main(lambda: main(parse_args(argv)))


if __name__ == "__main__":
    cli()
