"""Token-label data: the published file format, the training set that reads it, the label-aware
transforms and the per-batch target builder (roi_align).

File format (published, unchanged): one file per training image at ``<label_root>/<class>/<stem>.pt``
(``stem``: the file name up to its first '.'), holding one fp16 tensor (2, 5, Hm, Wm): [0] the
teacher's top-5 logits at every map position (descending), [1] their class indices (exact in fp16
below 2048 classes).

A training sample is ``(image (3, S, S), (label, map (2, 5, Hm, Wm) float32, box (4,)))``: ``box``
is the random-resized crop as fractions of the (flipped, augmented) image, ``(top, left, h, w)``.
``TokenLabelTargets`` (the trainer's per-batch "mixup" function) turns that into the dense target
(B, C, 2 + N): [smoothed ground truth, class-token target, N = G*G patch-token targets, row-major].
"""

from __future__ import annotations

import math
import os
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data import auto_augment as timm_aa
from torchvision import transforms as T
from torchvision.ops import roi_align
from torchvision.transforms import functional as TF

from ToE.common.errors import LocalError, UserError
from ToE.common.data import NO_AUTO_AUGMENT, fix_posterize

TOP_K = 5
# RandAugment ops that move pixels: the label map is warped with them (the others only recolour).
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "TranslateX", "TranslateY")


# ---------------------------------------------------------------------------------------------
# The file format
# ---------------------------------------------------------------------------------------------
def label_path(label_root: str, image_path: str) -> str:
    """``<label_root>/<class>/<stem>.pt`` for ``.../<class>/<stem>.<ext>``."""
    class_dir = os.path.basename(os.path.dirname(image_path))
    stem = os.path.basename(image_path).split(".")[0]
    return os.path.join(label_root, class_dir, f"{stem}.pt")


def encode_label_map(logits: torch.Tensor) -> torch.Tensor:
    """Dense logits (C, Hm, Wm) -> the published fp16 (2, 5, Hm, Wm): top-5 values and indices."""
    values, indices = logits.float().topk(min(TOP_K, logits.shape[0]), dim=0)
    if values.shape[0] < TOP_K:  # fewer than 5 classes: repeat the last pair (it scatters to the same class)
        pad = TOP_K - values.shape[0]
        values = torch.cat([values, values[-1:].expand(pad, -1, -1)])
        indices = torch.cat([indices, indices[-1:].expand(pad, -1, -1)])
    return torch.stack([values, indices.float()]).half()


