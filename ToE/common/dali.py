"""``--data-backend dali``: NVIDIA DALI decodes and augments the images (on the GPU when there is one).

The torch path decodes and augments every image with PIL in DataLoader workers; on a modern GPU
node that is slower than the model, and more so with ToE's faster early stages. Here DALI does
the same work: the JPEG/PNG decode ("mixed": nvJPEG on the GPU; "cpu" without one), the
random-resized crop, the flip, RandAugment and the normalisation, and timm's random erasing runs
on the whole batch on the device (``BatchErasing``). Mixup/cutmix and the plan's view
(EfficientTrain's low-pass crop) stay where the torch path has them, in the task's train step, so
both backends share them.

What stays the torch path's, so that both backends train on the same images in the same order:
the image-folder listing and class indices (``ToE.common.data``), the sampler (repeated
augmentation or the distributed sampler, reshuffled per epoch from the run's seed, this process's
shard), the skip of a mid-epoch resume and the evaluation shard. DALI reads the files this
process's sampler picks, in the sampler's order.

One pipeline per run (``TrainLoader``): built at the first epoch and asked for every epoch's
batches (``TrainLoader.epoch``). It is built for the largest batch of the run's plan, and
RandAugment's magnitude is one of its inputs, so a curriculum (EfficientTrain) that changes both
keeps it; only another RandAugment op count (``nN``) would build a second one. ``BUILDS`` counts
the pipelines built.

Re-seeding without a rebuild. A built DALI pipeline cannot be re-seeded: its random operators
(``fn.random.*``, ``random_resized_crop``, the op choice and signs inside ``auto_aug.rand_augment``)
take their seed when the pipeline is built, and DALI's public API has no call that sets their state
afterwards (checkpoints restore a state only into a pipeline being built). So the pipeline has no
random operator at all: every random draw is made on the host, per batch, from a generator seeded
with (the epoch's seed, the batch's position in the epoch), and fed through the external source
with the files (DALI's documented way to give an operator per-sample arguments): the crop window
(timm's ``RandomResizedCrop`` algorithm, vectorised over the batch, on the image size read from
the file's header; the decoder decodes only that window, ``decoders.image_slice``), the flip, the
RandAugment ops and magnitude signs (applied with DALI's public ``auto_aug.core.select`` and
``signed_bin``, the building blocks of its own ``rand_augment``, on its RandAugment suite), the
colour-jitter factors and the random erasing. An epoch's augmentation so depends on the run's seed,
the rank and the epoch only: a run resumed at an epoch boundary continues exactly (2 + 2 epochs
equal 4, tested), and since the generator follows the batch's position and not the order of
calls, a mid-epoch resume gets the crops the straight run had for the batches it still trains.

Reading ahead, in order. The external source is a batch callback that DALI calls once per batch,
in order; each batch's files are read (and its draws made) by a pool of reader threads
(``READ_AHEAD`` batches beyond the ones DALI holds), and DALI works ``PREFETCH`` batches ahead of
the training step (its prefetch queue). Threads, not DALI's parallel external source: reading a
file releases the GIL, the order and the epoch's sample list (the sampler's, minus the skip) stay
in this process, and CUDA needs no fork. No host sync per step: the images come out on the
training stream, the labels are copied from pinned memory without blocking, and random erasing
is a fixed set of kernels per batch whose rectangles come from the host draws.

timm's RandAugment policy maps onto DALI's RandAugment suite as follows:

    timm ``rand-mM-nN-mstdS-incI``   DALI ``rand_augment(n=N, m=M, num_magnitude_bins=11, monotonic_mag=I)``
    - ``mM``: timm's magnitude scale is 0..10 (_LEVEL_DENOM = 10), DALI's is the bin index, so 11 bins put
      bin M at M/10 of each op's range, as in timm;
    - ``nN``: ops per image (timm's default 2), each drawn uniformly from the suite's 14 ops, each op's
      magnitude negated with probability 1/2 (as DALI's ``rand_augment``);
    - ``incI``: 1 (timm's "increasing" op set, whose posterize/solarize/enhance strength grows with the
      magnitude) is DALI's ``monotonic_mag=True`` suite; 0 is ``False``;
    - ``mstdS``: timm draws each op's magnitude around M with this spread; DALI has no such noise, so every
      op uses M (the one departure; for ``mstd0.5`` on M = 9 the spread is 0.5 of 10 steps);
    - translations reach 0.45 of the crop, as timm's ``translate_const = 0.45 x img_size``; the fill of
      rotated or sheared borders is 128 (timm: the ImageNet mean colour, 124/116/104).

Images are decoded as stored, without EXIF rotation, as PIL decodes them on the torch path.
"""

