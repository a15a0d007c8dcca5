"""Draw a trained YOLOS run's detections on validation images (predicted boxes and ground truth).

    python -m ToE.yolos.figure runs/demo-yolos --out Figs/yolos_demo_boxes.png

Reads ``args.yaml`` and ``checkpoint.pth`` of the run, evaluates the first ``--images`` val images
with all tokens at the run's eval size, and draws the ``--top`` highest-scoring detections of each
image (label and score) in colour, the ground truth dashed in white.
"""

from __future__ import annotations

import argparse
import os

import torch

from ToE.common.checkpoint import load_checkpoint
from ToE.common.errors import UserError, run_main
from ToE.common.results import read_args
from ToE.yolos.data import CocoDetection, collate, eval_transform
from ToE.yolos.model import YOLOS, create_backbone, postprocess


def draw(run_dir: str, out: str, images: int = 8, threshold: float = 0.0, top: int = 3) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} does not exist. Pass the --output_dir of a YOLOS run")
    args = read_args(run_dir, ("backbone_name", "det_token_num", "init_pe_size", "eval_size", "data_path"))
    if not os.path.isfile(os.path.join(run_dir, "checkpoint.pth")):
        raise UserError(f"no checkpoint.pth in {run_dir}: no epoch has finished there. Draw once an epoch has finished")
    checkpoint = load_checkpoint(os.path.join(run_dir, "checkpoint.pth"))
    model = YOLOS(create_backbone(args["backbone_name"], args.get("backbone_kwargs")), checkpoint["num_classes"],
                  args["det_token_num"], args["init_pe_size"], args.get("mid_pe_size"),
                  args.get("pe_resize_by_count", False))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    eval_max = args.get("eval_max_size") or args["eval_size"] * 1333 // 800
    dataset = CocoDetection(args["data_path"], "val", eval_transform(args["eval_size"], eval_max, model.patch_size),
                            checkpoint["num_classes"])
    names = {c["id"]: c["name"] for c in dataset.coco.dataset["categories"]}
    count = min(images, len(dataset))
    batch, targets = collate([dataset[i] for i in range(count)])
    with torch.no_grad():
        detections = postprocess(model(batch), torch.stack([t["orig_size"] for t in targets]))
    columns = min(4, count)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, target, det in zip(axes.flat, targets, detections):
        info = dataset.coco.imgs[int(target["image_id"])]
        with Image.open(os.path.join(dataset.image_folder, info["file_name"])) as handle:
            ax.imshow(handle.convert("RGB"))
        for ann in dataset.coco.imgToAnns.get(int(target["image_id"]), []):
            x, y, w, h = ann["bbox"]
            ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, edgecolor="white", linestyle="--", linewidth=0.8))
        order = det["scores"].argsort(descending=True)[:top]
        for box, score, label in zip(det["boxes"][order].tolist(), det["scores"][order].tolist(),
                                     det["labels"][order].tolist()):
            if score < threshold:
                continue
            x0, y0, x1, y1 = box
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.2))
            ax.text(x0, y0 - 1, f"{names.get(label, label)} {score:.2f}", color="lime", fontsize=7)
        ax.set_title(f"val image {info['id']}", fontsize=8)
    figure.suptitle(f"YOLOS+ToE: the {top} highest-scoring detections per image (green, score >= {threshold}; "
                    "label and score) and the ground truth (white dashed)", fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run's --output_dir")
    parser.add_argument("--out", default="", help="PNG to write (default: RUN_DIR/boxes.png)")
    parser.add_argument("--images", type=int, default=8, help="val images to draw (default: 8)")
    parser.add_argument("--threshold", type=float, default=0.0, help="lowest score drawn (default: 0)")
    parser.add_argument("--top", type=int, default=3, help="detections drawn per image, best first (default: 3)")
    args = parser.parse_args()
    out = args.out or os.path.join(args.run_dir, "boxes.png")
    run_main(lambda: print(f"figure: {draw(args.run_dir, out, args.images, args.threshold, args.top)}"))


if __name__ == "__main__":
    main()
