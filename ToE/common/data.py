"""The input pipeline of the classification trainers: ImageNet-layout folders
(``<root>/{train,val}/<class>/<image>``) checked with clear errors, their transforms, and the epoch's
loader (with the skip of a mid-epoch resume).

Three ways a data folder can train or evaluate wrongly without failing are closed here:

* train/ and val/ with different class folders: two independent ``ImageFolder`` would number
  the classes of each split on its own, so one class missing in val shifts the labels of all
  the classes after it. :func:`train_val_folders` refuses the mismatch and numbers both splits
  from the one class list of train/.
* images whose pixels are not 8-bit: ``Image.convert("RGB")`` clips a 16-bit value to 255
  instead of scaling it, so a 16-bit PNG turns almost white. :func:`load_rgb` scales 16-bit
  images to 8 bits and refuses, by name, the modes whose range it cannot know.
* a corrupt validation image: found only by the first evaluation, after a whole training epoch.
  :func:`check_images` decodes every image of a split up front, in parallel, with the decoder the
  run will use: PIL for the torch path, DALI's decoder for ``--data-backend dali`` (PIL reads
  formats DALI does not, such as GIF, and the two libraries differ on damaged files).

The transforms: timm's ``create_transform`` with the posterize fault fixed.


Upstream fault (timm 1.0.31 with Pillow 13.0.0, the versions this was written against): timm's
``PosterizeIncreasing`` maps a level to ``bits = 4 - int(level / 10 * 4)``, and the default DeiT
policy ``rand-m9-mstd0.5-inc1`` draws the level from N(9, 0.5) clipped to [0, 10], so about 2.3 %
of posterize draws ask for 0 bits (about 0.15 % of images: 2 ops of 15, each applied with p 0.5).
``timm.data.auto_augment.posterize`` passes 0 to ``PIL.ImageOps.posterize``, which in current Pillow
raises ``ValueError: bits must be between or equal to 1 and 8``; older Pillow accepted 0 and
masked every bit away (``~(2**8 - 1)`` keeps none), giving an all-black image. That black image
is what the published recipe trained with, so 0 bits keeps that meaning here. The plain
``Posterize`` level (``int(level / 10 * 4)``) reaches 0 too, at levels below 2.5, and the AutoAugment
``v0`` policy asks for it outright, so every posterize op is fixed, not only the increasing one.

The fix is scoped: the posterize ops of the RandAugment/AutoAugment/AugMix object that
``create_transform`` built are pointed at :func:`posterize` below; timm's module globals are not
touched, so other users of timm in the same process see timm unchanged.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_aa
from timm.data import create_transform
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.datasets.folder import find_classes

from .errors import LocalError, UserError

# Modes with 16-bit unsigned pixels: 16-bit grayscale PNGs open as "I;16" in current Pillow,
# 16-bit TIFFs as "I;16" or "I;16B".
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Pillow decodes these (16-bit RGB/RGBA PNGs included, which it scales itself) to 8-bit bands
# that ``convert("RGB")`` maps correctly.
_CONVERTIBLE_MODES = ("1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
# What Pillow raises for a file it cannot decode: OSError (truncated, broken stream, unknown
# format), ValueError, SyntaxError (some plugins, for broken chunks), and the bomb check.
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# How many failing files a one-line error names before it counts the rest.
_NAMED = 3


class _Unreadable(Exception):
    """An image that cannot be read as RGB: what is wrong and the fix (kept apart for the val check's message)."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem, fix)
        self.problem, self.fix = problem, fix


def _uint16_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit gray to 8-bit RGB with the full range kept: value v becomes round(v / 257)."""
    pixels = np.asarray(image).astype(np.uint32)  # "I;16B" arrives big-endian; astype makes it native
    gray = ((pixels + 128) // 257).astype(np.uint8)  # 65535 -> 255, 257 k -> k exactly
    return Image.fromarray(gray, mode="L").convert("RGB")


def _read_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            mode = image.mode
            if mode in _UINT16_MODES or (mode == "I" and image.format == "PNG"):
                return _uint16_to_rgb(image)
            if mode not in _CONVERTIBLE_MODES:
                raise _Unreadable(f"image {path} has mode {mode} ({_describe_mode(mode)}), whose range of values "
                                  "is unknown, so it cannot be read as 8-bit RGB",
                                  "Convert it to 8-bit RGB (e.g. PNG or JPEG) or remove it")
            return image.convert("RGB")
    except _READ_ERRORS as error:
        raise _Unreadable(f"cannot read image {path} ({error.__class__.__name__}: {error})",
                          "Remove or replace that file") from None


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` to an 8-bit RGB image; one that cannot be read right is a UserError naming it.

    8-bit modes (and what Pillow already decodes to 8 bits) go through ``convert("RGB")``.
    16-bit gray is scaled (v -> v / 257), as is mode "I" from a PNG (older Pillow opens 16-bit
    gray PNGs as "I"; a PNG holds at most 16 bits). "I" from other formats (32-bit integers) and
    "F" (32-bit floats) have no known range, so they are refused by name, not clipped.
    """
    try:
        return _read_rgb(path)
    except _Unreadable as error:
        # met by the process whose shard holds the file: the others cannot tell it
        raise LocalError(f"{error.problem}. {error.fix}") from None


def _describe_mode(mode: str) -> str:
    return {"I": "32-bit integer pixels", "F": "32-bit float pixels"}.get(mode, "not an 8-bit or 16-bit image")


class _ClassFolder(datasets.ImageFolder):
    """``ImageFolder`` whose classes (and so labels) come from ``classes`` when given, not from its own folder."""

    def __init__(self, root: str, transform, classes: Optional[Sequence[str]] = None) -> None:
        self._given_classes = None if classes is None else list(classes)
        super().__init__(root, transform=transform, loader=load_rgb)

    def find_classes(self, directory: str) -> Tuple[List[str], dict]:
        if self._given_classes is None:
            return super().find_classes(directory)
        return list(self._given_classes), {name: index for index, name in enumerate(self._given_classes)}


def _split_folder(root: str, split: str) -> str:
    """``root/split``, checked to exist and to hold class folders."""
    if not os.path.isdir(root):
        raise UserError(f"data path {root} does not exist. Pass --data-path with the folder that holds "
                        "train/ and val/ (build the embedded digits with: python -m ToE.common.digits)")
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is missing. The data path must hold train/<class>/ and val/<class>/ folders")
    if not any(entry.is_dir() for entry in os.scandir(folder)):
        raise UserError(f"{folder} has no class folders. Put the images of each class in {folder}/<class>/")
    return folder


def image_folder(root: str, split: str, transform=None,
                 classes: Optional[Sequence[str]] = None) -> datasets.ImageFolder:
    """``ImageFolder`` on ``root/split`` with user errors for bad layouts.

    With ``classes`` the labels are the positions in that list (pass train's classes for val);
    without, the sorted class folders of ``root/split`` itself.
    """
    folder = _split_folder(root, split)
    try:
        return _ClassFolder(folder, transform, classes)
    except FileNotFoundError as error:
        raise UserError(f"{folder} holds no images ({error}). Every split needs images in its class folders") from None


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_NAMED])
    return shown if len(items) <= _NAMED else f"{shown} and {len(items) - _NAMED} more"


