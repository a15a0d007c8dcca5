"""The embedded detection set "digits-det": scikit-learn's real handwritten digits on canvases, COCO layout.

    python -m ToE.yolos.digits_det --out data/digits-det

Each 64 x 64 RGB canvas has a dark noisy background (uniform 0-40) and 1-3 non-overlapping digits
upscaled x3 (bilinear, 24 px) in a random bright tint, each placed on the 8 px grid (its corner at
multiples of 8: on the demo's 8 px patches a digit covers 3 x 3 whole patches). Why the grid: a
4-block ViT trained from scratch for the demo's 20 epochs learns where digits are on any canvas, but
which digit only when the glyphs sit on its patch grid (``bench/results/yolos_demo_trials.md``:
AP 0.013 off the grid vs 0.10 on it after 8 epochs). Glyphs 0-1399 make the train
canvases, 1400-1796 the val canvases (unseen writers' glyphs). The box of a digit is the tight box
of its pixels above 10 % of the glyph's peak; category_id = digit + 1 (1..10; 0 stays unused, as
in COCO ids start at 1). Written as ``train2017/``, ``val2017/``, ``annotations/instances_*.json``
with ``info`` and ``licenses`` and ids from 1, so the COCO code reads it unchanged. Nothing is
downloaded; writing is idempotent (a complete folder is left alone, an older version replaced) and
never goes into a folder it did not write (a real COCO folder is refused, untouched).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List

import numpy as np

from ToE.common.digits import build_folder
from ToE.common.errors import run_main

VERSION = "digits-det v2"
TRAIN_GLYPHS, CANVAS = 1400, 64
SCALE, GRID = 3, 8  # glyph upscaling (8 px -> 24 px) and the placement grid (the demo's patch size)
SPLITS = {"train": 1500, "val": 300}


def _canvas(rng: np.random.RandomState, glyphs: np.ndarray, labels: np.ndarray, max_digits: int = 3):
    """One canvas (64, 64, 3) uint8 and its boxes [(x, y, w, h, category_id)]."""
    from PIL import Image

    image = rng.uniform(0, 40, size=(CANVAS, CANVAS, 3))
    cells: List[tuple] = []
    boxes = []
    side = 8 * SCALE
    places = (CANVAS - side) // GRID + 1  # corners at 0, 8, ..., CANVAS - side
    for _ in range(rng.randint(1, max_digits + 1)):
        for _attempt in range(20):  # rejection sampling of a free place
            x, y = GRID * rng.randint(0, places), GRID * rng.randint(0, places)
            if all(x + side <= a or a + s <= x or y + side <= b or b + s <= y for a, b, s in cells):
                break
        else:
            continue
        index = rng.randint(len(glyphs))
        glyph = Image.fromarray((glyphs[index] / 16.0 * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        alpha = np.asarray(glyph, dtype=np.float64) / 255.0                      # (side, side)
        tint = rng.uniform(150, 255, size=3)
        region = image[y:y + side, x:x + side]
        image[y:y + side, x:x + side] = region * (1 - alpha[..., None]) + tint * alpha[..., None]
        rows, cols = np.nonzero(alpha > 0.1 * alpha.max())
        if len(rows) == 0:
            continue
        cells.append((x, y, side))
        x0, y0, x1, y1 = x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1
        boxes.append((float(x0), float(y0), float(x1 - x0), float(y1 - y0), int(labels[index]) + 1))
    return image.round().clip(0, 255).astype(np.uint8), boxes


def build_digits_det(out: str, seed: int = 0, max_digits: int = 3) -> str:
    """Write the set under ``out`` unless it is already complete; return ``out``.

    Staged and refusing like the classification digits (``ToE.common.digits.build_folder``): an
    older digits-det build there is replaced, a folder of anything else (a real COCO layout) is
    refused untouched, and an interrupted build leaves nothing half-written at ``out``."""
    def write(staging: str) -> None:
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        pools = {"train": (digits.images[:TRAIN_GLYPHS], digits.target[:TRAIN_GLYPHS]),
                 "val": (digits.images[TRAIN_GLYPHS:], digits.target[TRAIN_GLYPHS:])}
        categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
        os.makedirs(os.path.join(staging, "annotations"), exist_ok=True)
        for split_number, (split, count) in enumerate(SPLITS.items()):
            rng = np.random.RandomState(seed * 10 + split_number)
            folder = os.path.join(staging, f"{split}2017")
            os.makedirs(folder, exist_ok=True)
            images: List[Dict] = []
            annotations: List[Dict] = []
            for image_id in range(1, count + 1):  # ids from 1: COCOeval treats id 0 as unmatched
                pixels, boxes = _canvas(rng, *pools[split], max_digits=max_digits)
                name = f"{image_id:06d}.png"
                Image.fromarray(pixels).save(os.path.join(folder, name))
                images.append({"id": image_id, "file_name": name, "width": CANVAS, "height": CANVAS})
                for x, y, w, h, category in boxes:
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                        "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            data = {"info": {"description": VERSION}, "licenses": [], "images": images, "annotations": annotations,
                    "categories": categories}
            with open(os.path.join(staging, "annotations", f"instances_{split}2017.json"), "w") as handle:
                json.dump(data, handle)

    return build_folder(out, VERSION, lambda old: old.startswith("digits-det"), write, "ToE.yolos.digits_det")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits-det", help="folder to write (default: data/digits-det)")
    args = parser.parse_args()
    path = build_digits_det(args.out)
    counts = {}
    for split in SPLITS:
        with open(os.path.join(path, "annotations", f"instances_{split}2017.json")) as handle:
            data = json.load(handle)
        counts[split] = (len(data["images"]), len(data["annotations"]))
    print(f"digits-det in {path}: {counts['train'][0]} train images ({counts['train'][1]} boxes), "
          f"{counts['val'][0]} val images ({counts['val'][1]} boxes), {CANVAS} px, 10 classes (ids 1-10)")


if __name__ == "__main__":
    run_main(main)
