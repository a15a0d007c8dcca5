"""YOLOS detection with Token Expansion.

    python ToE/yolos/main.py --coco_path /data/coco --backbone_name deit_tiny_patch16_224 \
        --init-checkpoint deit_tiny_patch16_224-a1311bcf.pth --output_dir runs/yolos_ti
    torchrun --nproc_per_node 8 ToE/yolos/main.py ...           # one process per GPU
    python ToE/yolos/main.py ... --eval --resume runs/yolos_ti/checkpoint.pth   # COCO results json

The backbone is a timm VisionTransformer used as it is; the detection tokens are the ToE
operator's suffix tokens (never merged); the stage is set from the epoch before every epoch;
evaluation runs all tokens unless ``--sparse-eval``. Flags keep the published YOLOS names
(``--coco_path``, ``--batch_size``, ``--backbone_name``, ``--pre_trained``, ``--eval_size``,
``--init_pe_size``, ``--mid_pe_size``, ``--det_token_num``) beside the shared ToE group.
"""

from __future__ import annotations

import argparse

from ToE.common.args import (OneLineParser, ParseKwargs, add_run_args, add_toe_args, non_negative_float,
                             non_negative_int, positive_float, positive_int, probability)
from ToE.common.lifecycle import trainer_entry


def get_args_parser() -> argparse.ArgumentParser:
    """YOLOS's flags (published names, with dashed aliases) and the shared ToE group."""
    parser = OneLineParser("YOLOS detection with Token Expansion", add_help=False)
    parser.add_argument("--batch_size", "--batch-size", default=2, type=positive_int,
                        help="images per process and step (default: 2)")
    parser.add_argument("--epochs", default=150, type=positive_int, help="training epochs (default: 150)")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone_name", "--backbone-name", default="deit_tiny_patch16_224",
                       help="timm ViT name of the backbone (default: deit_tiny_patch16_224)")
    model.add_argument("--backbone-kwargs", nargs="*", default={}, action=ParseKwargs,
                       help="extra timm.create_model arguments, e.g. img_size=64 patch_size=8 embed_dim=96 depth=4")
    model.add_argument("--init-checkpoint", "--pre_trained", dest="init_checkpoint", default="",
                       help="classification weights for the backbone: a published DeiT .pth, a timm state dict or "
                            "this project's DeiT checkpoint.pth (default: random initialisation)")
    model.add_argument("--pos-init-sincos", default=0.0, type=non_negative_float, metavar="SCALE",
                       help="set the patch rows of the position table to a 2-D sin-cos table times SCALE (after "
                            "--init-checkpoint, replacing its rows): timm's std-0.02 init, and a small classifier's "
                            "learned table, carry too little position for box regression (default: 0, off)")
    model.add_argument("--det_token_num", "--det-token-num", default=100, type=positive_int,
                       help="detection tokens (default: 100)")
    model.add_argument("--init_pe_size", "--init-pe-size", nargs=2, type=positive_int, default=[800, 1333],
                       metavar=("H", "W"), help="image size whose patch grid the stored position table has "
                                                "(default: 800 1333)")
    model.add_argument("--mid_pe_size", "--mid-pe-size", nargs=2, type=positive_int, default=None,
                       metavar=("H", "W"), help="add learned position tables after every block but the last, on "
                                                "this grid (default: none; YOLOS-S: 512 864)")
    model.add_argument("--pe-resize-by-count", action="store_true",
                       help="reproduce the published bug: skip the position-table resize when the patch COUNT "
                            "matches though the grid shape differs (default: compare shapes)")
    model.add_argument("--num-classes", default=None, type=positive_int,
                       help="category logits (default: the largest category id + 1; COCO: 91)")

    loss = parser.add_argument_group("matcher and loss (published weights)")
    loss.add_argument("--set_cost_class", default=1.0, type=non_negative_float, help="class cost (default: 1)")
    loss.add_argument("--set_cost_bbox", default=5.0, type=non_negative_float, help="L1 box cost (default: 5)")
    loss.add_argument("--set_cost_giou", default=2.0, type=non_negative_float, help="GIoU cost (default: 2)")
    loss.add_argument("--bbox_loss_coef", default=5.0, type=non_negative_float, help="L1 loss weight (default: 5)")
    loss.add_argument("--giou_loss_coef", default=2.0, type=non_negative_float, help="GIoU loss weight (default: 2)")
    loss.add_argument("--eos_coef", default=0.1, type=probability, help="weight of the no-object class (default: 0.1)")

    optim = parser.add_argument_group("optimizer and schedule")
    optim.add_argument("--lr", default=1e-4, type=positive_float, help="AdamW learning rate (default: 1e-4)")
    optim.add_argument("--weight_decay", "--weight-decay", default=1e-4, type=non_negative_float,
                       help="weight decay (default: 1e-4)")
    optim.add_argument("--clip_max_norm", "--clip-max-norm", default=0.1, type=non_negative_float,
                       help="gradient clipping max norm, 0 for off (default: 0.1)")
    optim.add_argument("--min-lr", default=1e-7, type=non_negative_float,
                       help="lowest learning rate of the cosine (default: 1e-7)")
    optim.add_argument("--warmup-epochs", default=0, type=non_negative_int, help="linear warmup epochs (default: 0)")
    optim.add_argument("--warmup-lr", default=1e-6, type=non_negative_float, help="warmup start lr (default: 1e-6)")

    data = parser.add_argument_group("data")
    data.add_argument("--coco_path", "--data-path", dest="data_path", default="data/digits-det",
                      help="COCO layout: train2017/, val2017/, annotations/instances_{train,val}2017.json "
                           "(default: data/digits-det)")
    data.add_argument("--scales", nargs="+", type=positive_int, default=list(range(480, 801, 16)),
                      help="training short sides, floored to the patch (default: 480 496 ... 800)")
    data.add_argument("--max-size", default=1333, type=positive_int, help="largest training long side (default: 1333)")
    data.add_argument("--select-scales", nargs="+", type=positive_int, default=[400, 500, 600],
                      help="short sides before the random crop (default: 400 500 600)")
    data.add_argument("--crop-size", nargs=2, type=positive_int, default=[384, 600], metavar=("MIN", "MAX"),
                      help="random crop side range (default: 384 600)")
    data.add_argument("--hflip", default=0.5, type=probability, help="horizontal flip probability (default: 0.5)")
    data.add_argument("--eval_size", "--eval-size", default=800, type=positive_int,
                      help="evaluation short side (default: 800)")
    data.add_argument("--eval-max-size", default=None, type=positive_int,
                      help="evaluation long side limit (default: eval_size * 1333 // 800)")
    data.add_argument("--eval-batch-size", default=None, type=positive_int,
                      help="evaluation images per process and step (default: --batch_size)")

    data.add_argument("--num_workers", "--num-workers", default=2, type=non_negative_int,
                      help="data loading workers per process (default: 2)")
    data.add_argument("--results-json", default="",
                      help="where --eval writes the detections (default: OUTPUT_DIR/detections_val2017.json)")
    add_run_args(parser)
    parser.set_defaults(seed=42, eval_amp=False)  # published YOLOS evaluates (and trains) in float32
    add_toe_args(parser)
    return parser


parse_args, main, cli = trainer_entry("YOLOS detection with Token Expansion", get_args_parser,
                                      "ToE.yolos.trainer:DetectionTask")


if __name__ == "__main__":
    cli()
