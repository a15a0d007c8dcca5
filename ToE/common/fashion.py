"""Fashion-MNIST as an ImageNet-layout folder: 70,000 real 28 x 28 clothing photos in 10 classes.

    apt-get install dataset-fashion-mnist                   # Debian/Ubuntu: Zalando's four IDX files
    python -m ToE.common.fashion --out data/fashion         # 60,000 train/, 10,000 val/ (the test set)
    python -m ToE.common.fashion --out data/fashion --source ~/data/FashionMNIST/raw   # torchvision's download

writes ``train/<class>/*.png`` (the 60,000 training images) and ``val/<class>/*.png`` (the
10,000 test images), 8-bit grayscale PNGs holding the IDX files' pixels unchanged (``--size N``
resizes them, bilinear; default 28, no resizing), so the trainers read them with the folder-loading
code they use for ImageNet (which turns them into RGB). Class folders are ``<label>_<name>``
(``0_tshirt_top`` .. ``9_ankle_boot``), so sorting them keeps Fashion-MNIST's label order; an
image's file name is its index in its IDX file.

The source is read without torchvision: the Debian package ``dataset-fashion-mnist`` (its files
are found with ``dpkg -L``, usually under /usr/share/datasets/fashion-mnist) or ``--source DIR``,
a folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not, as
Zalando ships them and torchvision's ``FashionMNIST/raw`` keeps them (``DIR/FashionMNIST/raw``
and ``DIR/raw`` are looked in too). Nothing is downloaded. Writing goes through
``ToE.common.digits.build_folder``: into a temporary sibling folder renamed at the end (an
interrupted build leaves nothing half-written), a finished build of the same size is left alone,
an older build of this builder is replaced, and any other folder at ``--out`` is refused untouched.
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
from typing import Dict, List, Optional, Tuple

import numpy as np

from .cifar import class_folders
from .digits import build_folder
from .errors import UserError, run_main

CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
PACKAGE = "dataset-fashion-mnist"
PACKAGE_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's package puts the files
# split -> (images file, labels file), without the optional .gz
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SPLIT_SIZES = {"train": 60000, "val": 10000}
VERSION = "1"  # of the written layout; a build stamped with another version is replaced
STAMP_PREFIX = "fashion-mnist "
# the IDX element types (the third byte of the magic number) and their big-endian numpy types
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_MISSING = (f"Install the Debian package ({PACKAGE}: apt-get install {PACKAGE}), or pass --source DIR, a folder "
            "holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and "
            "t10k-labels-idx1-ubyte[.gz] (Zalando's files, or torchvision's FashionMNIST/raw)")


def read_idx(path: str) -> np.ndarray:
    """The array in one IDX file (gzipped when its name ends in .gz); a damaged file is a UserError."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as handle:
            data = handle.read()
    except (OSError, EOFError) as error:  # gzip's BadGzipFile is an OSError
        raise UserError(f"{path} cannot be read ({error.__class__.__name__}: {error}). The file is damaged: "
                        "reinstall the package or download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES or data[3] == 0:
        raise UserError(f"{path} is not an IDX file (its first bytes are not an IDX magic number). Pass the "
                        "Fashion-MNIST IDX files, gzipped or not")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path} ends inside its header: the file is truncated. Reinstall or download it again")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise UserError(f"{path} holds {len(data)} bytes where its header {list(shape)} needs {expected}: the file "
                        "is truncated or damaged. Reinstall or download it again")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find_file(folder: str, name: str) -> Optional[str]:
    for candidate in (name, name + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def _holds_files(folder: str) -> bool:
    return all(_find_file(folder, name) is not None for pair in FILES.values() for name in pair)


def package_folder() -> Optional[str]:
    """The folder of the Debian package's IDX files, or None when the package is not installed."""
    if _holds_files(PACKAGE_DIR):
        return PACKAGE_DIR
    try:  # another prefix: ask dpkg where the package put its files
        listed = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listed.stdout.splitlines():
        if os.path.basename(line.strip()).startswith(FILES["train"][0]):
            folder = os.path.dirname(line.strip())
            if _holds_files(folder):
                return folder
    return None


def find_source(source: Optional[str] = None) -> str:
    """The folder holding the four IDX files: ``source`` (or its FashionMNIST/raw or raw), else the package's."""
    if source is None:
        folder = package_folder()
        if folder is None:
            raise UserError(f"Fashion-MNIST was not found: the Debian package is not installed (no IDX files in "
                            f"{PACKAGE_DIR}) and no --source was given. {_MISSING}")
        return folder
    if not os.path.isdir(source):
        raise UserError(f"--source {source} is not a folder. {_MISSING}")
    for folder in (source, os.path.join(source, "FashionMNIST", "raw"), os.path.join(source, "raw")):
        if _holds_files(folder):
            return folder
    missing = [name for pair in FILES.values() for name in pair if _find_file(source, name) is None]
    raise UserError(f"--source {source} lacks {', '.join(missing)} (gzipped or not). {_MISSING}")


def read_split(folder: str, split: str, limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W) uint8, labels (N,)) of ``split`` ("train" or "val") from the IDX files in
    ``folder``, checked: 3-D 8-bit images, one label in 0..9 per image, the split's full size. ``limit``
    (for tests) keeps the first images only and skips the size check."""
    images_name, labels_name = FILES[split]
    images_path, labels_path = _find_file(folder, images_name), _find_file(folder, labels_name)
    if images_path is None or labels_path is None:
        raise UserError(f"{folder} lacks {images_name if images_path is None else labels_name} (gzipped or not). "
                        f"{_MISSING}")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(f"{images_path} holds {images.dtype} values of shape {list(images.shape)}, not 8-bit images "
                        "(N x rows x columns). Pass the Fashion-MNIST image files")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise UserError(f"{labels_path} holds {list(labels.shape)} labels for the {images.shape[0]} images of "
                        f"{images_path}: the two files do not belong together. Reinstall or download them again")
    bad = labels[(labels < 0) | (labels >= len(CLASSES))]
    if bad.size:
        raise UserError(f"{labels_path} holds label {bad[0]}, outside the {len(CLASSES)} Fashion-MNIST classes. Pass "
                        "the Fashion-MNIST label files")
    if limit is not None:
        return images[:limit], labels[:limit]
    if images.shape[0] != SPLIT_SIZES[split]:
        raise UserError(f"{images_path} holds {images.shape[0]} images, not Fashion-MNIST's {SPLIT_SIZES[split]}: "
                        "another data set or a damaged file. Pass the Fashion-MNIST IDX files")
    return images, labels


def build_fashion(out: str, size: int = 28, source: Optional[str] = None,
                  limit: Optional[int] = None) -> Tuple[str, Dict[str, int]]:
    """Write the Fashion-MNIST folder at ``out`` (unless already complete); return (out, images per split).

    ``limit`` (tests only, not a flag) writes the first ``limit`` images of each split; such a build is
    stamped as partial, so it is replaced, never taken for the full set."""
    if size < 1:
        raise UserError(f"--size {size} is not a positive image side. Leave --size out (28, the originals) or pass "
                        "a positive number of pixels")
    folder = find_source(source)
    # read (and check) everything before the output folder is touched
    data = {split: read_split(folder, split, limit) for split in FILES}
    folders = class_folders(CLASSES)

    def write(staging: str) -> None:
        from PIL import Image

        for split, (images, labels) in data.items():
            for name in folders:
                os.makedirs(os.path.join(staging, split, name), exist_ok=True)
            for index, (pixels, label) in enumerate(zip(images, labels)):
                image = Image.fromarray(np.ascontiguousarray(pixels), mode="L")
                if image.size != (size, size):
                    image = image.resize((size, size), Image.BILINEAR)
                image.save(os.path.join(staging, split, folders[int(label)], f"{index:05d}.png"))

    stamp = f"{STAMP_PREFIX}{size} v{VERSION}" + ("" if limit is None else f" first {limit}")
    build_folder(out, stamp, lambda old: old.startswith(STAMP_PREFIX), write, "ToE.common.fashion")
    return out, {split: len(labels) for split, (_, labels) in data.items()}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ToE.common.fashion", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/fashion",
                        help="folder to write: train/<class>/*.png and val/<class>/*.png (default: data/fashion)")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels (default: 28, the originals)")
    parser.add_argument("--source", default=None,
                        help="folder of the four IDX files, gzipped or not (default: the Debian package "
                             f"{PACKAGE}'s, {PACKAGE_DIR})")
    args = parser.parse_args(argv)
    out, counts = build_fashion(args.out, args.size, args.source)
    print(f"Fashion-MNIST in {out}: {counts['train']} train and {counts['val']} val images, {args.size} px, "
          f"{len(CLASSES)} classes")


if __name__ == "__main__":
    run_main(main)
