"""COCO detection data: the folder layout, pycocotools annotations, YOLOS's multi-scale transforms
and the padding collation.

Layout: ``root/train2017/``, ``root/val2017/``, ``root/annotations/instances_{train,val}2017.json``.
A target is a dict: ``boxes`` (M, 4) float, ``labels`` (M,) int64 (COCO category ids), ``image_id``,
``area``, ``iscrowd``, ``orig_size`` (h, w) and ``size`` (h, w) of the transformed image. Boxes are
xyxy pixels while transforming and normalised (cx, cy, w, h) after ``Normalize``.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.ops import box_convert

from ToE.common.errors import LocalError, UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def split_paths(root: str, split: str) -> Tuple[str, str]:
    return os.path.join(root, f"{split}2017"), os.path.join(root, "annotations", f"instances_{split}2017.json")


def load_coco(annotation_file: str):
    """pycocotools COCO of ``annotation_file`` (quiet), its entries checked first (``check_entries``);
    a missing, damaged or malformed file is a UserError that names the entry and the fix."""
    import json

    from pycocotools.coco import COCO

    if not os.path.isfile(annotation_file):
        raise UserError(f"annotation file {annotation_file} does not exist. Pass --coco_path with the COCO "
                        "layout (train2017/, val2017/, annotations/instances_{train,val}2017.json)")
    try:
        with open(annotation_file) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise UserError(f"annotation file {annotation_file} is not COCO json ({error.__class__.__name__}: "
                        f"{error}). Restore the file") from None
    check_entries(data, annotation_file)
    # pycocotools >= 2.0.9 copies "info" into loaded results: a json without it could not be scored
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _entry_error(annotation_file: str, what: str, fix: str) -> UserError:
    return UserError(f"{annotation_file}: {what}. {fix}")


def check_entries(data, annotation_file: str) -> None:
    """The COCO entries training and pycocotools' scoring rely on, each refused by name.

    images: a unique integer ``id`` and a ``file_name``; categories: unique integer ids >= 0;
    annotations: a unique integer ``id`` >= 1 (pycocotools numbers detections from 1 and matches
    by id: ground-truth ids from 0, or repeated, score perfect detections wrongly), an
    ``image_id`` and ``category_id``, a ``bbox`` of 4 numbers with positive width and height, an
    ``area`` and ``iscrowd`` (COCOeval reads both).
    """
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise _entry_error(annotation_file, "has no 'images' list", "Pass a COCO instances json")
    seen = set()
    for image in data["images"]:
        if not isinstance(image, dict) or not isinstance(image.get("id"), int) or "file_name" not in image:
            raise _entry_error(annotation_file, f"image entry {image!r:.80} has no integer 'id' or no 'file_name'",
                               "Give every image an id and its file_name")
        if image["id"] in seen:
            raise _entry_error(annotation_file, f"image id {image['id']} appears twice", "Make the image ids unique")
        seen.add(image["id"])
    categories = data.get("categories") or []
    ids = [c.get("id") if isinstance(c, dict) else None for c in categories]
    if not ids:
        raise _entry_error(annotation_file, "declares no categories", "Add the 'categories' list")
    bad = [i for i in ids if not isinstance(i, int) or i < 0]
    if bad or len(set(ids)) != len(ids):
        raise _entry_error(annotation_file, f"has category id {bad[0] if bad else 'repeated'}",
                           "Category ids must be unique integers >= 0")
    seen = set()
    for ann in data.get("annotations", []):
        missing = [key for key in ("id", "image_id", "category_id", "bbox", "area", "iscrowd")
                   if not isinstance(ann, dict) or key not in ann]
        name = f"annotation {ann.get('id', '?')}" if isinstance(ann, dict) else f"annotation {ann!r:.40}"
        if missing:
            raise _entry_error(annotation_file, f"{name} has no {', '.join(missing)}",
                               "Add them (area: the box's width x height, iscrowd: 0 for a single object)")
        if not isinstance(ann["id"], int) or ann["id"] < 1:
            raise _entry_error(annotation_file, f"{name} has id {ann['id']!r}: pycocotools numbers detections from 1 "
                               "and would match them wrongly", "Number the annotations 1, 2, 3, ...")
        if ann["id"] in seen:
            raise _entry_error(annotation_file, f"annotation id {ann['id']} appears twice (pycocotools keeps one)",
                               "Make the annotation ids unique")
        seen.add(ann["id"])
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise _entry_error(annotation_file, f"{name} has bbox {box!r:.60}", "Give it [x, y, width, height]")
        if box[2] <= 0 or box[3] <= 0:
            raise _entry_error(annotation_file, f"{name} (image {ann['image_id']}) has a box of size {box[2]} x "
                               f"{box[3]}", "Fix its bbox (x, y, width, height) or remove the annotation")


def check_annotations(coco, image_folder: str, annotation_file: str, num_classes: Optional[int] = None) -> int:
    """Refuse what training could not use, naming the file and the value; return max category id + 1.

    Checked (beyond ``check_entries``): the image folder, every listed image file, category ids
    that are not declared or not below ``num_classes``, annotations of unknown images. Images
    without annotations are fine.
    """
    if not os.path.isdir(image_folder):
        raise UserError(f"image folder {image_folder} does not exist. Pass --coco_path with the COCO layout "
                        f"(the annotations in {annotation_file} name its files)")
    present = set(os.listdir(image_folder))
    for image in coco.dataset.get("images", []):
        if image["file_name"] not in present:
            raise UserError(f"{annotation_file} names image {image['file_name']} (id {image['id']}) that is not in "
                            f"{image_folder}. Restore the image or remove it from the annotations")
    declared = {c["id"] for c in coco.dataset.get("categories", [])}
    limit = num_classes if num_classes is not None else max(declared) + 1
    for ann in coco.dataset.get("annotations", []):
        if ann["category_id"] not in declared or not (0 <= ann["category_id"] < limit):
            raise UserError(f"{annotation_file} annotation {ann['id']} has category_id {ann['category_id']}, out "
                            f"of range (declared ids {min(declared)}..{max(declared)}, model classes 0..{limit - 1}). "
                            "Fix the annotation or the categories")
        if ann["image_id"] not in coco.imgs:
            raise UserError(f"{annotation_file} annotation {ann['id']} names image id {ann['image_id']}, which is "
                            "not in its 'images'. Fix the annotation")
    return max(declared) + 1


class CocoDetection(torch.utils.data.Dataset):
    """Images and targets of one split through pycocotools; ``transform(image, target)``."""

    def __init__(self, root: str, split: str, transform=None, num_classes: Optional[int] = None) -> None:
        self.image_folder, self.annotation_file = split_paths(root, split)
        self.coco = load_coco(self.annotation_file)
        self.num_classes = check_annotations(self.coco, self.image_folder, self.annotation_file, num_classes)
        self.ids = sorted(self.coco.imgs)  # images without annotations are kept: they train as background
        self.transform = transform

    @property
    def samples(self) -> List[Tuple[str, int]]:
        """(image path, image id) of every image, as torchvision's ImageFolder lists them."""
        return [(os.path.join(self.image_folder, self.coco.imgs[i]["file_name"]), i) for i in self.ids]

    @property
    def categories(self) -> List[Tuple[int, str]]:
        return sorted((c["id"], str(c.get("name", ""))) for c in self.coco.dataset["categories"])

    def __len__(self) -> int:
        return len(self.ids)

    def target_of(self, image_id: int, width: int, height: int) -> Dict[str, torch.Tensor]:
        """COCO annotations -> target: crowd boxes dropped, xywh -> xyxy clamped, empty boxes dropped."""
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        area = torch.tensor([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=torch.float32)
        return {"boxes": boxes[keep], "labels": labels[keep], "image_id": torch.tensor(image_id),
                "area": area[keep], "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
                "orig_size": torch.tensor([height, width]), "size": torch.tensor([height, width])}

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        path = os.path.join(self.image_folder, self.coco.imgs[image_id]["file_name"])
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")
        except OSError as error:
            raise LocalError(f"image {path} cannot be read ({error}). Restore the file or remove it from "
                             f"{self.annotation_file}") from None
        target = self.target_of(image_id, image.width, image.height)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


# ---------------------------------------------------------------------------------------------
# Transforms on (PIL image, target) pairs; random draws from Python's ``random`` (seeded, restored
# on resume with the run's RNG state)
# ---------------------------------------------------------------------------------------------
def yolos_size(width: int, height: int, short: int, max_size: Optional[int], patch: int) -> Tuple[int, int]:
    """YOLOS's resize rule -> (new width, new height), both floored to multiples of ``patch``.

    Short side ``short``, unless the long side would pass ``max_size`` (then the short side is
    ``round(max_size * short_side / long_side)``); long side ``int(short * long / short_side)``.
    """
    lo, hi = min(width, height), max(width, height)
    if max_size is not None and hi / lo * short > max_size:
        short = int(round(max_size * lo / hi))
    if lo == short:
        new_lo, new_hi = lo, hi
    else:
        new_lo, new_hi = short, int(short * hi / lo)
    new_lo, new_hi = max(patch, new_lo // patch * patch), max(patch, new_hi // patch * patch)
    return (new_lo, new_hi) if width <= height else (new_hi, new_lo)


def resize(image: Image.Image, target: Dict, size: Tuple[int, int]):
    """Resize to (width, height); boxes and area scale with the actual ratios."""
    width, height = size
    ratio_w, ratio_h = width / image.width, height / image.height
    image = image.resize((width, height), Image.BILINEAR)
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    target["area"] = target["area"] * ratio_w * ratio_h
    target["size"] = torch.tensor([height, width])
    return image, target


class RandomResize:
    def __init__(self, sizes: Sequence[int], max_size: Optional[int], patch: int) -> None:
        self.sizes, self.max_size, self.patch = list(sizes), max_size, patch

    def __call__(self, image, target):
        short = random.choice(self.sizes)
        return resize(image, target, yolos_size(image.width, image.height, short, self.max_size, self.patch))


class RandomSizeCrop:
    """Crop of width and height uniform in [min_size, min(side, max_size)]; empty boxes dropped."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        width = random.randint(min(self.min_size, image.width), min(image.width, self.max_size))
        height = random.randint(min(self.min_size, image.height), min(image.height, self.max_size))
        top, left = random.randint(0, image.height - height), random.randint(0, image.width - width)
        image = image.crop((left, top, left + width, top + height))
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = dict(target)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for key in ("labels", "iscrowd"):
            target[key] = target[key][keep]
        target["boxes"], target["area"] = boxes[keep], area[keep]
        target["size"] = torch.tensor([height, width])
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image, target):
        if self.p > 0 and random.random() < self.p:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = target["boxes"]
            target = dict(target)
            target["boxes"] = torch.stack([image.width - boxes[:, 2], boxes[:, 1], image.width - boxes[:, 0],
                                           boxes[:, 3]], dim=1)
        return image, target


class RandomSelect:
    """One of two transforms, the first with probability ``p``."""

    def __init__(self, first, second, p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target):
        return self.first(image, target) if random.random() < self.p else self.second(image, target)


class Normalize:
    """PIL -> normalised tensor (3, H, W); boxes -> (cx, cy, w, h) / (W, H, W, H)."""

    def __call__(self, image, target):
        tensor = TF.normalize(TF.to_tensor(image), MEAN, STD)
        target = dict(target)
        height, width = tensor.shape[1:]
        target["boxes"] = box_convert(target["boxes"], "xyxy", "cxcywh") / torch.tensor([width, height, width, height],
                                                                                        dtype=torch.float32)
        return tensor, target


class Compose:
    def __init__(self, transforms) -> None:
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


def train_transform(scales: Sequence[int], max_size: int, select_scales: Sequence[int], crop_size: Sequence[int],
                    patch: int, hflip: float = 0.5) -> Compose:
    """YOLOS's training pipeline: flip, then either a multi-scale resize or resize -> random crop ->
    multi-scale resize (probability 1/2 each), then normalise. Sizes are floored to the patch."""
    return Compose([
        RandomHorizontalFlip(hflip),
        RandomSelect(RandomResize(scales, max_size, patch),
                     Compose([RandomResize(select_scales, None, patch), RandomSizeCrop(crop_size[0], crop_size[1]),
                              RandomResize(scales, max_size, patch)])),
        Normalize(),
    ])


def eval_transform(eval_size: int, max_size: int, patch: int) -> Compose:
    return Compose([RandomResize([eval_size], max_size, patch), Normalize()])


def collate(batch: List[Tuple[torch.Tensor, Dict]]) -> Tuple[torch.Tensor, List[Dict]]:
    """Zero-pad the images bottom/right to the batch's largest H and W: (B, 3, H, W), targets list.

    YOLOS uses no padding mask: padded tokens take part in attention (and in ToE), as published.
    """
    images, targets = zip(*batch)
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    padded = images[0].new_zeros(len(images), 3, height, width)
    for i, image in enumerate(images):
        padded[i, :, :image.shape[1], :image.shape[2]] = image
    return padded, list(targets)
