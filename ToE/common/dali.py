"""``--data-backend dali``: NVIDIA DALI decodes and augments the images (on the GPU when there is one).

The torch path decodes and augments every image with PIL in DataLoader workers; on a modern GPU
node that is slower than the model, and more so with ToE's faster early stages. Here DALI does
the same work: the JPEG/PNG decode ("mixed": nvJPEG on the GPU; "cpu" without one), the
random-resized crop, the flip, RandAugment and the normalisation, and timm's random erasing runs
on the batch on the device. Mixup/cutmix and the plan's view (EfficientTrain's low-pass crop) stay
where the torch path has them, in the task's train step, so both backends share them.

What stays the torch path's, so that both backends train on the same images in the same order:
the image-folder listing and class indices (``ToE.common.data``), the sampler (repeated
augmentation or the distributed sampler, reshuffled per epoch from the run's seed, this process's
shard), the skip of a mid-epoch resume and the evaluation shard. DALI reads the files this
process's sampler picks, fed batch by batch (``external_source``). Every epoch builds its pipeline
anew with a seed drawn from the run's seed, the process's rank and the epoch, so an epoch's
augmentation depends on nothing else and a run resumed at an epoch boundary continues exactly. (A
mid-epoch resume skips the batches already trained; the rest of that epoch draws other crops.)

timm's RandAugment policy maps onto DALI's ``auto_aug.rand_augment`` as follows:

    timm ``rand-mM-nN-mstdS-incI``   DALI ``rand_augment(n=N, m=M, num_magnitude_bins=11, monotonic_mag=I)``
    - ``mM``: timm's magnitude scale is 0..10 (_LEVEL_DENOM = 10), DALI's is the bin index, so 11 bins put
      bin M at M/10 of each op's range, as in timm;
    - ``nN``: ops per image (timm's default 2);
    - ``incI``: 1 (timm's "increasing" op set, whose posterize/solarize/enhance strength grows with the
      magnitude) is DALI's ``monotonic_mag=True``; 0 is ``False``;
    - ``mstdS``: timm draws each op's magnitude around M with this spread; DALI has no such noise, so every
      op uses M (the one departure; for ``mstd0.5`` on M = 9 the spread is 0.5 of 10 steps);
    - translations reach 0.45 of the crop, as timm's ``translate_const = 0.45 x img_size``; the fill of
      rotated or sheared borders is 128 (timm: the ImageNet mean colour, 124/116/104).
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .errors import LocalError, UserError

# What DALI's image decoder reads (PIL's format names); PIL reads more (GIF, ICO, TGA, PCX...), so an image the
# torch path trains on may be one DALI cannot decode
DALI_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "PPM", "JPEG2000", "WEBP")
# DALI's own RandAugment calls operators it has since renamed, and each epoch's new pipeline repeated the
# deprecation warnings on stderr; nothing a user can change
_DALI_INTERNAL_WARNINGS = r"WARNING: `nvidia\.dali\.fn\.experimental\.\w+` is now deprecated"
INSTALL = "pip install nvidia-dali-cuda120 (or pip install -e \".[dali]\")"
MAGNITUDE_BINS = 11  # timm's magnitudes run 0..10


def require_dali() -> None:
    """A one-line UserError when DALI is not installed."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise UserError(f"--data-backend dali needs NVIDIA DALI, which is not installed. {INSTALL}, or use "
                        "--data-backend torch") from None


