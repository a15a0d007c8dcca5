"""The embedded data set: scikit-learn's 1,797 real handwritten digits as an ImageNet-layout folder.

    python -m ToE.common.digits --out data/digits --size 32

writes ``train/<class>/*.png`` and ``val/<class>/*.png`` (10 classes, a fixed seeded split,
grayscale 8x8 digits upscaled to ``size`` and stored as RGB), so the trainers read it with exactly
the folder-loading code they use for ImageNet. Nothing is downloaded: the digits ship with
scikit-learn. Writing is idempotent: a complete folder is left alone.

    python -m ToE.common.digits --out data/digits-shift --size 32 --shift

writes the same digits under a fixed shift the demo never sees: turned a quarter to the left and
in inverted colours (dark digits on a light ground), with a blue tint. A transfer task for
fine-tuning a model pretrained on the plain digits (python -m bench.finetune; docs/finetuning.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np

VAL_FRACTION = 0.165  # 297 of 1,797 images held out
SPLIT_SEED = 0
DONE_FILE = ".complete"


def _complete(out: str, stamp: str) -> bool:
    done = os.path.join(out, DONE_FILE)
    if not os.path.exists(done):
        return False
    with open(done) as handle:
        return handle.read().strip() == stamp


def build_digits(out: str, size: int = 32, shift: bool = False) -> str:
    """Write the digits folder under ``out`` (if not already complete); return ``out``.

    The images are written into a temporary sibling folder that is then renamed to ``out``, so an
    interrupted build leaves no half-written folder and processes building at once (test workers,
    the ranks of a run) never read one another's partial files."""
    stamp = f"{size} shift" if shift else str(size)
    if _complete(out, stamp):
        return out
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)   # (1797, 8, 8), values 0..16
    order = np.random.RandomState(SPLIT_SEED).permutation(len(images))
    num_val = int(round(len(images) * VAL_FRACTION))
    splits = {"val": order[:num_val], "train": order[num_val:]}
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}-", dir=parent)
    try:
        for split, indices in splits.items():
            for index in indices:
                label = int(digits.target[index])
                folder = os.path.join(staging, split, f"{label}")
                os.makedirs(folder, exist_ok=True)
                pixels = np.rot90(255 - images[index]) if shift else images[index]
                image = Image.fromarray(np.ascontiguousarray(pixels), mode="L").resize((size, size), Image.BILINEAR)
                image = image.convert("RGB")
                if shift:  # a blue tint: the red and green channels at 60 %
                    rgb = np.asarray(image).astype(np.float32) * np.array([0.6, 0.6, 1.0], np.float32)
                    image = Image.fromarray(rgb.round().astype(np.uint8))
                image.save(os.path.join(folder, f"{index:04d}.png"))
        with open(os.path.join(staging, DONE_FILE), "w") as handle:
            handle.write(stamp)
        if _complete(out, stamp):  # another process finished first
            return out
        if os.path.lexists(out):  # an older build: another size, or from before builds were staged
            shutil.rmtree(out)
        try:
            os.rename(staging, out)
        except OSError:
            if not _complete(out, stamp):  # not a process that won the same race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits", help="folder to write (default: data/digits)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    parser.add_argument("--shift", action="store_true",
                        help="the transfer task: digits turned a quarter, colours inverted, blue tint")
    args = parser.parse_args()
    path = build_digits(args.out, args.size, args.shift)
    counts = {split: sum(len(files) for _, _, files in os.walk(os.path.join(path, split)))
              for split in ("train", "val")}
    print(f"digits data in {path}: {counts['train']} train and {counts['val']} val images, {args.size} px")


if __name__ == "__main__":
    main()