def save_label_map(path: str, logits: torch.Tensor) -> None:
    """Write ``encode_label_map(logits)`` to ``path`` (parent folders created; atomic rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp"
    torch.save(encode_label_map(logits), temporary)
    os.replace(temporary, path)


def load_label_map(path: str, num_classes: Optional[int] = None) -> torch.Tensor:
    """Read one label file as float32 (2, 5, Hm, Wm); a missing or malformed file is a one-line error."""
    if not os.path.isfile(path):
        raise LocalError(f"token-label file {path} is missing. Generate the labels for this data set with "
                         "python -m ToE.lvvit.generate_label (or point --token-label-data at the right folder)")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise LocalError(f"token-label file {path} is unreadable ({error.__class__.__name__}). "
                         "Regenerate it with python -m ToE.lvvit.generate_label") from None
    if not torch.is_tensor(value) or value.dim() != 4 or tuple(value.shape[:2]) != (2, TOP_K) \
            or value.dtype != torch.float16:
        what = f"{value.dtype} {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
        raise LocalError(f"token-label file {path} holds {what}, not a float16 (2, 5, H, W) tensor. Regenerate it "
                         "with python -m ToE.lvvit.generate_label")
    value = value.float()
    if num_classes is not None:
        indices = value[1]
        if (indices < 0).any() or (indices >= num_classes).any() or (indices != indices.round()).any():
            raise LocalError(f"token-label file {path} has class indices outside 0..{num_classes - 1}. It was made "
                             "for other classes: regenerate it for this data set")
    return value


# ---------------------------------------------------------------------------------------------
# Label-aware transforms: (PIL image, map (2, 5, Hm, Wm)) -> (image, map[, box])
# ---------------------------------------------------------------------------------------------
def _warp_map(label_map: torch.Tensor, op_name: str, level_args: tuple) -> torch.Tensor:
    """Apply the geometric RandAugment op ``op_name`` to every plane of the map (nearest, fill 0)."""
    planes = label_map.reshape(-1, *label_map.shape[-2:]).numpy()
    warped = []
    for plane in planes:
        image = Image.fromarray(plane.astype(np.float32), mode="F")
        image = timm_aa.NAME_TO_OP[op_name](image, *level_args, fillcolor=0, resample=Image.NEAREST)
        warped.append(np.asarray(image, dtype=np.float32))
    return torch.from_numpy(np.stack(warped)).reshape(label_map.shape)


class LabelRandAugment:
    """timm's RandAugment (``--aa rand-...``) whose geometric ops warp the label map too.

    timm's own transform draws and applies the ops (count, probability, magnitude noise: all
    timm's); each op's ``aug_fn`` is wrapped to note the level arguments it was called with, and
    Rotate, Shear and Translate then move the map the same way (in map units: the map is square),
    so every map cell stays with the image content it labels. Wrapping the public ``aug_fn`` of
    each op, instead of copying timm's drawing code, keeps the draws timm's in every release.
    """

    def __init__(self, policy: str, img_size: int) -> None:
        hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(round(255 * m) for m in
                                                                           IMAGENET_DEFAULT_MEAN))
        self.augment = fix_posterize(timm_aa.rand_augment_transform(policy, hparams))
        self.applied: List[Tuple[str, tuple]] = []  # the geometric ops of the current call, in order
        for op in self.augment.ops:
            if op.name in GEOMETRIC_OPS:
                op.aug_fn = self._noting(op.name, op.aug_fn)

    def _noting(self, name: str, aug_fn):
        def apply(image, *level_args, **kwargs):
            self.applied.append((name, level_args))
            return aug_fn(image, *level_args, **kwargs)
        return apply

    def __call__(self, image: Image.Image, label_map: torch.Tensor) -> Tuple[Image.Image, torch.Tensor]:
        self.applied = []
        image = self.augment(image)
        for name, level_args in self.applied:
            label_map = _warp_map(label_map, name, level_args)
        return image, label_map


class TokenLabelTransform:
    """The training transform with labels: hflip (map mirrored), labelled RandAugment, then
    RandomResizedCrop whose box (top, left, h, w as fractions) is returned for roi_align; the map
    itself is not cropped. Then ToTensor + normalise + random erasing (on the image only)."""

    def __init__(self, img_size: int, scale: Sequence[float] = (0.08, 1.0), hflip: float = 0.5,
                 auto_augment: str = "rand-m9-mstd0.5-inc1", interpolation: str = "bicubic",
                 re_prob: float = 0.25, re_mode: str = "pixel", re_count: int = 1) -> None:
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms import str_to_interp_mode

        self.img_size = img_size
        self.scale = tuple(scale)
        self.hflip = hflip
        self.augment = None if auto_augment in NO_AUTO_AUGMENT else LabelRandAugment(auto_augment, img_size)
        self.interpolations = ([str_to_interp_mode("bilinear"), str_to_interp_mode("bicubic")]
                               if interpolation == "random" else [str_to_interp_mode(interpolation)])
        self.normalize = T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device="cpu") if re_prob > 0 else None

    def __call__(self, image: Image.Image, label_map: torch.Tensor):
        if self.hflip > 0 and random.random() < self.hflip:
            image, label_map = TF.hflip(image), label_map.flip(3)
        if self.augment is not None:
            image, label_map = self.augment(image, label_map)
        width, height = image.size
        top, left, h, w = T.RandomResizedCrop.get_params(image, self.scale, (3.0 / 4.0, 4.0 / 3.0))
        image = TF.resized_crop(image, top, left, h, w, [self.img_size, self.img_size],
                                random.choice(self.interpolations))
        box = torch.tensor([top / height, left / width, h / height, w / width], dtype=torch.float32)
        tensor = self.normalize(TF.to_tensor(image))
        if self.erase is not None:
            tensor = self.erase(tensor)
        return tensor, label_map, box


class TokenLabelDataset(torch.utils.data.Dataset):
    """The train split (an ImageFolder) with one label file per image; (image, (label, map, box))."""

    def __init__(self, images, label_root: str, transform: TokenLabelTransform) -> None:
        self.images = images
        self.label_root = label_root
        self.transform = transform
        self.classes = images.classes
        self.samples = images.samples

    def __len__(self) -> int:
        return len(self.images.samples)

    def __getitem__(self, index: int):
        path, target = self.images.samples[index]
        image = self.images.loader(path)
        label_map = load_label_map(label_path(self.label_root, path), len(self.classes))
        tensor, label_map, box = self.transform(image, label_map)
        return tensor, (target, label_map, box)


def label_paths(images) -> dict:
    """The label file of every train image (``label_path`` of each); two images whose names share
    the stem (``img.0.png``, ``img.1.png``) would share one file, which is refused by name."""
    wanted = {}
    for path, _ in images.samples:
        target = label_path("", path)
        if target in wanted:
            raise UserError(f"images {wanted[target]} and {path} share the token-label file name "
                            f"{os.path.basename(target)} (the published format names it by the file name up to its "
                            "first '.'). Rename one of them")
        wanted[target] = path
    return wanted


def check_label_folder(images, label_root: str, token_label_size: int, grid: int,
                       shard: Sequence[int] = ()) -> Tuple[int, int]:
    """Before training: every train image has its own label file, and every file of this process's
    ``shard`` (indices into ``images.samples``; all when empty) reads as the format with one map size.

    Returns the map size (Hm, Wm). Raises a UserError naming the first missing file (and the count),
    two images that would share a file, or a ``--token-label-size`` that is not the model's patch
    grid; a LocalError naming a file of the shard that is unreadable or of another size.
    """
    if token_label_size != grid:
        raise UserError(f"--token-label-size {token_label_size} does not match the model's patch grid "
                        f"({grid} x {grid}). Pass --token-label-size {grid}")
    if not os.path.isdir(label_root):
        raise UserError(f"token-label folder {label_root} does not exist. Generate it with python -m "
                        f"ToE.lvvit.generate_label --out {label_root}, or fix --token-label-data")
    label_paths(images)
    listed = {}
    missing = []
    for path, _ in images.samples:
        wanted = label_path(label_root, path)
        folder = os.path.dirname(wanted)
        if folder not in listed:
            listed[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if os.path.basename(wanted) not in listed[folder]:
            missing.append(wanted)
    if missing:
        more = f" (and {len(missing) - 1} more of {len(images.samples)})" if len(missing) > 1 else ""
        raise UserError(f"token-label file {missing[0]} is missing{more}. Generate the labels for this data with "
                        "python -m ToE.lvvit.generate_label, or fix --token-label-data")
    try:
        first = load_label_map(label_path(label_root, images.samples[0][0]), len(images.classes))
    except LocalError as error:
        raise UserError(str(error)) from None
    size = tuple(first.shape[2:])
    indices = shard or range(len(images.samples))
    for index in tqdm(indices, desc="token labels", disable=None if len(indices) > 10_000 else True, leave=False):
        path = label_path(label_root, images.samples[index][0])
        shape = tuple(load_label_map(path, len(images.classes)).shape[2:])
        if shape != size:
            raise LocalError(f"token-label file {path} holds a {shape[0]} x {shape[1]} map, the others "
                             f"{size[0]} x {size[1]}. Regenerate the labels of this data set with one teacher and "
                             "--img-size (python -m ToE.lvvit.generate_label)")
    return int(size[0]), int(size[1])


# ---------------------------------------------------------------------------------------------
# Per-batch targets
# ---------------------------------------------------------------------------------------------
def dense_logits(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 2, 5, Hm, Wm) top-5 map -> (B, C, Hm, Wm) logits; classes outside the top 5 get 0 (published)."""
    batch, _, _, height, width = label_map.shape
    full = label_map.new_zeros(batch, num_classes, height, width)
    return full.scatter(1, label_map[:, 1].long(), label_map[:, 0])


