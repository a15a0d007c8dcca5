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

from ToE.common.args import ParseKwargs, add_toe_args  # noqa: E402
from ToE.common.errors import run_main  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    """DeiT's flags plus the shared ToE group; ``add_help=False`` so launchers reuse it as a parent."""
    parser = argparse.ArgumentParser("DeiT training with Token Expansion", add_help=False)
    parser.add_argument("--batch-size", default=64, type=int, help="batch size per process (default: 64)")
    parser.add_argument("--epochs", default=300, type=int, help="training epochs (default: 300)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="deit_small_patch16_224",
                       help="timm model name (default: deit_small_patch16_224)")
    model.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                       help="extra timm.create_model arguments, e.g. embed_dim=96 depth=6 num_heads=3")
    model.add_argument("--input-size", default=224, type=int, help="image side in pixels (default: 224)")
    model.add_argument("--patch-size", default=None, type=int, help="patch side in pixels (default: the model's)")
    model.add_argument("--drop", type=float, default=0.0, help="dropout rate (default: 0)")
    model.add_argument("--drop-path", type=float, default=0.1, help="drop path rate (default: 0.1)")
    model.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True,
                       help="keep an exponential moving average of the weights, "
                            "evaluated with all tokens (default: on)")
    model.add_argument("--model-ema-decay", type=float, default=0.99996, help="EMA decay (default: 0.99996)")

    optim = parser.add_argument_group("optimizer and schedule")
    optim.add_argument("--opt", default="adamw", help="timm optimizer name (default: adamw)")
    optim.add_argument("--opt-eps", default=1e-8, type=float, help="optimizer epsilon (default: 1e-8)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (default: 0.05)")
    optim.add_argument("--clip-grad", type=float, default=None, help="clip gradient norm (default: off)")
    optim.add_argument("--sched", default="cosine", help="timm LR scheduler name (default: cosine)")
    optim.add_argument("--lr", type=float, default=5e-4,
                       help="learning rate for a total batch of 512; scaled by total batch / 512 (default: 5e-4)")
    optim.add_argument("--unscale-lr", action="store_true", help="use --lr as given, without batch scaling")
    optim.add_argument("--warmup-lr", type=float, default=1e-6, help="warmup start learning rate (default: 1e-6)")
    optim.add_argument("--min-lr", type=float, default=1e-5, help="lowest learning rate of the cycle (default: 1e-5)")
    optim.add_argument("--warmup-epochs", type=int, default=5, help="linear warmup epochs (default: 5)")

    aug = parser.add_argument_group("augmentation and regularisation")
    aug.add_argument("--color-jitter", type=float, default=0.3, help="colour jitter (default: 0.3; off with --aa)")
    aug.add_argument("--aa", default="rand-m9-mstd0.5-inc1",
                     help="timm AutoAugment policy, 'none' for off (default: rand-m9-mstd0.5-inc1)")
    aug.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    aug.add_argument("--train-interpolation", default="bicubic",
                     help="training resize interpolation (default: bicubic)")
    aug.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0],
                     help="random-resized-crop area range (default: 0.08 1.0)")
    aug.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (default: 0.5)")
    aug.add_argument("--crop-pct", type=float, default=None,
                     help="evaluation centre-crop share (default: timm's 0.875)")
    aug.add_argument("--repeated-aug", action=argparse.BooleanOptionalAction, default=True,
                     help="repeated augmentation sampler, 3 repeats (default: on)")
    aug.add_argument("--reprob", type=float, default=0.25, help="random erasing probability (default: 0.25)")
    aug.add_argument("--remode", default="pixel", help="random erasing mode (default: pixel)")
    aug.add_argument("--recount", type=int, default=1, help="random erasing count (default: 1)")
    aug.add_argument("--mixup", type=float, default=0.8, help="mixup alpha, 0 for off (default: 0.8)")
    aug.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha, 0 for off (default: 1.0)")
    aug.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix (default: 1.0)")
    aug.add_argument("--mixup-switch-prob", type=float, default=0.5,
                     help="probability of cutmix over mixup (default: 0.5)")
    aug.add_argument("--mixup-mode", default="batch", help="mixup mode: batch, pair or elem (default: batch)")

    distill = parser.add_argument_group("distillation (distilled DeiT models)")
    distill.add_argument("--teacher-model", default="regnety_160",
                         help="timm name of the teacher (default: regnety_160)")
    distill.add_argument("--teacher-path", default="", help="teacher checkpoint on disk (model weights)")
    distill.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"],
                         help="distillation from the teacher (default: none)")
    distill.add_argument("--distillation-alpha", default=0.5, type=float,
                         help="weight of the distillation loss (default: 0.5)")
    distill.add_argument("--distillation-tau", default=1.0, type=float,
                         help="soft distillation temperature (default: 1.0)")

    run = parser.add_argument_group("data and run")
    run.add_argument("--data-path", default="data/digits",
                     help="folder with train/<class>/ and val/<class>/ (default: data/digits)")
    run.add_argument("--output_dir", "--output-dir", default="",
                     help="where to write checkpoints and logs (default: nothing written)")
    run.add_argument("--device", default="cuda",
                     help="cuda or cpu; cuda falls back to cpu without a GPU (default: cuda)")
    run.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                     help="mixed precision on GPUs via torch.amp; float32 turns it off (default: bfloat16)")
    run.add_argument("--seed", default=0, type=int, help="random seed (default: 0)")
    run.add_argument("--resume", default="", help="checkpoint to continue from (e.g. OUT/checkpoint.pth)")
    run.add_argument("--start_epoch", default=0, type=int, help="first epoch when not resuming (default: 0)")
    run.add_argument("--stop-after-epochs", default=None, type=int,
                     help="train at most this many epochs in this run, then exit; continue later with --resume "
                          "(for time-limited jobs)")
    run.add_argument("--eval", action="store_true", help="only evaluate (with --resume: the checkpoint)")
    run.add_argument("--dist-eval", action=argparse.BooleanOptionalAction, default=True,
                     help="split evaluation over the processes, each image exactly once (default: on)")
    run.add_argument("--num_workers", "--num-workers", default=8, type=int,
                     help="data loading workers per process (default: 8)")
    run.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=True,
                     help="pin host memory (default: on)")

    add_toe_args(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("DeiT training with Token Expansion", parents=[get_args_parser()])
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    from ToE.deit.trainer import Trainer

    Trainer(args).fit()


def cli(argv=None) -> None:
    run_main(lambda: main(parse_args(argv)))


if __name__ == "__main__":
    cli()
