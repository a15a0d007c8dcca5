"""EfficientTrain's curriculum as data, and its low-pass views.

A curriculum is a list of :class:`Segment` over the global epochs of one training run: for each
segment the low-pass crop size ``crop`` (the model's input side in pixels), the RandAugment
magnitude, the per-process batch and the gradient accumulation that keeps the global batch fixed.

Presets (``plan_curriculum``):

- ``et``: the published 5 segments (B = 160, 160, 160, 192, 224 at 224 px; m = 1, 3, 5, 7, 9; the
  segment k ends at ``int(epochs / 5 * (k + 1))``; twice the final per-process batch in the
  low-resolution segments, the final batch in the last one), for any ``--epochs`` and base size;
- ``etpp``: EfficientTrain++'s 10 segments (B = 96, 96, 160 x 4, 192, 192, 224, 224; m = k), each a
  tenth of the compute budget ``--epochs`` (counted in base-resolution epochs), so a segment at B
  runs ``(base / B)^2`` times as many data passes;
- ``table``: the user's ``END:B:M[:BATCH]`` entries;
- ``none``: one full-resolution segment (plain training).

Crop sizes of other base sizes are the published ratios (160/224, 192/224) rounded to the nearest
multiple of the patch size that is even (32 px, 4 px patches: 24, 24, 24, 28, 32).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ToE.common.errors import UserError
from ToE.common.schedule import split_global_batch

PRESETS = ("et", "etpp", "table", "none")
ET_CROPS_224 = (160, 160, 160, 192, 224)
ETPP_CROPS_224 = (96, 96, 160, 160, 160, 160, 192, 192, 224, 224)
ET_REFERENCE = 224


@dataclasses.dataclass(frozen=True)
class Segment:
    """Global epochs ``[start, end)`` trained at crop ``crop`` px with RandAugment magnitude
    ``magnitude``, ``batch`` images per process per micro-batch and ``accum`` micro-batches per update."""

    start: int
    end: int
    crop: int
    magnitude: int
    batch: int
    accum: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def scaled_crop(crop_224: int, base_size: int, patch_size: int) -> int:
    """A published crop size at 224 px moved to ``base_size``: the ratio, rounded to the nearest
    multiple of the patch size that is even (so the low-pass crop and the patch grid both fit)."""
    if base_size == ET_REFERENCE:
        return crop_224
    step = patch_size * 2 // math.gcd(patch_size, 2)
    return max(step, int(round(base_size * crop_224 / ET_REFERENCE / step)) * step)


def _batches(low_res: bool, batch_size: int, per_process_global: int) -> int:
    """The published per-process batch: twice the final one at low resolution, never above one update."""
    batch = 2 * batch_size if low_res else batch_size
    return batch if per_process_global % batch == 0 else batch_size


def parse_table(entries: Sequence[str]) -> List[tuple]:
    """``["9:24:1", "45:32:9:64"]`` -> [(end, crop, magnitude, batch or None)]; bad entries are UserErrors."""
    rows = []
    for entry in entries:
        parts = entry.split(":")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (3, 4) or min(numbers) < 0:
            raise UserError(f"--segments entry {entry!r} is not END:CROP:MAGNITUDE[:BATCH] with whole numbers. "
                            "Write e.g. --segments 9:24:1 18:24:3 27:24:5 36:28:7 45:32:9")
        rows.append((numbers[0], numbers[1], numbers[2], numbers[3] if len(numbers) == 4 else None))
    return rows


def plan_curriculum(preset: str, epochs: int, base_size: int, patch_size: int, batch_size: int,
                    global_batch: int, world_size: int = 1, table: Optional[Sequence[str]] = None) -> List[Segment]:
    """The segments of a run of ``epochs`` global epochs (``etpp``: a budget of ``epochs`` base-size
    epochs). ``batch_size`` is the per-process batch at full resolution; ``global_batch`` the images
    per update over all ``world_size`` processes. Every mistake is a :class:`UserError`."""
    batch_size, _ = split_global_batch(global_batch, world_size, batch_size)  # the full-resolution micro-batch
    per_process = global_batch // world_size
    rows: List[tuple] = []  # (end, crop, magnitude, batch)
    if preset == "et":
        for k, crop in enumerate(ET_CROPS_224):
            rows.append((int(epochs / 5 * (k + 1)), scaled_crop(crop, base_size, patch_size), 2 * k + 1,
                         _batches(k < 4, batch_size, per_process)))
    elif preset == "etpp":
        # Published: segment k runs to int(total_B / 10 * (k + 1)) of its own resolution's epochs
        # total_B = int(E * (base / B)^2), starting where the previous one stopped, converted by
        # round(end * B_prev^2 / B^2). Here the segments follow each other in one run.
        end, previous_end, previous_crop = 0, 0, None
        for k, crop in enumerate(ETPP_CROPS_224):
            crop = scaled_crop(crop, base_size, patch_size)
            total = epochs * base_size ** 2 // crop ** 2  # exact: float (224/160)^2 * 200 gives 391
            start = 0 if previous_crop is None else round(previous_end * previous_crop ** 2 / crop ** 2)
            previous_end, previous_crop = int(total / 10 * (k + 1)), crop
            end += max(1, previous_end - start)
            rows.append((end, crop, k, _batches(k < 6, batch_size, per_process)))
    elif preset == "none":
        rows.append((epochs, base_size, -1, batch_size))
    elif preset == "table":
        if not table:
            raise UserError("--curriculum table needs --segments END:CROP:MAGNITUDE[:BATCH] ... covering every "
                            f"epoch up to --epochs {epochs}. Pass e.g. --segments {epochs}:{base_size}:9")
        for end, crop, magnitude, batch in parse_table(table):
            rows.append((end, crop, magnitude, batch if batch is not None else batch_size))
        ends = [row[0] for row in rows]
        if any(b <= a for a, b in zip([0] + ends, ends)) or ends[-1] != epochs:
            raise UserError(f"--segments ends {ends} must increase from above 0 and the last must be --epochs "
                            f"{epochs}, so every epoch has a segment. Fix the END of the entries")
    else:
        raise UserError(f"unknown --curriculum {preset!r}. Pick one of {', '.join(PRESETS)}")
    segments: List[Segment] = []
    start = 0
    for end, crop, magnitude, batch in rows:
        check_crop(crop, base_size, patch_size)
        if batch < 1 or per_process % batch:
            raise UserError(f"a segment's batch {batch} does not divide the per-process share {per_process} of "
                            f"--global-batch {global_batch}. Pick a batch that divides {per_process}")
        if end > start:
            segments.append(Segment(start, end, crop, magnitude, batch, per_process // batch))
        start = end
    if segments[-1].crop != base_size:
        raise UserError(f"the last segment trains at {segments[-1].crop} px, not the full --input-size "
                        f"{base_size}: the final model would never see full resolution. End with CROP {base_size}")
    return segments


def check_crop(crop: int, base_size: int, patch_size: int) -> None:
    """Refuse a crop the FFT crop or the patch grid cannot use."""
    if crop % 2:
        raise UserError(f"crop size {crop} is odd: the low-pass crop keeps frequencies -B/2..B/2-1 and would give "
                        f"{crop - 1} px. Use an even size such as {crop + 1}")
    if crop > base_size:
        raise UserError(f"crop size {crop} is larger than --input-size {base_size}: a low-pass view cannot add "
                        f"frequencies. Use at most {base_size}")
    if crop % patch_size or crop < patch_size:
        raise UserError(f"crop size {crop} is not a multiple of the patch size {patch_size}: the last pixels would "
                        f"be cut off. Use e.g. {max(patch_size, crop - crop % patch_size)}")


def segment_at(segments: Sequence[Segment], epoch: int) -> Segment:
    """The segment that trains global epoch ``epoch`` (the last one past the end)."""
    for segment in segments:
        if epoch < segment.end:
            return segment
    return segments[-1]


def aa_policy(aa: str, magnitude: int) -> str:
    """``--aa`` with the segment's RandAugment magnitude (``rand-m9-...`` -> ``rand-m3-...``);
    other policies (and a magnitude < 0: no curriculum) are returned unchanged."""
    if magnitude < 0 or not aa.startswith("rand"):
        return aa
    parts = aa.split("-")
    has_magnitude = [bool(re.fullmatch(r"m\d+(\.\d+)?", p)) for p in parts]
    replaced = [f"m{magnitude}" if is_m else p for p, is_m in zip(parts, has_magnitude)]
    if not any(has_magnitude):
        replaced.insert(1, f"m{magnitude}")
    return "-".join(replaced)


# ---------------------------------------------------------------------------------------------
# Low-pass views (on the device, after normalisation, before mixup)
# ---------------------------------------------------------------------------------------------
def freq_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The B x B lowest frequencies of ``x`` (N, C, H, W) as an image (N, C, B, B), B = ``size``.

    Keeps frequencies -B/2..B/2-1 on each axis (the four corner blocks of the unshifted FFT),
    rescales by (B/H)(B/W) so intensities and channel means are kept, and returns the real part of
    the inverse FFT (ideal band-limited downsampling). Computed in float32 (or float64 for float64
    input); ``size`` must be even and at most H and W (``check_crop``).
    """
    height, width = x.shape[-2:]
    if size == height and size == width:
        return x
    half = size // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    spectrum = torch.fft.fft2(x.to(compute))
    top = torch.cat([spectrum[..., :half, :half], spectrum[..., :half, width - half:]], dim=-1)
    bottom = torch.cat([spectrum[..., height - half:, :half], spectrum[..., height - half:, width - half:]], dim=-1)
    cropped = torch.cat([top, bottom], dim=-2) * (size * size / (height * width))
    return torch.fft.ifft2(cropped).real.to(x.dtype)


class LowPass:
    """The device-side view of one segment: ``freq_crop`` to ``size`` (``mode="fft"``, published) or
    a bicubic antialiased resize (``mode="resize"``); a callable (N, C, H, W) -> (N, C, B, B)."""

    def __init__(self, size: int, mode: str = "fft") -> None:
        self.size, self.mode = size, mode

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mode == "fft":
            return freq_crop(images, self.size).detach()
        return F.interpolate(images, size=(self.size, self.size), mode="bicubic", antialias=True,
                             align_corners=False)

    def __repr__(self) -> str:
        return f"LowPass({self.size}, {self.mode!r})"