def crop_boxes(boxes: torch.Tensor, map_size: Tuple[int, int], legacy: bool = False) -> torch.Tensor:
    """(B, 4) crops (top, left, h, w) as fractions -> roi_align boxes (B, 5) [index, x1, y1, x2, y2] in
    map cells (pixel centres at integers, so a full crop samples the map at its own cells).

    ``legacy``: the published coordinates, which pass (top, left, bottom, right) as (x1, y1, x2, y2)
    (rows and columns swapped; exact only for crops with top == left and h == w).
    """
    height, width = map_size
    top, left, h, w = boxes.unbind(1)
    if legacy:  # published: every coordinate scaled by the map width, in (y, x) order
        coords = [top * width, left * width, (top + h) * width, (left + w) * width]
    else:
        coords = [left * width, top * height, (left + w) * width, (top + h) * height]
    index = torch.arange(boxes.shape[0], dtype=boxes.dtype, device=boxes.device)
    return torch.stack([index] + [c - 0.5 for c in coords], dim=1)


def smooth(target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Published smoothing t * (1 - s + s/C) + s/C over dim 1 (rows sum to 1 + s/C for a softmax t)."""
    num_classes = target.shape[1]
    return target * (1.0 - smoothing + smoothing / num_classes) + smoothing / num_classes


class TokenLabelTargets:
    """The trainer's per-batch target function: ``(images, targets) -> (images, dense target)``.

    ``targets`` is ``(labels (B,), maps (B, 2, 5, Hm, Wm), boxes (B, 4))`` with label data, or the
    labels (B,) alone without. Output (B, C, 2 + G*G): [smoothed one-hot ground truth, softmax of the
    whole crop (class token), softmax of each of the G x G crop cells (patch tokens)], each smoothed;
    without label data the smoothed one-hot (B, C). Mixup/CutMix (``mixup``/``cutmix`` alphas) mix
    the images with their batch mirror and every target channel linearly, as published.
    """

    def __init__(self, num_classes: int, grid: int, smoothing: float = 0.1, legacy_coords: bool = False,
                 mixup: float = 0.0, cutmix: float = 0.0) -> None:
        self.num_classes = num_classes
        self.grid = grid
        self.smoothing = smoothing
        self.legacy_coords = legacy_coords
        self.mixup = mixup
        self.cutmix = cutmix

    def dense(self, label_map: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B, C, 1 + G*G): the softmax of the crop's pooled logits, the whole crop then each cell."""
        logits = dense_logits(label_map, self.num_classes)                     # (B, C, Hm, Wm)
        rois = crop_boxes(boxes.to(logits.dtype), tuple(logits.shape[-2:]), self.legacy_coords)
        cells = roi_align(logits, rois, output_size=self.grid, spatial_scale=1.0, sampling_ratio=-1, aligned=False)
        whole = roi_align(logits, rois, output_size=1, spatial_scale=1.0, sampling_ratio=-1, aligned=False)
        pooled = torch.cat([whole.flatten(2), cells.flatten(2)], dim=2)       # (B, C, 1 + G*G)
        return pooled.softmax(dim=1)

    def __call__(self, images: torch.Tensor, targets):
        if isinstance(targets, (tuple, list)):
            labels, label_map, boxes = targets
        else:
            labels, label_map, boxes = targets, None, None
        one_hot = F.one_hot(labels.long(), self.num_classes).to(torch.float32)
        if label_map is None:
            target = smooth(one_hot, self.smoothing)                          # (B, C)
        else:
            target = torch.cat([one_hot[:, :, None], self.dense(label_map.float(), boxes)], dim=2)
            target = smooth(target, self.smoothing)                            # (B, C, 2 + G*G)
        if self.mixup > 0 or self.cutmix > 0:
            images, target = self._mix(images, target)
        return images, target

    def _mix(self, images: torch.Tensor, target: torch.Tensor):
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or np.random.rand() < 0.5)
        lam = float(np.random.beta(self.cutmix, self.cutmix) if use_cutmix else np.random.beta(self.mixup, self.mixup))
        if use_cutmix:
            height, width = images.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            cut_h, cut_w = int(height * cut), int(width * cut)
            cy, cx = np.random.randint(height), np.random.randint(width)
            y1, y2 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
            x1, x2 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
            images = images.clone()
            images[:, :, y1:y2, x1:x2] = images.flip(0)[:, :, y1:y2, x1:x2]
            lam = 1.0 - (y2 - y1) * (x2 - x1) / float(height * width)
        else:
            images = images * lam + images.flip(0) * (1.0 - lam)
        return images, target * lam + target.flip(0) * (1.0 - lam)