def rand_augment_args(policy: str) -> Optional[dict]:
    """timm's ``--aa`` string as ``rand_augment`` arguments (module docstring); None when off."""
    if policy in ("", "none", None):
        return None
    name, *parts = policy.split("-")
    if name != "rand":
        raise UserError(f"--aa {policy}: the DALI backend runs RandAugment policies (rand-...) only. Use e.g. "
                        "rand-m9-mstd0.5-inc1, --aa none, or --data-backend torch")
    values = {"m": 10.0, "n": 2, "inc": 0}
    for part in parts:
        key, number = re.match(r"([a-z]+)([\d.]*)", part).groups()
        if key in values and number:
            values[key] = float(number)
    magnitude = values["m"]
    if not magnitude.is_integer() or not 0 <= magnitude < MAGNITUDE_BINS:
        raise UserError(f"--aa {policy}: the DALI backend takes a whole magnitude from 0 to 10. Use e.g. "
                        "rand-m9-mstd0.5-inc1, or --data-backend torch")
    return {"n": int(values["n"]), "m": int(magnitude), "num_magnitude_bins": MAGNITUDE_BINS,
            "monotonic_mag": bool(values["inc"])}


def _interp(name: str):
    from nvidia.dali import types

    # timm's "random" picks bilinear or bicubic per image; DALI takes one: bicubic
    return {"bilinear": types.INTERP_LINEAR, "nearest": types.INTERP_NN}.get(name, types.INTERP_CUBIC)


def _normalized(images, crop: Optional[Tuple[int, int]] = None):
    """uint8 HWC to float CHW, normalised with ImageNet's mean and std (timm's default)."""
    from nvidia.dali import fn, types

    extra = {"crop": crop} if crop is not None else {}
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255.0 * m for m in IMAGENET_DEFAULT_MEAN],
                                    std=[255.0 * s for s in IMAGENET_DEFAULT_STD], **extra)


def _luma(images):
    """The grey level of float HWC RGB images (ITU-R 601, as PIL's and torchvision's grayscale), HW1."""
    return 0.299 * images[:, :, 0:1] + 0.587 * images[:, :, 1:2] + 0.114 * images[:, :, 2:3]


def _color_jitter(images, brightness, contrast, saturation):
    """torchvision's ColorJitter(strength, strength, strength) as timm builds it when there is no
    RandAugment: brightness blends with black, contrast with the image's mean grey level, saturation
    with the image's grey version (the factors: numbers, or one per sample), clamped to 0..255 after
    each. (DALI's own ``color_twist`` centres contrast on 128 and scales saturation in
    HSV, which darkens or lightens images whose mean is far from mid-grey, such as the digits.)
    torchvision applies the three in a random order; they are linear and commute except for the
    clamping, so one order is used."""
    from nvidia.dali import fn, math, types

    x = math.clamp(fn.cast(images, dtype=types.FLOAT) * brightness, 0.0, 255.0)
    mean = fn.reductions.mean(_luma(x))
    x = math.clamp(mean + contrast * (x - mean), 0.0, 255.0)
    grey = _luma(x)
    x = math.clamp(grey + saturation * (x - grey), 0.0, 255.0)
    return fn.cast(math.floor(x + 0.5), dtype=types.UINT8)


def _train_graph(crop: int, scale: Sequence[float], hflip: float, rand: Optional[dict], color_jitter: float,
                 interpolation: str, decoder: str):
    """timm's training transform in DALI: random-resized crop, flip, RandAugment (or colour jitter
    when there is none, as timm), normalisation."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import rand_augment

    encoded = fn.external_source(name="encoded", dtype=types.UINT8)
    labels = fn.external_source(name="labels", dtype=types.INT64)
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
    images = fn.random_resized_crop(images, size=[crop, crop], random_area=list(scale),
                                    random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0], interp_type=_interp(interpolation))
    if hflip > 0:
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=hflip))
    if rand is not None:
        images = rand_augment.rand_augment(images, shape=(crop, crop), max_translate_rel=0.45, fill_value=128,
                                           **rand)
    elif color_jitter > 0:
        low, high = max(0.0, 1.0 - color_jitter), 1.0 + color_jitter  # timm: the same strength for all three
        images = _color_jitter(images, *(fn.random.uniform(range=[low, high]) for _ in range(3)))
    return _normalized(images), labels


def _eval_graph(size: int, crop_pct: float, decoder: str):
    """timm's evaluation transform: shorter side to size / crop_pct (bicubic), centre crop of size."""
    from nvidia.dali import fn, types

    encoded = fn.external_source(name="encoded", dtype=types.UINT8)
    labels = fn.external_source(name="labels", dtype=types.INT64)
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=float(int(size / crop_pct)), interp_type=types.INTERP_CUBIC)
    return _normalized(images, crop=(size, size)), labels


