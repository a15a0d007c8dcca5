"""Write token labels in the published format from any teacher on disk.

    python -m ToE.lvvit.generate_label --model NAME --checkpoint FILE --data-path DATA --out LABELS \
        [--img-size 576] [--batch-size 32] [--device auto|cuda|cpu]

For every image of ``DATA/train/<class>/`` it writes ``LABELS/<class>/<stem>.pt``: fp16 (2, 5, Hm, Wm),
the teacher's top-5 logits and class indices at every position of its final feature map. The dense
logits are the teacher's classifier applied at every spatial position (CNNs: the (B, F, h, w) map of
``forward_features``; ViTs: the patch tokens, prefix tokens dropped, on their square grid). Images go
through the evaluation transform (shorter side to ``--img-size``, centre crop ``--img-size``, as
published). Prints the teacher's top-1 on the labelled images (from the spatially averaged logits).
The teacher is any timm model name (``ToE.lvvit`` registers LV-ViT and the digits teacher) and its
weights come from ``--checkpoint`` only: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader
from torchvision import transforms as T
from tqdm import tqdm

import ToE.lvvit  # noqa: F401  (registers the LV-ViT models and the digits teacher)
from ToE.common.args import OneLineParser, ParseKwargs, non_negative_int, positive_int
from ToE.common.data import image_folder
from ToE.common.distributed import resolve_device
from ToE.common.errors import UserError, run_main
from ToE.lvvit.labels import label_path, label_paths, save_label_map


def check_teacher(name: str, checkpoint: str) -> None:
    """A known timm model name and a checkpoint file on disk; else one UserError line."""
    if not timm.is_model(name):
        raise UserError(f"unknown teacher model {name!r}. Pass a timm model name with --model")
    if not os.path.isfile(checkpoint):
        where = "" if os.path.isabs(checkpoint) else f" (relative to {os.getcwd()})"
        raise UserError(f"teacher checkpoint {checkpoint} not found{where}. Pass --checkpoint with the teacher's "
                        "weights on disk")


def check_out(out: str, data_path: str, overwrite: bool) -> None:
    """``out`` may take the label files: not a file, not the data folder or inside its splits (its class
    folders would become classes of DATA/train), and without files unless ``overwrite``."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file. Pass a folder for the label files")
    target = os.path.realpath(out)
    splits = [os.path.realpath(os.path.join(data_path, split)) for split in ("train", "val")]
    if target == os.path.realpath(data_path) or any(target == s or target.startswith(s + os.sep) for s in splits):
        raise UserError(f"--out {out} is inside the images of --data-path {data_path}: its label folders would "
                        "become classes of the data set. Pass a folder outside it")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"--out {out} already holds files: writing would replace an existing label set. Pass "
                        "another --out, or --overwrite to replace its files")


