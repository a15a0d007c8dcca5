"""The digits teacher for the embedded token-labelling path: a small fully-convolutional CNN
(``digits_cnn`` in timm's registry on ``import ToE.lvvit``) and a short trainer for it.

    python -m ToE.lvvit.train_teacher --data-path data/digits --out runs/teacher.pth [--epochs 6]

3x3 conv/BN/ReLU layers with total stride 4 and a linear classifier on global-average-pooled
features (CAM-style: applied at every position it gives the dense logits, as for NFNet on ImageNet).
At 48 px its map is 12 x 12, so the 8 x 8 LV-ViT targets are resampled by roi_align as 18 -> 14 is
on ImageNet.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """(B, 3, S, S) -> features (B, F, S/4, S/4) -> GAP -> ``head`` (C)."""

    def __init__(self, num_classes: int = 10, width: int = 24, **_) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 4 * width
        self.features = nn.Sequential(_conv(3, width, 1), _conv(width, 2 * width, 2), _conv(2 * width, 2 * width, 1),
                                      _conv(2 * width, 4 * width, 2), _conv(4 * width, 4 * width, 1))
        self.head = nn.Linear(4 * width, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean((2, 3)))


@register_model
def digits_cnn(pretrained: bool = False, **kwargs) -> DigitsCNN:
    if pretrained:
        raise ValueError("digits_cnn has no downloadable weights: train it with python -m ToE.lvvit.train_teacher")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    return DigitsCNN(**kwargs)