class DaliLoader:
    """Batches ``(images, targets)`` of the images at ``indices`` of ``samples`` ((path, class)
    pairs, the torch path's), decoded and augmented by one DALI pipeline; images come out on
    ``device`` (float, normalised, NCHW), targets as int64 on ``device``."""

    def __init__(self, samples: Sequence[Tuple[str, int]], indices: Sequence[int], batch: int, drop_last: bool,
                 graph, device: torch.device, seed: int, threads: int, erase=None) -> None:
        self.samples, self.batch, self.device, self.erase = samples, batch, device, erase
        indices = list(indices)
        stop = len(indices) - len(indices) % batch if drop_last else len(indices)
        self.batches = [indices[start:start + batch] for start in range(0, stop, batch)]
        # one batch at a time, fed before each run: nothing is read ahead of what the sampler says
        self.pipe = _pipeline(graph, batch, device, threads, seed)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batches:
            paths = [self.samples[index][0] for index in batch]
            yield self._run(paths, [self.samples[index][1] for index in batch])

    def _run(self, paths: List[str], labels: List[int]):
        self.pipe.feed_input("encoded", _encoded(paths))
        self.pipe.feed_input("labels", [np.array(label, dtype=np.int64) for label in labels])
        try:
            images, targets = self.pipe.run()
        except RuntimeError as error:
            raise self._unreadable(paths, error) from None
        return self._to_torch(images), torch.as_tensor(np.array(targets.as_tensor())).to(self.device)

    def _to_torch(self, images: Any) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return self.erase(out) if self.erase is not None else out

    def _unreadable(self, paths: List[str], error: RuntimeError) -> Exception:
        """The file of the batch DALI could not decode, found by decoding the batch's files one by one (on a
        failure only) and named as the torch path names a bad image."""
        problems = undecodable(paths, self.device)
        if problems:
            _, problem, fix = problems[0]
            also = f" (and {len(problems) - 1} more of this batch)" if len(problems) > 1 else ""
            return LocalError(f"{problem}{also}. {fix}")
        return LocalError(f"DALI failed on a batch of {len(paths)} images whose files each decode alone "
                          f"({_first_line(error)}), first {paths[0]}. Use --data-backend torch, and report it")


def decoder_device(device: torch.device) -> str:
    """Where DALI decodes for a run on ``device``: "mixed" (nvJPEG on the GPU) with a GPU, else "cpu"."""
    return "mixed" if device.type == "cuda" else "cpu"


def _pipeline(graph, batch: int, device: torch.device, threads: int, seed: int = 0):
    """A built DALI pipeline of ``graph(decoder)`` (``decoder_device``), ``batch`` samples at most per run."""
    from nvidia.dali import pipeline_def

    def pipeline():  # a named function: DALI's conditionals (RandAugment) rewrite it from its source
        return graph(decoder_device(device))

    gpu = device.type == "cuda"
    with warnings.catch_warnings():  # restores warnings.showwarning on the way out
        # (DALI resets the warning filters around its own warning, so only the display can leave it out)
        show = warnings.showwarning

        def shown(message, *args, **kwargs):
            if not re.match(_DALI_INTERNAL_WARNINGS, str(message)):
                show(message, *args, **kwargs)

        warnings.showwarning = shown
        pipe = pipeline_def(enable_conditionals=True)(pipeline)(
            batch_size=batch, num_threads=max(1, threads), seed=seed % (2 ** 31),
            device_id=(device.index or 0) if gpu else None, prefetch_queue_depth=1)
        pipe.build()
    return pipe