from __future__ import annotations

import collections
import functools
import io
import re
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .errors import LocalError, UserError

# What DALI's image decoder reads (PIL's format names); PIL reads more (GIF, ICO, TGA, PCX...), so an image the
# torch path trains on may be one DALI cannot decode
DALI_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "PPM", "JPEG2000", "WEBP")
# DALI's own RandAugment calls operators it has since renamed, and its suite repeated the deprecation warnings
# on stderr; nothing a user can change
_DALI_INTERNAL_WARNINGS = r"WARNING: `nvidia\.dali\.fn\.experimental\.\w+` is now deprecated"
INSTALL = "pip install nvidia-dali-cuda120 (or pip install -e \".[dali]\")"
MAGNITUDE_BINS = 11  # timm's magnitudes run 0..10
PREFETCH = 2  # batches DALI processes ahead of the training step (its prefetch queue depth)
READ_AHEAD = 2  # batches whose files are read ahead of the ones DALI holds
BUILDS: "collections.Counter[str]" = collections.Counter()  # DALI pipelines built so far, by kind


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


def _rand_augment_suite(monotonic: bool):
    """DALI's RandAugment suite (14 ops) for crops whose side is passed as ``shape``, translations up to
    0.45 of it."""
    from nvidia.dali.auto_aug import rand_augment

    make = rand_augment.get_rand_augment_suite if monotonic else rand_augment.get_rand_augment_non_monotonic_suite
    return make(use_shape=True, max_translate_rel=0.45)


@functools.lru_cache(maxsize=None)
def _suite_size(monotonic: bool) -> int:
    return len(_rand_augment_suite(monotonic))


def _train_inputs(hflip: float, rand: Optional[dict], color_jitter: float) -> List[Tuple[str, str]]:
    """(name, DALI type) of what the host feeds the training graph per batch, in the callback's order."""
    inputs = [("encoded", "UINT8"), ("anchor", "INT32"), ("shape", "INT32")]
    if hflip > 0:
        inputs.append(("flip", "INT32"))
    if rand is not None:
        inputs.append(("magnitude", "INT32"))
        for level in range(rand["n"]):
            inputs += [(f"op{level}", "INT32"), (f"sign{level}", "INT32")]
    elif color_jitter > 0:
        inputs += [("brightness", "FLOAT"), ("contrast", "FLOAT"), ("saturation", "FLOAT")]
    return inputs


def _external(source: Callable, inputs: Sequence[Tuple[str, str]]) -> Dict[str, Any]:
    """One external source whose callback returns a batch of each of ``inputs``, as {name: DataNode}."""
    from nvidia.dali import fn, types

    nodes = fn.external_source(source=source, num_outputs=len(inputs), batch=True,
                               dtype=[getattr(types, kind) for _, kind in inputs])
    return dict(zip([name for name, _ in inputs], nodes))


def _train_graph(source: Callable, crop: int, hflip: float, rand: Optional[dict], color_jitter: float,
                 interpolation: str, decoder: str):
    """timm's training transform in DALI with every random draw an input (module docstring): the crop
    window decoded and resized, flip, RandAugment (or colour jitter when there is none, as timm),
    normalisation."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug.core import select, signed_bin

    x = _external(source, _train_inputs(hflip, rand, color_jitter))
    images = fn.decoders.image_slice(x["encoded"], x["anchor"], x["shape"], device=decoder, output_type=types.RGB,
                                     axis_names="HW", normalized_anchor=False, normalized_shape=False,
                                     adjust_orientation=False)
    images = fn.resize(images, size=[crop, crop], interp_type=_interp(interpolation))
    if hflip > 0:
        images = fn.flip(images, horizontal=x["flip"])
    if rand is not None:
        suite = _rand_augment_suite(rand["monotonic_mag"])
        for level in range(rand["n"]):
            images = select(suite, x[f"op{level}"], data=images,
                            magnitude_bin=signed_bin(x["magnitude"], random_sign=x[f"sign{level}"]),
                            num_magnitude_bins=rand["num_magnitude_bins"], shape=(crop, crop), fill_value=128,
                            interp_type=None)
    elif color_jitter > 0:
        images = _color_jitter(images, x["brightness"], x["contrast"], x["saturation"])
    return _normalized(images)


def _eval_graph(source: Callable, size: int, crop_pct: float, decoder: str):
    """timm's evaluation transform: shorter side to size / crop_pct (bicubic), centre crop of size."""
    from nvidia.dali import fn, types

    images = fn.decoders.image(_external(source, [("encoded", "UINT8")])["encoded"], device=decoder,
                               output_type=types.RGB, adjust_orientation=False)
    images = fn.resize(images, resize_shorter=float(int(size / crop_pct)), interp_type=types.INTERP_CUBIC)
    return _normalized(images, crop=(size, size))


