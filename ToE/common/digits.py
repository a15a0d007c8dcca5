"""The embedded data set: scikit-learn's 1,797 real handwritten digits as an ImageNet-layout folder.

    python -m ToE.common.digits --out data/digits --size 32

writes ``train/<class>/*.png`` and ``val/<class>/*.png`` (10 classes, a fixed seeded split,
grayscale 8x8 digits upscaled to ``size`` and stored as RGB), so the trainers read it with exactly
the folder-loading code they use for ImageNet. Nothing is downloaded: the digits ship with
scikit-learn. Writing is idempotent: a complete folder is left alone, an older build of it (another
size) is replaced, and a folder it did not write is refused, untouched.

    python -m ToE.common.digits --out data/digits-shift --size 32 --shift

writes the same digits under a fixed shift the demo never sees: turned a quarter to the left and
in inverted colours (dark digits on a light ground), with a blue tint. A transfer task for
fine-tuning a model pretrained on the plain digits (python -m bench.finetune; docs/finetuning.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from typing import Callable, Optional

import numpy as np

from .errors import UserError, run_main

VAL_FRACTION = 0.165  # 297 of 1,797 images held out
SPLIT_SEED = 0
DONE_FILE = ".complete"


def _stamp(out: str) -> Optional[str]:
    """The stamp a builder left in ``out`` (None: no stamp, so not a finished build of ours)."""
    try:
        with open(os.path.join(out, DONE_FILE)) as handle:
            return handle.read().strip()
    except OSError:
        return None


def build_folder(out: str, stamp: str, ours: Callable[[str], bool], write: Callable[[str], None],
                 builder: str) -> str:
    """Build a data folder at ``out`` with ``write(folder)`` unless it already holds this build; return ``out``.

    Shared by the embedded data sets' builders (``builder`` names the command in messages). A
    folder stamped ``stamp`` is left alone (writing is idempotent). Anything else already at
    ``out`` is replaced only when it is an older build of the same builder (its stamp passes
    ``ours``: another size, another version) or an empty folder; a folder of anything else (the
    user's photos, a real data set) is refused in one line, untouched. The files are written into
    a temporary sibling folder that is then renamed to ``out``, so an interrupted build leaves no
    half-written folder and processes building at once (test workers, the ranks of a run) never
    read one another's partial files."""
    if _stamp(out) == stamp:
        return out
    _check_replaceable(out, ours, builder)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}-", dir=parent)
    try:
        write(staging)
        with open(os.path.join(staging, DONE_FILE), "w") as handle:
            handle.write(stamp)
        if _stamp(out) == stamp:  # another process finished first
            return out
        if os.path.lexists(out):
            _check_replaceable(out, ours, builder)  # (again: it may have appeared while this build wrote)
            if os.listdir(out):
                shutil.rmtree(out)
            else:
                os.rmdir(out)
        try:
            os.rename(staging, out)
        except OSError:
            if _stamp(out) != stamp:  # not a process that won the same race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_replaceable(out: str, ours: Callable[[str], bool], builder: str) -> None:
    """A UserError unless ``out`` is free, an empty folder, or an older build of ``builder``."""
    if not os.path.lexists(out):
        return
    if os.path.islink(out) or not os.path.isdir(out):
        what = "a link" if os.path.islink(out) else "a file"
    elif not os.listdir(out):
        return
    else:
        stamp = _stamp(out)
        if stamp is not None and ours(stamp):
            return
        mark = f"no {DONE_FILE} stamp" if stamp is None else f"its {DONE_FILE} stamp is another builder's: {stamp!r}"
        what = f"a folder that {builder} did not write ({mark})"
    raise UserError(f"{out} exists and is {what}: it is left alone. Build into another folder (--out), or delete "
                    f"{out} yourself to build there")


def build_digits(out: str, size: int = 32, shift: bool = False) -> str:
    """Write the digits folder under ``out`` (if not already complete); return ``out``.

    An older digits folder (another size, shifted or not) there is replaced; anything else is
    refused (``build_folder``)."""
    def write(staging: str) -> None:
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
                folder = os.path.join(staging, split, f"{label}")
                os.makedirs(folder, exist_ok=True)
                pixels = np.rot90(255 - images[index]) if shift else images[index]
                image = Image.fromarray(np.ascontiguousarray(pixels), mode="L").resize((size, size), Image.BILINEAR)
                image = image.convert("RGB")
                if shift:  # a blue tint: the red and green channels at 60 %
                    rgb = np.asarray(image).astype(np.float32) * np.array([0.6, 0.6, 1.0], np.float32)
                    image = Image.fromarray(rgb.round().astype(np.uint8))
                image.save(os.path.join(folder, f"{index:04d}.png"))

    if size < 1:
        raise UserError(f"--size {size} is not a positive image side. Pass --size 32 (the demo's) or another "
                        "positive number of pixels")
    stamp = f"{size} shift" if shift else str(size)
    return build_folder(out, stamp, lambda old: re.fullmatch(r"\d+( shift)?", old) is not None, write,
                        "ToE.common.digits")


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
    run_main(main)