def _decode_graph(decoder: str):
    """The decoder alone: what the up-front check and the search for a bad file run."""
    from nvidia.dali import fn, types

    return fn.decoders.image(fn.external_source(name="encoded", dtype=types.UINT8), device=decoder,
                             output_type=types.RGB)


def _first_line(error: BaseException) -> str:
    """The line of a DALI error that says what failed (its text is a multi-line report)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "failure" in line or "rror" in line.split(" ")[0]),
                lines[-1] if lines else "decoder error")


def _why(path: str, error: BaseException) -> Tuple[str, str, str]:
    """(path, problem, fix) of an image DALI could not decode: PIL's reason when PIL cannot read it either,
    else the format DALI does not read (PIL opens GIF, ICO, TGA, PCX...), else DALI's own error."""
    from PIL import Image

    from .data import unreadable

    pil = unreadable(path)
    if pil is not None:
        return pil
    with Image.open(path) as image:
        kind = image.format
    if kind not in DALI_FORMATS:
        return (path, f"image {path} is {kind}, a format DALI does not decode (it decodes JPEG, PNG, BMP, TIFF, "
                      "PNM, JPEG 2000 and WebP)", "Convert it to PNG or JPEG, or use --data-backend torch")
    return (path, f"DALI cannot decode image {path} ({kind}: {_first_line(error)}), though PIL reads it",
            "Re-encode it (e.g. as PNG), or use --data-backend torch")


def _encoded(paths: Sequence[str]) -> List[np.ndarray]:
    try:
        return [np.fromfile(path, dtype=np.uint8) for path in paths]
    except OSError as error:
        raise LocalError(f"cannot read image {error.filename} ({error.__class__.__name__}). Remove or replace "
                         "that file") from None


def undecodable(paths: Sequence[str], device: torch.device, threads: int = 1,
                batch: int = 64) -> List[Tuple[str, str, str]]:
    """(path, problem, fix) of each of ``paths`` that DALI's decoder cannot decode on ``device``'s decoder.

    Decodes ``batch`` files per run; only a batch that fails is decoded again file by file (in a fresh
    pipeline after each failure: DALI marks a pipeline invalid after an error), so the cost is one decode
    of every file, as the torch path's check with PIL."""
    paths = list(paths)
    if not paths:
        return []
    problems: List[Tuple[str, str, str]] = []
    pipe = _pipeline(_decode_graph, min(batch, len(paths)), device, threads)
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        pipe.feed_input("encoded", _encoded(chunk))
        try:
            pipe.run()
            continue
        except RuntimeError:
            pass
        single = None
        for path in chunk:  # the failing batch, one file at a time
            single = single or _pipeline(_decode_graph, 1, device, 1)
            single.feed_input("encoded", _encoded([path]))
            try:
                single.run()
            except RuntimeError as error:
                problems.append(_why(path, error))
                single = None
        pipe = _pipeline(_decode_graph, min(batch, len(paths)), device, threads)
    return problems


def train_loader(samples, indices, batch: int, crop: int, args, policy: str, device: torch.device,
                 seed: int) -> DaliLoader:
    """This epoch's training batches: the recipe's crop scale, flip, ``policy`` and random erasing."""
    from timm.data.random_erasing import RandomErasing

    rand = rand_augment_args(policy)
    erase = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device=str(device)) \
        if args.reprob > 0 else None
    color = args.color_jitter if rand is None else 0.0

    def graph(decoder):
        return _train_graph(crop, args.scale, args.hflip, rand, color, args.train_interpolation, decoder)

    return DaliLoader(samples, indices, batch, True, graph, device, seed, args.num_workers, erase)


def eval_loader(samples, indices, batch: int, size: int, crop_pct: Optional[float], device: torch.device,
                threads: int) -> DaliLoader:
    from timm.data.constants import DEFAULT_CROP_PCT

    pct = DEFAULT_CROP_PCT if crop_pct is None else crop_pct
    return DaliLoader(samples, indices, batch, False, lambda decoder: _eval_graph(size, pct, decoder), device, 0,
                      threads)
