"""ImageNet-layout folders (``<root>/{train,val}/<class>/<image>``), checked with clear errors."""

from __future__ import annotations

import os

from PIL import Image
from torchvision import datasets

from .errors import UserError


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read image {path} ({error.__class__.__name__}). "
                        "Remove or replace that file") from None


def image_folder(root: str, split: str, transform=None) -> datasets.ImageFolder:
    """``torchvision.datasets.ImageFolder`` on ``root/split`` with user errors for bad layouts."""
    if not os.path.isdir(root):
        raise UserError(f"data path {root} does not exist. Pass --data-path with the folder that holds "
                        "train/ and val/ (build the embedded digits with: python -m ToE.common.digits)")
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is missing. The data path must hold train/<class>/ and val/<class>/ folders")
    if not any(entry.is_dir() for entry in os.scandir(folder)):
        raise UserError(f"{folder} has no class folders. Put the images of each class in {folder}/<class>/")
    try:
        return datasets.ImageFolder(folder, transform=transform, loader=_load_rgb)
    except FileNotFoundError as error:
        raise UserError(f"{folder} holds no images ({error}). Every split needs images in its class folders") from None
