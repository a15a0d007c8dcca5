"""The image transforms every trainer uses: timm's ``create_transform`` with the posterize fault fixed.

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

from typing import Iterator, Optional

from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data import auto_augment as timm_aa

from .errors import UserError

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