# ---------------------------------------------------------------------------------------------
# the host's draws
# ---------------------------------------------------------------------------------------------
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}  # markers without a length field
_JPEG_NOT_FRAMES = {0xC4, 0xC8, 0xCC}  # the C0..CF markers that are not a frame header (DHT, JPG, DAC)


def stored_size(data: bytes) -> Tuple[int, int]:
    """(height, width) of an encoded image as stored (no EXIF rotation), read from its header: PNG's
    IHDR, JPEG's frame header, else PIL's (which reads the header only)."""
    if data[:8] == _PNG and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        if width and height:
            return height, width
    if data[:2] == b"\xff\xd8":
        at = 2
        while at + 9 <= len(data) and data[at] == 0xFF:
            marker = data[at + 1]
            if marker == 0xFF:  # fill byte
                at += 1
            elif marker in _JPEG_STANDALONE:
                at += 2
            elif 0xC0 <= marker <= 0xCF and marker not in _JPEG_NOT_FRAMES:
                height, width = struct.unpack(">HH", data[at + 5:at + 9])
                if width and height:
                    return height, width
                break
            else:
                at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return height, width


def crop_windows(rng: np.random.Generator, sizes: np.ndarray, scale: Sequence[float],
                 ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0), attempts: int = 10) -> np.ndarray:
    """timm's ``RandomResizedCrop`` windows for images of ``sizes`` ((height, width) rows), as (top, left,
    height, width) rows: up to ``attempts`` draws of an area share in ``scale`` and a log-uniform aspect
    ``ratio`` per image, the first that fits placed uniformly, else the largest centred crop within the
    ratio range. Vectorised over the batch; a fixed number of draws per image."""
    heights, widths = sizes[:, 0].astype(np.int64), sizes[:, 1].astype(np.int64)
    count, rows = len(sizes), np.arange(len(sizes))
    area = (heights * widths)[:, None] * rng.uniform(scale[0], scale[1], (count, attempts))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (count, attempts)))
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w <= widths[:, None]) & (h <= heights[:, None]) & (w > 0) & (h > 0)
    first = fits.argmax(1)
    found, h, w = fits[rows, first], h[rows, first], w[rows, first]
    place = rng.random((count, 2))
    top = (place[:, 0] * (heights - h + 1)).astype(np.int64)
    left = (place[:, 1] * (widths - w + 1)).astype(np.int64)
    # no draw fits: the centred crop, at the nearest bound of the ratio range
    shape = widths / heights
    low, high = min(ratio), max(ratio)
    fall_w = np.where(shape > high, np.rint(heights * high), widths).astype(np.int64)
    fall_h = np.where(shape < low, np.rint(widths / low), heights).astype(np.int64)
    top = np.where(found, top, (heights - fall_h) // 2)
    left = np.where(found, left, (widths - fall_w) // 2)
    return np.stack([top, left, np.where(found, h, fall_h), np.where(found, w, fall_w)], 1)


class BatchErasing:
    """timm's ``RandomErasing`` (same arguments and distribution) on a whole batch at once: the host
    draws every image's rectangles (``draw``, vectorised: per image whether it is erased, how many
    rectangles, each from up to 10 area/aspect draws as timm), and ``apply`` erases them with one set of
    kernels per batch (a mask from the rectangles, the fill, one ``where``) on the images' device.
    Random draws come from the generator given to ``draw`` (the pixel noise from a seed it draws),
    never from Python's or torch's global generators."""

    def __init__(self, probability: float = 0.5, mode: str = "const", min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3, max_aspect: Optional[float] = None,
                 min_count: int = 1, max_count: Optional[int] = None) -> None:
        self.probability, self.min_area, self.max_area = probability, min_area, max_area
        self.log_aspect = (np.log(min_aspect), np.log(max_aspect or 1 / min_aspect))
        self.min_count, self.max_count = min_count, max_count or min_count
        self.mode = mode.lower()
        if self.mode not in ("const", "rand", "pixel", ""):
            raise ValueError(f"random erasing mode {mode!r}: one of const, rand, pixel")

    def draw(self, rng: np.random.Generator, count: int, height: int, width: int) -> Optional[Dict[str, Any]]:
        """The erasing of a batch of ``count`` images of ``height`` x ``width``: the erased images'
        indices, their rectangles (top, left, height, width; empty ones 0 x 0) and the noise's seed;
        None when no image of the batch is erased."""
        erased = rng.random(count) < self.probability
        boxes = self.max_count
        rectangles = (np.full(count, boxes) if self.min_count == self.max_count
                      else rng.integers(self.min_count, self.max_count + 1, count))
        area = height * width * rng.uniform(self.min_area, self.max_area, (count, boxes, 10)) \
            / rectangles[:, None, None]
        aspect = np.exp(rng.uniform(*self.log_aspect, (count, boxes, 10)))
        h = np.rint(np.sqrt(area * aspect)).astype(np.int64)
        w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
        fits = (w < width) & (h < height)
        first = fits.argmax(2)[..., None]
        used = fits.any(2) & (np.arange(boxes) < rectangles[:, None]) & erased[:, None]
        h = np.where(used, np.take_along_axis(h, first, 2)[..., 0], 0)
        w = np.where(used, np.take_along_axis(w, first, 2)[..., 0], 0)
        place = rng.random((count, boxes, 2))
        top = (place[..., 0] * (height - h + 1)).astype(np.int64)
        left = (place[..., 1] * (width - w + 1)).astype(np.int64)
        noise_seed = int(rng.integers(2 ** 62))
        images = np.flatnonzero(used.any(1))
        if not len(images):
            return None
        return {"images": images, "boxes": np.stack([top, left, h, w], -1)[images], "seed": noise_seed}

    def apply(self, images: torch.Tensor, drawn: Optional[Dict[str, Any]]) -> torch.Tensor:
        """Erase ``drawn`` (``draw``'s result for this batch) from ``images`` (N, C, H, W), in place."""
        if drawn is None:
            return images
        device = images.device
        index = _host_to(torch.from_numpy(drawn["images"]), device)
        top, left, h, w = _host_to(torch.from_numpy(drawn["boxes"]), device).unbind(-1)  # (E, K) each
        rows = torch.arange(images.shape[2], device=device)[:, None]
        cols = torch.arange(images.shape[3], device=device)
        box = lambda t: t[..., None, None]  # noqa: E731  (E, K) -> (E, K, 1, 1)
        inside = (rows >= box(top)) & (rows < box(top + h)) & (cols >= box(left)) & (cols < box(left + w))
        chosen = images.index_select(0, index)  # (E, C, H, W)
        generator = torch.Generator(device=device)
        generator.manual_seed(drawn["seed"])
        if self.mode == "pixel":
            noise = torch.randn(chosen.shape, generator=generator, device=device, dtype=chosen.dtype)
            chosen = torch.where(inside.any(1, keepdim=True), noise, chosen)
        elif self.mode == "rand":  # one colour per rectangle; a later rectangle covers an earlier one, as timm
            colours = torch.randn((*inside.shape[:2], chosen.shape[1], 1, 1), generator=generator, device=device,
                                  dtype=chosen.dtype)
            for k in range(inside.shape[1]):
                chosen = torch.where(inside[:, k, None], colours[:, k], chosen)
        else:
            chosen = chosen.masked_fill(inside.any(1, keepdim=True), 0.0)
        return images.index_copy_(0, index, chosen)

    def __repr__(self) -> str:
        return f"BatchErasing(p={self.probability}, mode={self.mode}, count=({self.min_count}, {self.max_count}))"


def _host_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host (pinned first when the device is a GPU)."""
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# the loaders
# ---------------------------------------------------------------------------------------------
class _Feed:
    """One built DALI pipeline whose external source pulls the batches of the current pass, and the
    reader threads that prepare them ahead.

    ``prepare(job)`` (run by a reader thread) returns the batch's inputs in the graph's order and what
    the consumer needs with its outputs (``meta``: its paths first). ``run(jobs)`` yields (outputs, meta)
    per job in order; DALI calls ``_source`` for the next batch (in the thread that runs the pipeline),
    up to ``PREFETCH`` batches ahead, and each call queues the reading of one more."""

    def __init__(self, kind: str, graph: Callable[[Callable, str], Any], prepare: Callable, batch: int,
                 device: torch.device, threads: int) -> None:
        self.kind, self.batch, self.device, self.prepare = kind, batch, device, prepare
        self.pipe = _pipeline(lambda decoder: graph(self._source, decoder), batch, device, threads,
                              prefetch=PREFETCH, kind=kind)
        self.readers = ThreadPoolExecutor(max(2, min(threads, PREFETCH + READ_AHEAD)),
                                          thread_name_prefix=f"dali-{kind}-read")
        self.broken = False  # DALI failed: the pipeline is not used again
        self._todo: Iterator = iter(())
        self._reading: collections.deque = collections.deque()  # futures of the batches read ahead, in order
        self._inside: collections.deque = collections.deque()  # meta of the batches DALI holds, in order
        self._pass: Optional[object] = None  # the unfinished pass, if any

    def _read_more(self) -> None:
        job = next(self._todo, None)
        if job is not None:
            self._reading.append(self.readers.submit(self.prepare, job))

    def _source(self):
        """DALI's callback: the next batch's inputs; StopIteration at the end of the pass."""
        if not self._reading:
            raise StopIteration
        inputs, meta = self._reading.popleft().result()
        self._read_more()
        self._inside.append(meta)
        return inputs

    def run(self, jobs: Sequence) -> Iterator[Tuple[Any, Any]]:
        self.finish()
        token = self._pass = object()
        self._todo = iter(jobs)
        for _ in range(PREFETCH + READ_AHEAD):
            self._read_more()
        stream = _stream(self.device)
        complete = False
        try:
            while self._pass is token:  # (a later pass ends this one: ``finish``)
                try:
                    outputs = self.pipe.run(stream) if stream is not None else self.pipe.run()
                except StopIteration:
                    self.pipe.reset()
                    complete = True
                    break
                except RuntimeError as error:  # a file DALI cannot decode, among those it holds
                    self.close()
                    raise _unreadable([p for meta in self._inside for p in meta[0]], self.device, error) from None
                yield outputs, self._inside.popleft()
        except GeneratorExit:  # the consumer stopped early
            raise
        except BaseException:  # a file that cannot be read, an interrupt: the pipeline is not reused
            self.close()
            raise
        finally:
            if self._pass is token:
                self._pass = None
                if not complete and not self.broken:
                    self._drain()

    def finish(self) -> None:
        """End an unfinished pass (a consumer that stopped early): nothing more is read, what DALI holds
        is run out, and the pipeline is ready for the next pass."""
        if self._pass is not None:
            self._pass = None
            self._drain()

    def _drain(self) -> None:
        self._todo = iter(())
        for future in self._reading:
            future.cancel()
        self._reading.clear()
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            self.pipe.reset()
        except Exception:  # noqa: BLE001  (a failing batch nobody asked for: the pipeline is not reused)
            self.close()
        self._inside.clear()

    def close(self) -> None:
        """Stop reading and mark the pipeline as not to be used again."""
        self.broken = True
        self._todo = iter(())
        self.readers.shutdown(wait=False, cancel_futures=True)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise LocalError(f"cannot read image {path} ({error.__class__.__name__}). Remove or replace that file"
                         ) from None


def _header_size(path: str, data: bytes) -> Tuple[int, int]:
    try:
        return stored_size(data)
    except Exception as error:  # noqa: BLE001  (PIL cannot read the header either: named as the torch path does)
        _, problem, fix = _why(path, error)
        raise LocalError(f"{problem}. {fix}") from None


def _as_input(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _to_torch(images: Any, device: torch.device, stream) -> torch.Tensor:
    """A DALI batch (float, CHW) as one torch tensor on ``device`` (on the training stream with a GPU)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = images.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    feed_ndarray(dense, out, cuda_stream=stream)
    return out


def _labels(labels: Sequence[int], device: torch.device) -> torch.Tensor:
    return _host_to(torch.tensor(labels, dtype=torch.int64), device)


def _chunks(indices: Sequence[int], batch: int, drop_last: bool) -> List[List[int]]:
    indices = list(indices)
    stop = len(indices) - len(indices) % batch if drop_last else len(indices)
    return [indices[start:start + batch] for start in range(0, stop, batch)]


class TrainLoader:
    """The training batches of a run from one DALI pipeline: ``epoch(...)`` gives an epoch's batches
    ``(images, targets)`` of the images at the sampler's indices into ``samples`` ((path, class) pairs),
    augmented as the recipe in ``args`` says (crop scale, flip, RandAugment or colour jitter, random
    erasing); images float, normalised, NCHW on ``device``, targets int64 on ``device``.

    ``max_batch``: the largest batch the run asks for (a curriculum's), so that one pipeline serves all."""

    def __init__(self, samples: Sequence[Tuple[str, int]], crop: int, args, device: torch.device,
                 max_batch: int = 0) -> None:
        self.samples, self.crop, self.device, self.max_batch = samples, crop, device, max_batch
        self.scale, self.hflip = tuple(args.scale), float(args.hflip)
        self.color_jitter, self.interpolation, self.threads = args.color_jitter, args.train_interpolation, \
            args.num_workers
        self.erase = BatchErasing(args.reprob, mode=args.remode, max_count=args.recount) if args.reprob > 0 else None
        self._feeds: Dict[Any, _Feed] = {}

    def epoch(self, indices: Sequence[int], batch: int, policy: str, seed: int, first_batch: int = 0) -> "_Epoch":
        """The batches of the images at ``indices`` (the sampler's order for the epoch, less any skipped
        batches), ``batch`` at a time (a last partial batch is dropped), RandAugment ``policy``,
        augmentation drawn from ``seed`` (the run's seed, rank and epoch) and each batch's position in the
        epoch (``first_batch``: the batches skipped before ``indices``)."""
        return _Epoch(self, _chunks(indices, batch, drop_last=True), batch, rand_augment_args(policy), seed,
                      first_batch)

    def feed(self, batch: int, rand: Optional[dict]) -> _Feed:
        """The pipeline for ``batch`` and the RandAugment op count: built once, kept for the run."""
        key = None if rand is None else (rand["n"], rand["monotonic_mag"], rand["num_magnitude_bins"])
        feed = self._feeds.get(key)
        if feed is None or feed.broken or feed.batch < batch:
            if feed is not None:
                feed.finish()
                feed.close()
            for other in self._feeds.values():  # one pass at a time (a curriculum switching pipelines)
                other.finish()
            color = self.color_jitter if rand is None else 0.0
            shape = dict(crop=self.crop, hflip=self.hflip, rand=rand, color_jitter=color,
                         interpolation=self.interpolation)
            feed = _Feed("train", lambda source, decoder: _train_graph(source, decoder=decoder, **shape),
                         self._prepare, max(batch, self.max_batch, feed.batch if feed else 0), self.device,
                         self.threads)
            self._feeds[key] = feed
        return feed

    def _prepare(self, job) -> Tuple[list, tuple]:
        """A reader thread's work for one batch: its files, their sizes and the batch's random draws."""
        batch, position, rand, seed = job
        paths = [self.samples[i][0] for i in batch]
        data = [_read(path) for path in paths]
        sizes = np.array([_header_size(path, item) for path, item in zip(paths, data)], dtype=np.int64)
        rng = np.random.default_rng([seed, position])
        count = len(batch)
        window = crop_windows(rng, sizes, self.scale)
        inputs = [[_as_input(item) for item in data], window[:, :2].astype(np.int32), window[:, 2:].astype(np.int32)]
        if self.hflip > 0:
            inputs.append((rng.random(count) < self.hflip).astype(np.int32))
        if rand is not None:
            inputs.append(np.full(count, rand["m"], dtype=np.int32))
            ops = _suite_size(rand["monotonic_mag"])
            for _ in range(rand["n"]):
                inputs += [rng.integers(0, ops, count).astype(np.int32), rng.integers(0, 2, count).astype(np.int32)]
        elif self.color_jitter > 0:  # timm: the same strength for brightness, contrast and saturation
            low, high = max(0.0, 1.0 - self.color_jitter), 1.0 + self.color_jitter
            inputs += list(rng.uniform(low, high, (3, count)).astype(np.float32))
        erased = None
        if self.erase is not None:
            erased = self.erase.draw(np.random.default_rng([seed, position, 1]), count, self.crop, self.crop)
        return inputs, (paths, [self.samples[i][1] for i in batch], erased)


class _Epoch:
    """One epoch's batches from a ``TrainLoader`` (iterable once per epoch; ``len``: its batches)."""

    def __init__(self, loader: TrainLoader, batches: List[List[int]], batch: int, rand: Optional[dict], seed: int,
                 first_batch: int) -> None:
        self.loader, self.batches, self.batch_size = loader, batches, batch
        self.rand, self.seed, self.first_batch = rand, seed, first_batch

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def pipeline(self):
        """The DALI pipeline that runs this epoch (the run's: the same object every epoch)."""
        return self.loader.feed(self.batch_size, self.rand).pipe

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        loader = self.loader
        feed = loader.feed(self.batch_size, self.rand)
        jobs = [(batch, self.first_batch + k, self.rand, self.seed) for k, batch in enumerate(self.batches)]
        for outputs, (_, labels, erased) in feed.run(jobs):
            images = _to_torch(outputs[0], loader.device, _stream(loader.device))
            if loader.erase is not None:
                loader.erase.apply(images, erased)
            yield images, _labels(labels, loader.device)


def _stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


class DaliLoader:
    """Evaluation batches ``(images, targets)`` of the images at ``indices`` of ``samples``, in order
    (the last batch kept), from one DALI pipeline built at the first pass and kept for the next."""

    def __init__(self, samples: Sequence[Tuple[str, int]], indices: Sequence[int], batch: int, graph,
                 device: torch.device, threads: int) -> None:
        self.samples, self.batch_size, self.graph, self.device, self.threads = samples, batch, graph, device, threads
        self.batches = _chunks(indices, batch, drop_last=False)
        self._feed: Optional[_Feed] = None

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._feed is None or self._feed.broken:
            self._feed = _Feed("eval", self.graph, self._prepare, self.batch_size, self.device, self.threads)
        for outputs, (_, labels) in self._feed.run(self.batches):
            yield _to_torch(outputs[0], self.device, _stream(self.device)), _labels(labels, self.device)

    def _prepare(self, batch: List[int]):
        paths = [self.samples[i][0] for i in batch]
        return [[_as_input(_read(path)) for path in paths]], (paths, [self.samples[i][1] for i in batch])


def _unreadable(paths: List[str], device: torch.device, error: RuntimeError) -> Exception:
    """The file among ``paths`` (the batches DALI held when it failed) that DALI cannot decode, found by
    decoding them one by one (on a failure only) and named as the torch path names a bad image."""
    problems = undecodable(paths, device)
    if problems:
        _, problem, fix = problems[0]
        also = f" (and {len(problems) - 1} more of these batches)" if len(problems) > 1 else ""
        return LocalError(f"{problem}{also}. {fix}")
    return LocalError(f"DALI failed on a batch of images whose files each decode alone ({_first_line(error)}), "
                      f"among {len(paths)} files from {paths[0] if paths else '?'}. Use --data-backend torch, "
                      "and report it")


def decoder_device(device: torch.device) -> str:
    """Where DALI decodes for a run on ``device``: "mixed" (nvJPEG on the GPU) with a GPU, else "cpu"."""
    return "mixed" if device.type == "cuda" else "cpu"


def _pipeline(graph, batch: int, device: torch.device, threads: int, prefetch: int = 1, kind: str = "decode"):
    """A built DALI pipeline of ``graph(decoder)`` (``decoder_device``), ``batch`` samples at most per run,
    ``prefetch`` runs in flight (counted in ``BUILDS[kind]``). Its seed is fixed: the graphs here draw
    nothing themselves."""
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
            batch_size=batch, num_threads=max(1, threads), seed=0,
            device_id=(device.index or 0) if gpu else None, prefetch_queue_depth=prefetch)
        pipe.build()
    BUILDS[kind] += 1
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
                 seed: int, first_batch: int = 0) -> "_Epoch":
    """One epoch's training batches from a loader of its own (a run keeps one ``TrainLoader`` for all its
    epochs): the recipe's crop scale, flip, ``policy`` and random erasing."""
    return TrainLoader(samples, crop, args, device, max_batch=batch).epoch(indices, batch, policy, seed, first_batch)


def eval_loader(samples, indices, batch: int, size: int, crop_pct: Optional[float], device: torch.device,
                threads: int) -> DaliLoader:
    from timm.data.constants import DEFAULT_CROP_PCT

    pct = DEFAULT_CROP_PCT if crop_pct is None else crop_pct
    return DaliLoader(samples, indices, batch, lambda source, decoder: _eval_graph(source, size, pct, decoder),
                      device, threads)