def load_teacher(name: str, checkpoint: str, num_classes: int, **model_kwargs) -> torch.nn.Module:
    """timm model ``name`` with the weights of ``checkpoint`` (a state_dict, or a dict with 'model');
    a missing file or one that does not fit is a one-line UserError."""
    check_teacher(name, checkpoint)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"teacher checkpoint {checkpoint} is unreadable ({error.__class__.__name__}). Pass a "
                        "torch.save'd state_dict") from None
    if isinstance(state, dict):
        for key in ("model_ema", "model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
    except TypeError as error:
        raise UserError(f"teacher {name} does not take --model-kwargs {model_kwargs} ({error}). Fix --model-kwargs"
                        ) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
        raise UserError(f"teacher checkpoint {checkpoint} does not fit {name} with {num_classes} classes ({first}). "
                        "Pass the --model the checkpoint was trained as") from None
    return model.eval()


@torch.no_grad()
def dense_teacher_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, C, h, w): the classifier at every position of the final feature map."""
    features = model.forward_features(images)
    if isinstance(features, tuple):  # LV-ViT: (tokens, MixToken box)
        features = features[0]
    if features.dim() == 3:  # a ViT: (B, prefix + h*w, F) -> (B, F, h, w)
        tokens = features[:, getattr(model, "num_prefix_tokens", 1):]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise UserError(f"teacher {type(model).__name__} gives {tokens.shape[1]} patch tokens, not a square grid. "
                            "Use a square --img-size")
        features = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
    if features.dim() != 4:
        raise UserError(f"teacher {type(model).__name__} gives features of shape {tuple(features.shape)}, not a "
                        "spatial map. Use a CNN or a ViT teacher")
    head = getattr(model, "aux_head", None) or model.get_classifier()
    if isinstance(head, torch.nn.Conv2d):
        return head(features)
    return head(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _Paths(torch.utils.data.Dataset):
    def __init__(self, folder, transform) -> None:
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, index: int):
        path, target = self.folder.samples[index]
        return self.transform(self.folder.loader(path)), target, index


def generate(args: argparse.Namespace) -> float:
    """Write the labels; return the teacher's top-1 (%) on the labelled images."""
    # the cheap checks first: a wrong name or path is one line before an ImageNet-sized folder is scanned
    check_teacher(args.model, args.checkpoint)
    check_out(args.out, args.data_path, args.overwrite)
    images = image_folder(args.data_path, "train")
    num_classes = len(images.classes)
    label_paths(images)  # two images that would share one label file are refused before any work
    model = load_teacher(args.model, args.checkpoint, num_classes, **args.model_kwargs)
    device = resolve_device(args.device)  # auto, cuda or cpu, as the trainers: no silent fall back to the CPU
    model.to(device)
    transform = T.Compose([T.Resize(args.img_size, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(args.img_size), T.ToTensor(),
                           T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    loader = DataLoader(_Paths(images, transform), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers)
    correct = seen = 0
    map_shape = None
    for batch, targets, indices in tqdm(loader, desc="token labels", disable=None, dynamic_ncols=True):
        logits = dense_teacher_logits(model, batch.to(device)).float().cpu()   # (B, C, h, w)
        if logits.shape[-1] < 6:
            raise UserError(f"the teacher's feature map is {logits.shape[-2]} x {logits.shape[-1]} at --img-size "
                            f"{args.img_size}; the label format needs at least 6 columns. Raise --img-size")
        map_shape = tuple(logits.shape[-2:])
        correct += int((logits.mean((2, 3)).argmax(1) == targets).sum())
        seen += len(targets)
        for one, index in zip(logits, indices.tolist()):
            save_label_map(label_path(args.out, images.samples[index][0]), one)
    accuracy = 100.0 * correct / max(seen, 1)
    print(f"wrote {seen} token-label files ({map_shape[0]} x {map_shape[1]} maps) to {args.out}; teacher "
          f"{args.model} top-1 on these images (averaged map): {accuracy:.2f} %", flush=True)
    return accuracy


def parse_args(argv=None) -> argparse.Namespace:
    from ToE.common.config import add_config_arg, parse_with_config

    parser = OneLineParser("Write LV-ViT token labels (published format) from a teacher on disk")
    add_config_arg(parser)  # the published label recipe: ToE/lvvit/configs/generate_labels.yaml
    # required, but checked after parsing, so that a config file may give them
    parser.add_argument("--model", default="", help="timm name of the teacher (required)")
    parser.add_argument("--checkpoint", default="", help="the teacher's weights on disk (state_dict) (required)")
    parser.add_argument("--data-path", default="", help="folder with train/<class>/ images (required)")
    parser.add_argument("--out", default="", help="label folder to write (<out>/<class>/<stem>.pt) (required)")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                        help="extra timm.create_model arguments of the teacher, e.g. img_size=384 for a ViT")
    parser.add_argument("--img-size", type=positive_int, default=576, help="teacher input side (default: 576)")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=32, help="batch size (default: 32)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: the GPU when torch can use one, the CPU when there is none, an error for a GPU "
                             "this torch build cannot use; cuda: the GPU or an error that says why; cpu (default: "
                             "auto)")
    parser.add_argument("--num-workers", type=non_negative_int, default=4, help="loader workers (default: 4)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out that already holds files, replacing those of the same names")
    args = parse_with_config(parser, argv)
    missing = [flag for flag in ("model", "checkpoint", "data_path", "out") if not getattr(args, flag)]
    if missing:
        parser.error(f"the following arguments are required: {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return args


def cli(argv=None) -> None:
    run_main(lambda: generate(parse_args(argv)))


if __name__ == "__main__":
    cli(sys.argv[1:])
