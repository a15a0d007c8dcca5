"""The embedded data set: scikit-learn's 1,797 real handwritten digits as an ImageNet-layout folder.

    python -m ToE.common.digits --out data/digits --size 32

writes ``train/<class>/*.png`` and ``val/<class>/*.png`` (10 classes, a fixed seeded split,
grayscale 8x8 digits upscaled to ``size`` and stored as RGB), so the trainers read it with exactly
the folder-loading code they use for ImageNet. Nothing is downloaded: the digits ship with
scikit-learn. Writing is idempotent: a complete folder is left alone.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

VAL_FRACTION = 0.165  # 297 of 1,797 images held out
SPLIT_SEED = 0
DONE_FILE = ".complete"


def build_digits(out: str, size: int = 32) -> str:
    """Write the digits folder under ``out`` (if not already complete); return ``out``."""
    done = os.path.join(out, DONE_FILE)
    if os.path.exists(done):
        with open(done) as handle:
            if handle.read().strip() == str(size):
                return out
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)   # (1797, 8, 8), values 0..16
    order = np.random.RandomState(SPLIT_SEED).permutation(len(images))
    num_val = int(round(len(images) * VAL_FRACTION))
    splits = {"val": order[:num_val], "train": order[num_val:]}
    for split, indices in splits.items():
        for index in indices:
            label = int(digits.target[index])
            folder = os.path.join(out, split, f"{label}")
            os.makedirs(folder, exist_ok=True)
            image = Image.fromarray(images[index], mode="L").resize((size, size), Image.BILINEAR)
            image.convert("RGB").save(os.path.join(folder, f"{index:04d}.png"))
    with open(done, "w") as handle:
        handle.write(str(size))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits", help="folder to write (default: data/digits)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    args = parser.parse_args()
    path = build_digits(args.out, args.size)
    counts = {split: sum(len(files) for _, _, files in os.walk(os.path.join(path, split)))
              for split in ("train", "val")}
    print(f"digits data in {path}: {counts['train']} train and {counts['val']} val images, {args.size} px")


if __name__ == "__main__":
    main()
