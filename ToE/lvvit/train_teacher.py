"""Train the digits teacher (``digits_cnn``, ToE/lvvit/teacher.py) for the embedded token-labelling path.

    python -m ToE.lvvit.train_teacher --data-path data/digits --out runs/teacher.pth [--epochs 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader
from torchvision import transforms as T

from ToE.common.args import OneLineParser, non_negative_int, positive_int
from ToE.common.data import train_val_folders
from ToE.common.errors import UserError, run_main
from ToE.lvvit.teacher import DigitsCNN


def train_teacher(args: argparse.Namespace) -> float:
    """Train the teacher on DATA/train, save its state_dict to ``--out``; return val top-1 (%)."""
    if os.path.exists(args.out):
        raise UserError(f"teacher file {args.out} exists. Pass another --out (nothing is overwritten)")
    torch.manual_seed(args.seed)
    normalize = T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    train_tf = T.Compose([T.RandomResizedCrop(args.img_size, scale=(0.6, 1.0)), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(args.img_size), T.CenterCrop(args.img_size), T.ToTensor(), normalize])
    train_set, val_set = train_val_folders(args.data_path, train_tf, val_tf)
    model = DigitsCNN(num_classes=len(train_set.classes))
    loader = DataLoader(train_set, batch_size=64, shuffle=True, drop_last=True, num_workers=args.num_workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for images, targets in loader:
            loss = F.cross_entropy(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"teacher epoch {epoch}: loss {loss.item():.4f}", flush=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, targets in DataLoader(val_set, batch_size=128):
            correct += int((model(images).argmax(1) == targets).sum())
    accuracy = 100.0 * correct / len(val_set)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"teacher digits_cnn: val top-1 {accuracy:.2f} % after {args.epochs} epochs "
          f"({time.perf_counter() - start:.0f} s); weights in {args.out}", flush=True)
    return accuracy


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser("Train the digits teacher (digits_cnn) for token labelling")
    parser.add_argument("--data-path", default="data/digits", help="folder with train/ and val/ (default: data/digits)")
    parser.add_argument("--out", required=True, help="file for the teacher's state_dict")
    parser.add_argument("--img-size", type=positive_int, default=48, help="input side (default: 48)")
    parser.add_argument("--epochs", type=positive_int, default=6, help="epochs (default: 6)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="loader workers (default: 0)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(lambda: train_teacher(parse_args(sys.argv[1:])))