def train_val_folders(root: str, train_transform=None, eval_transform=None
                      ) -> Tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """The train and val ``ImageFolder`` of ``root``, labelled from one class list (train's).

    The class folders of val/ must be those of train/: a mismatch is a UserError naming the
    classes missing in val and the extra ones, before anything is trained.
    """
    train_folder, val_folder = _split_folder(root, "train"), _split_folder(root, "val")
    train_classes, _ = find_classes(train_folder)
    val_classes, _ = find_classes(val_folder)
    if train_classes != val_classes:
        missing = sorted(set(train_classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(train_classes))
        differences = ([f"missing in val: {_names(missing)}"] if missing else []) + \
                      ([f"extra in val: {_names(extra)}"] if extra else [])
        raise UserError(f"the class folders of {train_folder} and {val_folder} differ ({'; '.join(differences)}). "
                        "Give val/ exactly the class folders of train/, or labels would not match")
    train_set = image_folder(root, "train", train_transform)
    val_set = image_folder(root, "val", eval_transform, classes=train_set.classes)
    return train_set, val_set


def unreadable(path: str) -> Optional[Tuple[str, str, str]]:
    """(path, problem, fix) when ``load_rgb`` cannot read ``path`` as 8-bit RGB, else None."""
    try:
        _read_rgb(path)
    except _Unreadable as error:
        return path, error.problem, error.fix
    return None


def _read_batch(paths: List[str]) -> List[Tuple[str, str, str]]:
    """DataLoader ``collate_fn``: decode each path (in the worker); return (path, problem, fix) of the bad ones."""
    return [problem for problem in map(unreadable, paths) if problem is not None]


def check_images(dataset: datasets.ImageFolder, split: str, indices: Optional[Sequence[int]] = None,
                 num_workers: int = 0, batch_size: int = 64, decoder: Optional[Callable] = None) -> None:
    """Decode the images of ``dataset`` (those at ``indices``, default all) with the training loader.

    Runs in ``num_workers`` DataLoader workers, ``batch_size`` file paths per task, and reads
    every image once (no transform). Any image the loader could not read is a UserError that
    names it (and counts the others), so a bad file fails the set-up, not an evaluation.
    ``decoder(paths, threads=, batch=)``: the run's own decoder when it is not PIL, returning the
    (path, problem, fix) of the images it cannot decode (``--data-backend dali``:
    ``ToE.common.dali.undecodable`` on the run's device; one decode per image too; on a GPU, nvJPEG).
    """
    paths = [path for path, _ in dataset.samples]
    if indices is not None:
        paths = [paths[index] for index in indices]
    if decoder is not None:
        problems = decoder(paths, threads=num_workers, batch=batch_size)
    else:
        loader = DataLoader(paths, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=_read_batch, persistent_workers=False)
        problems = [problem for batch in loader for problem in batch]
    if not problems:
        return
    _, problem, fix = problems[0]
    if len(problems) == 1:
        raise LocalError(f"{split} image check: {problem}. {fix}")
    others = _names([path for path, _, _ in problems[1:]])
    raise LocalError(f"{split} image check: {len(problems)} of {len(paths)} images cannot be read, first: {problem}; "
                    f"also {others}. {fix}; the same for the others")


# -- transforms ----------------------------------------------------------------------------------
# --aa values that turn AutoAugment off.
NO_AUTO_AUGMENT = ("", "none")


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits of each channel; 0 bits gives a black image.

    Same signature as ``timm.data.auto_augment.posterize`` (extra keyword arguments such as
    ``fillcolor`` are ignored). 1 to 7 bits go to Pillow unchanged; 8 or more are the identity,
    as in timm; 0 (or less) zeroes every bit, as Pillow did before it started refusing 0.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep >= 1:
        return ImageOps.posterize(img, bits_to_keep)
    return img.point(lambda _: 0)


def _augment_ops(transform) -> Iterator[timm_aa.AugmentOp]:
    """Every timm ``AugmentOp`` inside ``transform`` (a Compose, RandAugment, AutoAugment, AugMix)."""
    for child in getattr(transform, "transforms", None) or ():  # torchvision Compose
        yield from _augment_ops(child)
    for op in getattr(transform, "ops", None) or ():  # RandAugment, AugMixAugment
        if isinstance(op, timm_aa.AugmentOp):
            yield op
    for sub_policy in getattr(transform, "policy", None) or ():  # AutoAugment
        for op in sub_policy:
            if isinstance(op, timm_aa.AugmentOp):
                yield op


def fix_posterize(transform):
    """Point the posterize ops inside ``transform`` at :func:`posterize`; return ``transform``."""
    for op in _augment_ops(transform):
        if op.aug_fn is timm_aa.posterize:
            op.aug_fn = posterize
    return transform


def build_train_transform(input_size, *, auto_augment: Optional[str] = None, **kwargs):
    """``timm.data.create_transform(input_size, is_training=True, ...)`` with :func:`posterize` in it.

    ``auto_augment`` is the ``--aa`` string; ``""`` and ``"none"`` turn it off. Other keyword
    arguments go to ``create_transform`` unchanged. A policy string timm cannot parse is a
    :class:`UserError` naming it.
    """
    policy = None if auto_augment in NO_AUTO_AUGMENT else auto_augment
    try:
        transform = create_transform(input_size, is_training=True, auto_augment=policy, **kwargs)
    except (AssertionError, KeyError, ValueError) as error:
        if policy is None:
            raise
        raise UserError(f"--aa {policy!r} is not a timm augmentation policy ({error!r}). "
                        "Pass e.g. rand-m9-mstd0.5-inc1 (the DeiT default), or none") from None
    return fix_posterize(transform)


def build_eval_transform(input_size, **kwargs):
    """``timm.data.create_transform(input_size, is_training=False, ...)``: resize, centre crop, normalise."""
    return create_transform(input_size, is_training=False, **kwargs)


# -- the epoch's loader ------------------------------------------------------------------------
class SkipFirst(torch.utils.data.Sampler):
    """``sampler``'s order for the current epoch without its first ``count`` indices (mid-epoch resume)."""

    def __init__(self, sampler, count: int) -> None:
        self.sampler, self.count = sampler, count

    def __iter__(self):
        return iter(list(self.sampler)[self.count:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.count)


def epoch_loader(dataset, sampler, epoch: int, plan: Any, skip: int, **kwargs) -> torch.utils.data.DataLoader:
    """The training loader of ``epoch``: ``sampler``'s order for that epoch without its first ``skip``
    batches (a mid-epoch resume; they are not read), in the plan's batches, the last partial one dropped."""
    sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=plan.batch, drop_last=True,
                                       sampler=SkipFirst(sampler, skip * plan.batch) if skip else sampler, **kwargs)
