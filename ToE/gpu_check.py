"""Every CUDA path of an install, checked in minutes: ``bash run/gpu_check.sh`` (or
``python -m ToE.gpu_check``).

Time on one H100 (an ESTIMATE: this has not yet run on a GPU): about 2.5 minutes, 5 with a 2x margin,
within the 5-minute budget. Built from step counts and per-step times, not measured: every trainer check is
a subprocess whose cost is its start (Python, torch and CUDA initialisation, about 5-10 s) plus 6 steps an
epoch of a 2-block, 32-wide ViT (launch-bound: about 10-20 ms a step); the speed check's steps are those of
deit_small at 224 px, batch 256, bf16, for which an H100 is assumed to train 3,000-5,000 images/s (timm's
published training benchmarks of vit_small on older GPUs, scaled; no GPU has measured it here): 50-85 ms a
full-token step, 30-50 ms in stage 1.

    check               what it runs                                                    H100 estimate
    operator            15 operator cases, CPU and CUDA                                 ~5 s (CUDA start)
    no_host_sync        DeiT: 5 + 20 tiny steps, one Run built                          ~5 s
    no_host_sync_vpt    --finetune + deep VPT, DeiT 3 + 10 tiny steps                   ~3 s
    no_host_sync_lvvit  token labels for 24 images, LV-ViT 3 + 10 tiny steps           ~5 s
    no_host_sync_et     EfficientTrain 2 + 6 tiny micro-steps                           ~3 s
    fp16_clip           DeiT float16: 3 passes of 6 tiny updates                        ~3 s
    deit_amp            3 trainer runs (1 + 1 + 2 epochs)                               ~30 s
    lvvit               generate_label + 2 epochs                                       ~20 s
    efficienttrain      2 epochs (24 px, 32 px)                                         ~10 s
    dali                2 epochs with the DALI pipeline built                           ~15 s
    no_host_sync_dali   DeiT's DALI train loader: pipeline built, 2 + 4 batches          ~5 s
    yolos               2 epochs + --eval                                               ~20 s
    nccl                torchrun, NCCL set-up, 2 epochs                                 ~15 s
    sigusr1             2 trainer runs (stopped, resumed)                               ~20 s
    two_ranks           2 torchrun runs of 2 ranks (3 epochs; stopped in 2), --eval,    ~35 s
                        1 one-process resume
    speed               deit_small 224 px batch 256: per configuration 3 warm-up + 2   ~10 s
                        untimed + 10 timed steps (~2 s of steps), operator 8 calls, model build

The trainer checks (~165 s in all) run two at a time (``--jobs 2``) beside the in-process checks (~20 s),
so ~85-95 s; then the speed check alone, ~10 s; plus the data and start-up: ~2-2.5 min. Not included:
``run/gpu_check.sh``'s one-time install of the ``dali`` extra (a download of some hundred MB).

Each check asserts; a failed check says what went wrong, the command exits 1, and a table of
the checks (passed / failed / skipped / not exercised, seconds) ends the output. The report is
``OUT/gpu_check.json`` (``--out DIR`` or ``$TOE_GPU_CHECK_OUT``, else a new temporary folder), the speed
table also ``OUT/speed.json``. Without a GPU the same checks run on the CPU at small sizes, the
checks whose subject needs CUDA say "not exercised" and why (never "passed"), what needs CUDA inside the
others is named, and the output says "CUDA was not exercised: no GPU visible", so CI runs it and it
cannot rot.

    operator      TokenSelect on CUDA equals the CPU for every distance under bf16 and fp16 autocast
    no_host_sync  20 DeiT training steps under torch.cuda.set_sync_debug_mode("error")
                  (CPU: the same steps without the detector, a CUDA feature)
    no_host_sync_vpt  the same detector around a fine-tuning step with deep VPT: --finetune from a checkpoint
                  of another class count and grid (head dropped, position table resampled), the backbone
                  frozen, prompts as prefix tokens (CPU: 3 steps without the detector)
    no_host_sync_lvvit  the same detector around LV-ViT's step: token-label targets (roi_align on the
                  device), MixToken, the dense loss (CPU: 3 steps without the detector)
    no_host_sync_et  the same detector around EfficientTrain's step: 2 micro-batches accumulated per update,
                  the lr set per update, the low-pass view; the lr is equal within an update and changes
                  between updates (CPU: the same 6 micro-steps without the detector)
    fp16_clip     float16 + GradScaler + --clip-grad: every norm above the limit is cut to it, in unscaled
                  units (the norm at clipping does not follow a 256x change of the loss scale), the
                  optimizer stepped, the weights and the scale are finite (CPU: not exercised, float16
                  training needs CUDA)
    deit_amp      DeiT in bf16 with EMA; DeiT in fp16 (GradScaler), --stop-after-epochs, --auto-resume
    lvvit         LV-ViT with token labels from a tiny generated teacher
    efficienttrain  EfficientTrain across a resolution change, torch input
    dali          EfficientTrain with DALI input on the JPEG check images: on a GPU the "mixed" decoder
                  (nvJPEG); without DALI skipped and named, or failed with --dali require (CPU: DALI's
                  CPU backend)
    no_host_sync_dali  the torch side of DALI's training loader (outputs into torch, random erasing of the
                  batch, the labels' copy) under the same detector, 4 batches (CPU: DALI's CPU backend,
                  unchecked; skipped or failed without DALI as the dali check)
    yolos         YOLOS training and --eval on a tiny COCO layout
    nccl          a one-process NCCL (CPU: gloo) process group and DDP through training and evaluation
    sigusr1       SIGUSR1 mid-epoch: exit 3 with a mid-epoch checkpoint, --auto-resume finishes the run
    two_ranks     DeiT on 2 ranks with accumulation 2: every micro-batch but an update's last skips the
                  gradient all-reduce (no_sync, counted by a DDP comm hook) and the ranks step with equal
                  gradients; 7 test images in shards of 4 and 3 give the top-1 of one process; SIGUSR1 to
                  rank 1 alone stops both at the same update (exit 3 through ToE/common/torchrun.py); that
                  checkpoint resumed on 1 process trains exactly the rest of the epoch (GPU: NCCL with 2+
                  GPUs; with one, both ranks share it over gloo, a stand-in. CPU: gloo)
    speed         deit_small at 224 px, batch 256, bf16, per-step CUDA events: FAILS unless the median
                  stage-1 step is below the median full-token step (CPU: not exercised, a smoke run of
                  its timing code on a cut-down model only)

Each trainer check runs the real ``main.py`` in a subprocess with a 2-block, 32-wide ViT on a few
generated images for 1-3 epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from ToE.trainers import TRAINERS

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "CUDA was not exercised: no GPU visible"

# -- the tiny recipes --------------------------------------------------------------------------------
TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2"]
# 24 train images (3 classes x 8), batch 4: 6 steps an epoch; stage 1 (keep 0.5) in epoch 0, 2 in 1, 3 in 2
DEIT = [*TINY_VIT, "--input-size", "16", "--patch-size", "4", "--num_workers", "0", "--batch-size", "4",
        "--warmup-epochs", "0", "--lr", "1e-3", "--unscale-lr", "--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8",
        "--cutmix", "1.0", "--model-ema-decay", "0.9", "--expansion-step", "0", "1", "2",
        "--keep-rate", "0.5", "0.75", "1.0"]
LVVIT = ["--model", "lvvit_digits", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2", "stem_dim=8",
         "--img-size", "16", "--patch-size", "4", "--crop-pct", "1.0", "--num_workers", "0", "-b", "4",
         "--warmup-epochs", "0", "--cooldown-epochs", "0", "--lr", "1e-3", "--model-ema-decay", "0.9",
         "--expansion-step", "0", "1", "--keep-rate", "0.5", "1.0", "--initialization-keep-rate", "0.25"]
# two curriculum segments: epoch 0 at 24 px (a 6 x 6 grid, low-pass view), epoch 1 at the full 32 px
ET = [*TINY_VIT, "--input-size", "32", "--patch-size", "4", "--num_workers", "0", "--batch-size", "4",
      "--global-batch", "8", "--warmup-epochs", "0", "--lr", "1e-3", "--unscale-lr", "--no-repeated-aug",
      "--aa", "rand-m9-mstd0.5-inc1", "--model-ema-decay", "0.9", "--curriculum", "table", "--segments", "1:24:1",
      "2:32:9", "--expansion-step", "0", "1", "--keep-rate", "0.5", "1.0", "--initialization-keep-rate", "0.25",
      "--initialization", "uniform"]
YOLOS = ["--backbone_name", "vit_tiny_patch16_224", "--backbone-kwargs", "img_size=32", "patch_size=8",
         "embed_dim=32", "depth=3", "num_heads=2", "--det_token_num", "5", "--init_pe_size", "32", "32",
         "--mid_pe_size", "32", "32", "--scales", "24", "32", "40", "--max-size", "56", "--select-scales", "24", "32",
         "--crop-size", "16", "24", "--eval_size", "32", "--num_workers", "0", "--batch_size", "2", "--lr", "1e-3",
         "--expansion-step", "0", "1", "--keep-rate", "0.5", "1.0", "--seed", "0"]

# Operator tolerances (outputs; the kept indices must be equal). The selection is computed in
# float32 with autocast off on both devices, and the inputs below make it exact (see
# check_operator), so CUDA and CPU keep the same tokens. The merged means are rounded to the
# input's dtype once: at most half a unit in the last place, i.e. 2^-9 relative for bfloat16 (8
# significant bits) and 2^-12 for float16 (11 bits); the tolerances allow 2-4 such units, for a
# mean computed in another order. float32 and float64 agree to their own rounding.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5, torch.float64: 1e-12}


class CheckFailed(AssertionError):
    """A check's assertion, with what went wrong."""


class Skipped(Exception):
    """A check that cannot run on this machine (the reason is reported)."""


class NotExercised(Skipped):
    """A check whose subject needs CUDA: on the CPU it is reported as not exercised (with why, and what
    ran instead in ``detail``), never as passed."""

    def __init__(self, reason: str, detail: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(reason)
        self.detail = detail or {}


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# -- data ------------------------------------------------------------------------------------------
def write_images(root: Path, seed: int = 0) -> Path:
    """A tiny ImageNet layout: 3 classes x 8 train images, 7 val images, 32 px JPEGs (baseline, quality 95, as
    ImageNet's files: DALI's "mixed" decoder then decodes them with nvJPEG on a GPU); class c is brighter.
    The folder is written afresh (an earlier gpu_check's images, e.g. PNGs, would add samples)."""
    from PIL import Image

    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    for split, counts in (("train", (8, 8, 8)), ("val", (3, 3, 1))):
        for c, count in enumerate(counts):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray((rng.random((32, 32, 3)) * 90 + 80 * c).astype(np.uint8)).save(
                    folder / f"{i}.jpg", format="JPEG", quality=95)
    return root


def write_coco(root, splits=(("train", 8), ("val", 4)), size=(32, 40), seed: int = 0,
               edit: Optional[Callable[[str, dict], None]] = None):
    """A tiny COCO layout (the one the checks, the tests and bench/audit.py use): ``size`` (height, width)
    canvases with 1-2 bright squares each (category 1 or 2), train image 1 with none; ``splits``: (name,
    images). ``edit(split, data)`` changes a split's json before it is written. Returns ``root``."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    folder = Path(root)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    height, width = size
    for split, count in splits:
        (folder / f"{split}2017").mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for image_id in range(1, count + 1):
            pixels = rng.randint(0, 30, size=(height, width, 3)).astype(np.uint8)
            for _ in range(0 if image_id == 1 and split == "train" else rng.randint(1, 3)):
                w, h = rng.randint(6, 14, size=2)
                x, y = rng.randint(0, width - w), rng.randint(0, height - h)
                category = int(rng.randint(1, 3))
                pixels[y:y + h, x:x + w] = 120 * category
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category,
                             "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0})
            name = f"{image_id:04d}.png"
            Image.fromarray(pixels).save(folder / f"{split}2017" / name)
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
        if edit is not None:
            edit(split, data)
        (folder / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


# -- the context the checks share ------------------------------------------------------------------
class Context:
    def __init__(self, out: Path, quick: bool, dali: str = "auto") -> None:
        self.out, self.quick, self.dali = out, quick, dali
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        self.dev_flag = "cuda" if self.cuda else "cpu"
        self._images: Optional[Path] = None
        self._coco: Optional[Path] = None
        self.speed: Optional[Dict[str, Any]] = None

    @property
    def images(self) -> Path:
        if self._images is None:
            self._images = write_images(self.out / "data" / "images")
        return self._images

    @property
    def coco(self) -> Path:
        if self._coco is None:
            self._coco = write_coco(self.out / "data" / "coco")
        return self._coco

    def folder(self, name: str) -> Path:
        path = self.out / "runs" / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(TQDM_DISABLE="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
        env.setdefault("OMP_NUM_THREADS", "1" if not self.cuda else "4")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        return env

    def run(self, command: List[Any], name: str, expect_rc: int = 0, timeout: int = 300,
            extra_env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """Run ``command`` from the repository root (``extra_env`` added to its environment); its output
        goes to OUT/logs/NAME.log; a return code other than ``expect_rc`` fails the check with the end of
        its output."""
        command = [str(part) for part in command]
        started = time.perf_counter()
        try:
            result = subprocess.run(command, cwd=ROOT, env={**self.env(), **(extra_env or {})}, capture_output=True,
                                    text=True,
                                    timeout=timeout, check=False)
        except subprocess.TimeoutExpired as error:
            raise CheckFailed(f"{name}: did not finish within {timeout} s: {' '.join(command)}") from error
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(command)}\n# exit {result.returncode}, {time.perf_counter() - started:.1f} s\n"
                       f"## stdout\n{result.stdout}\n## stderr\n{result.stderr}")
        if result.returncode != expect_rc:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
            raise CheckFailed(f"{name}: exit code {result.returncode}, expected {expect_rc} (full output: {log}); "
                              f"command: {' '.join(command)}\n{tail}")
        return result

    def main(self, trainer: str, *args, name: str, expect_rc: int = 0, launcher=None) -> subprocess.CompletedProcess:
        command = [*(launcher or [sys.executable]), str(ROOT / TRAINERS[trainer].main), *args]
        return self.run(command, name, expect_rc)


def load(path: Path) -> Dict[str, Any]:
    expect(path.is_file(), f"{path} was not written")
    return torch.load(path, map_location="cpu", weights_only=True)


def run_log(out: Path) -> List[Dict[str, Any]]:
    """The epoch records of the run in ``out`` (``ToE.common.log.read_log``); a missing, empty or
    damaged log fails the check."""
    from ToE.common.errors import UserError
    from ToE.common.log import read_log

    try:
        return read_log(str(out))
    except UserError as error:
        raise CheckFailed(str(error)) from None


def finite_weights(state: Dict[str, torch.Tensor], what: str) -> None:
    bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    expect(not bad, f"{what}: non-finite values in {bad[:5]}")


def check_epochs(out: Path, epochs: int, what: str) -> List[Dict[str, Any]]:
    """The run in ``out`` finished ``epochs`` epochs: checkpoint epoch, log records, finite losses and weights."""
    checkpoint = load(out / "checkpoint.pth")
    expect(checkpoint["epoch"] == epochs - 1, f"{what}: checkpoint epoch {checkpoint['epoch']}, expected {epochs - 1}")
    expect("position" not in checkpoint, f"{what}: the final checkpoint still holds a mid-epoch position")
    finite_weights(checkpoint["model"], f"{what}: model")
    log = run_log(out)
    expect([r["epoch"] for r in log] == list(range(epochs)),
           f"{what}: log.txt has epochs {[r['epoch'] for r in log]}, expected 0..{epochs - 1}")
    losses = [r.get("train_loss") for r in log]
    expect(all(isinstance(v, float) and np.isfinite(v) for v in losses), f"{what}: train losses {losses}")
    return log


def on_device(result: subprocess.CompletedProcess, ctx: Context, what: str) -> None:
    """The trainer said it ran on the expected device ("N process(es) on cuda")."""
    expect(f"process(es) on {ctx.device.type}" in result.stdout,
           f"{what}: the run did not say it trained on {ctx.device.type}:\n{result.stdout[-1500:]}")


# -- 1. the operator ---------------------------------------------------------------------------------
def _autocast(device_type: str, dtype: torch.dtype):
    return torch.autocast(device_type=device_type, dtype=dtype)


def _cpu_autocast_supports(dtype: torch.dtype) -> bool:
    """Whether CPU autocast computes in ``dtype`` (bf16 always; fp16 in recent torch releases)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast("cpu", dtype=dtype):
                a = torch.ones(4, 4)
                return (a @ a).dtype == dtype
        except (RuntimeError, AssertionError):
            return False


def _select(x: torch.Tensor, distance: str, autocast_dtype: Optional[torch.dtype]):
    """The operator's stage-1 selection of ``x`` (leaf copy, so its gradient is returned too)."""
    import token_select

    toe = token_select.TokenSelect(expansion_step=[0, 1], keep_rate=[0.5, 1.0], initialization_keep_rate=0.25,
                                   distance=distance, num_prefix_tokens=1)
    toe.update_current_stage(0)
    x = x.detach().clone().requires_grad_(True)
    weight = torch.linspace(-1.0, 1.0, x.shape[-1], device=x.device, dtype=torch.float32)
    context = _autocast(x.device.type, autocast_dtype) if autocast_dtype is not None else torch.autocast(
        x.device.type, enabled=False)
    with context:
        out, index = toe.token_select(x)
    (out.float() * weight).sum().backward()
    return out.detach(), index, x.grad.detach()


def check_operator(ctx: Context) -> Dict[str, Any]:
    """CUDA against CPU for cosine, manhattan and euclidean, under bf16 and fp16 autocast, with
    float32 input (what a block returns under autocast) and input in the autocast dtype.

    Inputs: tokens of +-1 entries in 64 channels. Every token then has norm 8, so the cosine's
    normalised entries (+-1/8), their products and sums, the L1 and squared L2 distances are exact
    in float32 (and TF32) whatever the summation order, and both devices compute the same
    similarities bit for bit. Ties are then exact too; the stable sort and argmax (first maximum,
    documented on both devices) break them alike, so the kept indices must be equal. A second case
    with Gaussian tokens in float64 checks realistic values (CUDA and CPU round in float64 only at
    1e-16, far below the gaps between similarities)."""
    generator = torch.Generator().manual_seed(0)
    batch, tokens, channels = 4, 1 + 196, 64  # a class token and a 14 x 14 grid (deit_small at 224 px)
    signs = torch.randint(0, 2, (batch, tokens, channels), generator=generator).float() * 2 - 1
    gaussian = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    cpu_half = _cpu_autocast_supports(torch.float16)
    rows = []
    for distance in ("cosine", "manhattan", "euclidean"):
        cases = [(signs, amp, input_dtype) for amp in (torch.bfloat16, torch.float16)
                 for input_dtype in (torch.float32, amp)] + [(gaussian, None, torch.float64)]
        for data, amp, input_dtype in cases:
            x = data.to(input_dtype)
            what = f"{distance}, autocast {str(amp).replace('torch.', '') if amp else 'off'}, input " \
                   f"{str(input_dtype).replace('torch.', '')}"
            # the CPU reference: the same autocast where the CPU has it, else float32 (same input values)
            cpu_amp = amp if amp is None or amp == torch.bfloat16 or cpu_half else None
            ref_out, ref_index, ref_grad = _select(x, distance, cpu_amp)
            expect(ref_index is not None and ref_index.shape == (batch, 1 + 98),
                   f"operator {what}: the CPU kept {None if ref_index is None else tuple(ref_index.shape)}, "
                   "expected (4, 99)")
            # sanity of the reference itself: the CPU in float64 keeps the same tokens
            exact_out, exact_index, _ = _select(x.to(torch.float64), distance, None)
            expect(torch.equal(ref_index, exact_index), f"operator {what}: the CPU's kept indices differ from float64")
            tolerance = TOLERANCE[input_dtype]
            expect(torch.allclose(ref_out.double(), exact_out, rtol=tolerance, atol=tolerance),
                   f"operator {what}: CPU output differs from float64 by "
                   f"{(ref_out.double() - exact_out).abs().max():.3g} (tolerance {tolerance:g})")
            row = {"case": what, "cpu_reference": "autocast " + str(cpu_amp).replace("torch.", "")
                   if cpu_amp else "float32 (no CPU autocast for this dtype)" if amp else "float64"}
            if ctx.cuda:
                out, index, grad = _select(x.to(ctx.device), distance, amp)
                expect(out.dtype == ref_out.dtype,
                       f"operator {what}: CUDA output dtype {out.dtype}, CPU {ref_out.dtype}")
                expect(torch.equal(index.cpu(), ref_index),
                       f"operator {what}: CUDA kept other tokens than the CPU "
                       f"({(index.cpu() != ref_index).sum().item()} of {index.numel()} positions differ)")
                tolerance = TOLERANCE[input_dtype]
                difference = (out.cpu().double() - ref_out.double()).abs().max().item()
                expect(torch.allclose(out.cpu().double(), ref_out.double(), rtol=tolerance, atol=tolerance),
                       f"operator {what}: CUDA output differs from the CPU by {difference:.3g} "
                       f"(tolerance {tolerance:g})")
                grad_difference = (grad.cpu().double() - ref_grad.double()).abs().max().item()
                expect(torch.allclose(grad.cpu().double(), ref_grad.double(), rtol=tolerance, atol=tolerance),
                       f"operator {what}: CUDA gradient differs from the CPU by {grad_difference:.3g}")
                row.update(max_output_difference=difference, max_grad_difference=grad_difference)
            rows.append(row)
    return {"cases": len(rows), "cpu_float16_autocast": cpu_half, "rows": rows,
            "compared": "CUDA vs CPU" if ctx.cuda else "CPU vs float64 only"}


# -- 2. no host sync in the training step ---------------------------------------------------------
def _find_sync(error: BaseException) -> str:
    """The innermost frame of the project (or the deepest) where a synchronizing call was made."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if str(ROOT) in f.filename and "gpu_check" not in f.filename]
    frame = (ours or frames)[-1]
    return f"{frame.filename}:{frame.lineno} ({frame.line})"


class SyncDetector:
    """``torch.cuda.set_sync_debug_mode("error")`` while armed (on a GPU; the CPU has no detector),
    and the training steps taken while armed."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.armed, self.steps = cuda, False, 0

    def arm(self) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("error")
        self.armed = True

    def disarm(self) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
        self.armed = False

    def step(self) -> None:
        """One training step began."""
        if self.armed:
            self.steps += 1

    @contextmanager
    def watching(self, where: Callable[[], str]):
        """Armed inside the block; a sync caught there fails the check, naming ``where()`` (said when it is
        caught) and the line of the project that made it."""
        self.arm()
        try:
            yield
        except RuntimeError as error:
            if self.armed and "synchroniz" in str(error):
                raise CheckFailed(f"a host sync {where()} at {_find_sync(error)}: {str(error).splitlines()[0]}") \
                    from error
            raise
        finally:
            self.disarm()


def sync_checked(task_class: type, detector: SyncDetector):
    """A task class and a ``Run`` class that tell ``detector`` about the steps: the task's public
    ``train_step`` counts each step (then trains as ``task_class`` does), and the run's public
    ``check_finite``, the loop's first deliberate sync after the last step, disarms it first."""
    from ToE.common.lifecycle import Run

    class CountedTask(task_class):
        def train_step(self, model, batch):
            detector.step()
            return super().train_step(model, batch)

    class SyncCheckedRun(Run):
        def check_finite(self, non_finite, epoch):
            detector.disarm()
            return super().check_finite(non_finite, epoch)

    return CountedTask, SyncCheckedRun


def _sync_checked_steps(ctx: Context, task_class: type, args, warmup: int, steps: int,
                        probe: Optional[Callable[[Any], None]] = None) -> Dict[str, Any]:
    """``steps`` training steps of ``Run.train_steps`` (the run of ``args`` with a subclass of
    ``task_class``) in stage 1 of epoch 0's plan under ``set_sync_debug_mode("error")`` on a GPU,
    after ``warmup`` unchecked steps (lazy optimizer state, the operator's seed cache, kernels). The
    batches are read before the steps (only the step is checked). ``probe(task)`` is called at the
    start of every checked step. On the CPU the same steps run without the detector."""
    detector = SyncDetector(ctx.cuda)

    class Probed(task_class):
        def train_step(self, model, batch):
            if detector.armed and probe is not None:
                probe(self)
            return super().train_step(model, batch)

    counted, run_class = sync_checked(Probed, detector)
    torch.manual_seed(0)
    run = run_class(args, counted)
    task = run.task
    stage = run.toe.update_current_stage(0)
    expect(run.toe.reducing, f"the operator does not reduce in stage {stage}")
    plan = task.plan[0]
    batches: List[Any] = []
    epoch = 0
    while len(batches) < warmup + steps:  # the batches are read before the steps: only the step is measured
        batches += list(task.train_loader(epoch, plan, 0))
        epoch += 1
    full = task.num_patches
    if warmup:
        run.train_steps(0, plan, batches[:warmup], 0, None)  # lazy set-up: optimizer state, caches, kernels
    try:
        if ctx.cuda:
            # the detector works here: a deliberate sync under "error" raises
            torch.cuda.set_sync_debug_mode("error")
            try:
                torch.ones(1, device=ctx.device).item()
                raise CheckFailed("torch.cuda.set_sync_debug_mode('error') did not catch a deliberate .item()")
            except RuntimeError:
                pass
            expect(torch.cuda.get_sync_debug_mode() == 2, "the sync debug mode is not 'error'")
        with detector.watching(lambda: f"inside the training step (after {detector.steps} armed steps)"):
            stats = run.train_steps(0, plan, batches[warmup:warmup + steps], 0, None)
    finally:
        detector.disarm()
    expect(detector.steps == steps, f"{detector.steps} training steps ran, expected {steps}")
    expect(np.isfinite(stats["train_loss"]), f"train loss {stats['train_loss']}")
    expect(stats["kept_tokens"] < full, f"stage 1 kept {stats['kept_tokens']} of {full} patch tokens")
    detail: Dict[str, Any] = {"steps": steps, "accumulation": plan.accum, "kept_tokens": stats["kept_tokens"],
                              "patch_tokens": full, "sync_debug_mode": "error" if ctx.cuda else
                              "not available on the CPU (steps ran unchecked)"}
    if not ctx.cuda:
        detail["note"] = f"the {steps} steps ran on the CPU without the sync detector (a CUDA feature)"
    return detail


def check_no_host_sync(ctx: Context) -> Dict[str, Any]:
    """20 steps of the lifecycle's step loop (``Run.train_steps``: the task's ``train_step`` under
    bf16 autocast, backward, AdamW, EMA, ToE in stage 1) under ``torch.cuda.set_sync_debug_mode("error")``.
    ``--log-interval`` is larger than the steps, so the loop's deliberate reads (loss, stop check)
    do not fall inside; its end-of-pass reductions (after the last step) run with the mode off.
    The batches are read before the steps (only the step is checked), and 5 warm-up steps come first
    (lazy optimizer state, the operator's seed cache). fp16's GradScaler reads its inf check on the
    host in every step by design (``GradScaler.step``), so the check runs bf16 (no scaler). On the
    CPU the same 20 steps run without the detector (a CUDA feature), in float32.

    The run is DeiT's, through public means only: a subclass of its task counts the steps, a
    subclass of ``Run`` disarms the detector at its ``check_finite``."""
    from ToE.deit.main import parse_args
    from ToE.deit.trainer import DeiTTask

    # bf16 on the GPU; the CPU (no detector there) runs the harness in float32, its bf16 is slow
    amp = "bfloat16" if ctx.cuda else "float32"
    args = parse_args(["--data-path", str(ctx.images), *DEIT, "--device", ctx.dev_flag, "--amp-dtype", amp,
                       "--log-interval", "1000000", "--epochs", "3"])
    return {"amp": amp, **_sync_checked_steps(ctx, DeiTTask, args, warmup=5, steps=20)}


def check_no_host_sync_vpt(ctx: Context) -> Dict[str, Any]:
    """Fine-tuning with deep Visual Prompt Tuning on the device: ``--finetune`` loads a 10-class checkpoint of
    a 2 x 2 grid onto the run's 3 classes and 4 x 4 grid (head dropped, position table resampled), then
    ``--vpt deep``: the backbone frozen, prompts as prefix tokens that ToE passes through; 10 steps under
    the same detector as ``no_host_sync`` after 3 warm-up steps, bf16, the frozen-weight fingerprint
    taken. On the CPU: 3 steps after 1, float32, without the detector (a CUDA feature)."""
    import timm

    from ToE.deit.main import parse_args
    from ToE.deit.trainer import DeiTTask

    work = ctx.folder("sync_vpt")
    pretrained = work / "pretrained.pth"
    torch.manual_seed(0)
    torch.save({"model": timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=8, patch_size=4,
                                           embed_dim=32, depth=2, num_heads=2).state_dict()}, pretrained)
    amp = "bfloat16" if ctx.cuda else "float32"
    args = parse_args(["--data-path", str(ctx.images), *DEIT, "--device", ctx.dev_flag, "--amp-dtype", amp,
                       "--log-interval", "1000000", "--epochs", "3", "--finetune", str(pretrained), "--vpt", "deep",
                       "--prompt-tokens", "3", "--output_dir", str(work / "out")])
    warmup, steps = (3, 10) if ctx.cuda else (1, 3)
    return {"amp": amp, "vpt": "deep, 3 prompt tokens", "finetune": "10 -> 3 classes, 2 x 2 -> 4 x 4 grid",
            **_sync_checked_steps(ctx, DeiTTask, args, warmup, steps)}


def check_no_host_sync_lvvit(ctx: Context) -> Dict[str, Any]:
    """LV-ViT's step (token-label targets cut from the label maps with roi_align on the device, MixToken,
    the dense head and the token-labelling loss, EMA, ToE in stage 1) under the same detector as
    ``no_host_sync``: 10 checked steps after 3 warm-up steps, bf16. The token labels come from
    ``ToE.lvvit.generate_label`` (in this process) and a tiny random teacher. On the CPU: 3 steps after 1,
    float32, without the detector (a CUDA feature)."""
    import timm

    import ToE.lvvit  # noqa: F401  (registers digits_cnn and the LV-ViT models)
    from ToE.lvvit.generate_label import generate, parse_args as label_args
    from ToE.lvvit.main import parse_args
    from ToE.lvvit.trainer import LVViTTask

    work = ctx.folder("sync_lvvit")
    teacher = work / "teacher.pth"
    torch.save(timm.create_model("digits_cnn", num_classes=3).state_dict(), teacher)
    labels = work / "labels"
    generate(label_args(["--model", "digits_cnn", "--checkpoint", str(teacher), "--data-path", str(ctx.images),
                         "--out", str(labels), "--img-size", "32", "-b", "8", "--device", ctx.dev_flag,
                         "--num-workers", "0"]))
    amp = "bfloat16" if ctx.cuda else "float32"
    args = parse_args(["--data-path", str(ctx.images), *LVVIT, "--device", ctx.dev_flag, "--amp-dtype", amp,
                       "--log-interval", "1000000", "--epochs", "2", "--token-label", "--token-label-data",
                       str(labels), "--token-label-size", "4", "--output_dir", str(work / "out")])
    warmup, steps = (3, 10) if ctx.cuda else (1, 3)
    return {"amp": amp, "token_labels": True, **_sync_checked_steps(ctx, LVViTTask, args, warmup, steps)}


def check_no_host_sync_et(ctx: Context) -> Dict[str, Any]:
    """EfficientTrain's step under the same detector: epoch 0 of the curriculum (24 px, the low-pass view
    on the device), 2 micro-batches accumulated per update, the lr set per update by its published
    cosine; 6 checked micro-steps (3 updates) after 2 warm-up steps, bf16. The lr each checked step
    trained at is read (a Python float, no sync): equal within an update, different between updates
    (the per-update schedule ran). On the CPU the same steps run in float32 without the detector."""
    from ToE.EfficientTrain.main import parse_args
    from ToE.EfficientTrain.trainer import EfficientTrainTask

    amp = "bfloat16" if ctx.cuda else "float32"
    args = parse_args(["--data-path", str(ctx.images), *ET, "--device", ctx.dev_flag, "--amp-dtype", amp,
                       "--log-interval", "1000000", "--epochs", "2",
                       "--output_dir", str(ctx.folder("sync_et"))])
    lrs: List[float] = []
    # 24 images, batch 4 x 2 accumulated: 3 updates an epoch, which caps a pass at 6 micro-steps
    detail = _sync_checked_steps(ctx, EfficientTrainTask, args, warmup=2, steps=6,
                                 probe=lambda task: lrs.append(float(task.optimizer.param_groups[0]["lr"])))
    expect(detail["accumulation"] == 2, f"EfficientTrain epoch 0 accumulates {detail['accumulation']} micro-batches, "
                                        "expected 2")
    verdict = per_update_lr_verdict(lrs, 2)
    expect(verdict is None, f"EfficientTrain: {verdict}")
    return {"amp": amp, "lr_per_step": lrs, **detail}


def per_update_lr_verdict(lrs: List[float], accum: int) -> Optional[str]:
    """None when the lr of each micro-step is constant within each update of ``accum`` micro-steps and
    changes from one update to the next (a per-update schedule under accumulation); else what is wrong."""
    if not lrs or len(lrs) % accum:
        return f"{len(lrs)} micro-steps seen, not a whole number of updates of {accum}"
    updates = [lrs[i:i + accum] for i in range(0, len(lrs), accum)]
    if any(len(set(group)) != 1 for group in updates):
        return f"the lr changed inside an update (accumulation {accum}): {lrs}"
    firsts = [group[0] for group in updates]
    if len(firsts) > 1 and any(a == b for a, b in zip(firsts, firsts[1:])):
        return f"the lr did not change between updates: {firsts}"
    return None


# -- 3. DeiT: bf16 + EMA; fp16 + GradScaler, stopped and continued ----------------------------------
def check_deit_amp(ctx: Context) -> Dict[str, Any]:
    """bf16 with EMA; fp16 with GradScaler stopped by --stop-after-epochs and continued by --auto-resume.
    The CPU has no fp16 training: there the stopped and continued run is the bf16 + EMA run."""
    data, dev = ctx.images, ["--device", ctx.dev_flag]
    detail: Dict[str, Any] = {}
    if ctx.cuda:
        out = ctx.folder("deit_bf16_ema")
        result = ctx.main("deit", "--data-path", data, "--output_dir", out, *DEIT, *dev, "--epochs", "1",
                          "--amp-dtype", "bfloat16", "--model-ema", name="deit_bf16_ema")
        on_device(result, ctx, "DeiT bf16")
        _check_ema(out, check_epochs(out, 1, "DeiT bf16 + EMA"), "DeiT bf16")
        detail["bf16_ema"] = "1 epoch, EMA evaluated"

    # fp16 with GradScaler (CUDA only; the CPU runs the same stop/resume in bf16)
    amp = "float16" if ctx.cuda else "bfloat16"
    out = ctx.folder(f"deit_{amp}_resume")
    flags = ["--data-path", data, "--output_dir", out, *DEIT, *dev, "--epochs", "3", "--amp-dtype", amp]
    ctx.main("deit", *flags, "--stop-after-epochs", "1", "--auto-resume", name=f"deit_{amp}_first")
    first = load(out / "checkpoint.pth")
    expect(first["epoch"] == 0, f"DeiT {amp}: --stop-after-epochs 1 left a checkpoint of epoch {first['epoch']}")
    if ctx.cuda:
        expect(bool(first.get("scaler")) and "scale" in first["scaler"],
               f"DeiT float16: the checkpoint holds no GradScaler state ({first.get('scaler')!r})")
    result = ctx.main("deit", *flags, "--auto-resume", name=f"deit_{amp}_resumed")
    on_device(result, ctx, f"DeiT {amp} resumed")
    log = check_epochs(out, 3, f"DeiT {amp} stopped and resumed")
    _check_ema(out, log, f"DeiT {amp}")
    last = load(out / "checkpoint.pth")
    if ctx.cuda:
        scale = float(last["scaler"]["scale"])
        expect(np.isfinite(scale) and scale > 0, f"DeiT float16: loss scale {scale}")
        detail["float16_loss_scale"] = scale
    detail["stop_resume"] = f"{amp}: 1 epoch, then --auto-resume to epoch 3"
    if not ctx.cuda:
        detail["bf16_ema"] = "3 epochs, stopped after 1 and resumed, EMA evaluated"
        detail["note"] = "float16 autocast with GradScaler needs CUDA: the stop/resume ran in bfloat16 with EMA"
    return detail


def _check_ema(out: Path, log: List[Dict[str, Any]], what: str) -> None:
    checkpoint = load(out / "checkpoint.pth")
    expect(checkpoint.get("model_ema") is not None, f"{what}: no EMA weights in the checkpoint")
    finite_weights(checkpoint["model_ema"], f"{what}: EMA")
    expect(all("ema_acc1" in r for r in log), f"{what}: the log has no EMA accuracy")


# -- 4. LV-ViT with token labels -------------------------------------------------------------------
def check_lvvit(ctx: Context) -> Dict[str, Any]:
    work = ctx.folder("lvvit")
    teacher = work / "teacher.pth"
    import timm

    import ToE.lvvit  # noqa: F401  (registers digits_cnn and the LV-ViT models)

    # the CPU generator only: this runs in a thread beside the in-process checks, and must not touch CUDA
    torch.default_generator.manual_seed(0)
    torch.save(timm.create_model("digits_cnn", num_classes=3).state_dict(), teacher)
    labels = work / "labels"
    result = ctx.run([sys.executable, "-m", "ToE.lvvit.generate_label", "--model", "digits_cnn", "--checkpoint",
                      teacher, "--data-path", ctx.images, "--out", labels, "--img-size", "32", "-b", "8",
                      "--device", ctx.dev_flag, "--num-workers", "0"], "lvvit_generate_label")
    expect("wrote 24 token-label files" in result.stdout, f"generate_label: {result.stdout[-800:]}")
    out = work / "out"
    result = ctx.main("lvvit", "--data-path", ctx.images, "--output_dir", out, *LVVIT, "--device", ctx.dev_flag,
                      "--epochs", "2", "--token-label", "--token-label-data", labels, "--token-label-size", "4",
                      name="lvvit_train")
    on_device(result, ctx, "LV-ViT")
    log = check_epochs(out, 2, "LV-ViT with token labels")
    kept = [r["kept_tokens"] for r in log]
    expect(kept[0] < kept[-1] == 16, f"LV-ViT kept tokens per epoch {kept}, expected fewer than 16, then 16")
    return {"labels": 24, "kept_tokens": kept, "amp": "auto (bf16 on Ampere and later)" if ctx.cuda else "off"}


# -- 5. EfficientTrain across a resolution change ---------------------------------------------------
def _dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _efficienttrain(ctx: Context, backend: str) -> Dict[str, Any]:
    """EfficientTrain for 2 epochs (24 px, then 32 px) with ``--data-backend backend``."""
    out = ctx.folder(f"et_{backend}")
    result = ctx.main("et", "--data-path", ctx.images, "--output_dir", out, *ET, "--device", ctx.dev_flag,
                      "--epochs", "2", "--data-backend", backend, name=f"et_{backend}")
    on_device(result, ctx, f"EfficientTrain ({backend})")
    log = check_epochs(out, 2, f"EfficientTrain ({backend})")
    resolutions = [r.get("resolution") for r in log]
    expect(resolutions == [24, 32], f"EfficientTrain ({backend}): resolutions {resolutions}, expected [24, 32]")
    expect("24 px" in result.stdout and "32 px" in result.stdout,
           f"EfficientTrain ({backend}) did not announce both segments:\n{result.stdout[-1500:]}")
    return {"resolutions": resolutions, "kept_tokens": [r["kept_tokens"] for r in log]}


def check_efficienttrain(ctx: Context) -> Dict[str, Any]:
    """EfficientTrain across a resolution change with the torch input (DALI's input is the ``dali`` check)."""
    return {"torch": {**_efficienttrain(ctx, "torch"), "decoder": "PIL"}}


DALI_EXTRA = 'pip install -e ".[dali]"'


def _need_dali(ctx: Context) -> None:
    """Go on only where DALI is to be checked and importable: ``--dali off`` skips; without DALI, ``--dali
    require`` fails and ``--dali auto`` (the default) skips, naming the install (never passed)."""
    if ctx.dali == "off":
        raise Skipped("--dali off")
    if not _dali_importable():
        tried = os.environ.get("TOE_GPU_CHECK_DALI_INSTALL", "")
        how = (f"run/gpu_check.sh tried to install the dali extra and could not ({tried}); install it where there "
               f"is network: {DALI_EXTRA}") if tried else f"install the dali extra: {DALI_EXTRA}"
        if ctx.dali == "require":
            raise CheckFailed(f"DALI is not importable (--dali require): {how}")
        raise Skipped(f"DALI is not importable, so DALI's input did not run: {how} (--dali require makes this a "
                      "failure)")


def check_dali(ctx: Context) -> Dict[str, Any]:
    """EfficientTrain with ``--data-backend dali`` on the JPEG images: DALI's "mixed" decoder (nvJPEG) and
    its augmentation on the GPU; on the CPU, DALI's CPU backend (libjpeg-turbo). Without DALI: with
    ``--dali require`` a failure, with ``--dali auto`` (the default) skipped and named, never passed."""
    _need_dali(ctx)
    jpegs = sorted((ctx.images / "train").glob("*/*"))
    expect(jpegs and all(path.suffix == ".jpg" and path.read_bytes()[:2] == b"\xff\xd8" for path in jpegs),
           f"the check images are not all JPEGs: {[p.name for p in jpegs[:3]]}")
    detail = _efficienttrain(ctx, "dali")
    detail["decoder"] = "mixed (nvJPEG on the GPU)" if ctx.cuda else "cpu (libjpeg-turbo)"
    detail["images"] = f"{len(jpegs)} JPEG train images"
    if not ctx.cuda:
        detail["note"] = "DALI ran its CPU backend: the mixed decoder (nvJPEG) needs CUDA"
    return detail


def check_no_host_sync_dali(ctx: Context) -> Dict[str, Any]:
    """The torch side of DALI's training loader (its outputs into torch tensors, random erasing of the
    whole batch, the labels' copy to the device) under ``set_sync_debug_mode("error")``: 4 batches of
    DeiT's loader with ``--data-backend dali`` and ``--reprob 1`` after 2 unchecked ones (the pipeline
    built, the first batches prefetched, pinned buffers allocated), each consumed by a device-side sum
    (no read). DALI's own waits are its own (not torch's, so not seen): a sync found here is the
    project's. On the CPU the same batches run without the detector, from DALI's CPU backend."""
    from ToE.common.lifecycle import Run
    from ToE.deit.main import parse_args
    from ToE.deit.trainer import DeiTTask

    _need_dali(ctx)
    args = parse_args(["--data-path", str(ctx.images), *DEIT, "--device", ctx.dev_flag, "--data-backend", "dali",
                       "--reprob", "1.0", "--epochs", "3"])
    torch.manual_seed(0)
    task = Run(args, DeiTTask).task
    batches = iter(task.train_loader(0, task.plan[0], 0))
    for _ in range(2):
        next(batches)
    total, checked = torch.zeros((), device=ctx.device), 0
    with SyncDetector(ctx.cuda).watching(lambda: f"in DALI's training loader (after {checked} checked batches)"):
        for images, targets in batches:
            expect(images.device.type == ctx.device.type and targets.device.type == ctx.device.type,
                   f"a DALI batch on {images.device}/{targets.device}, expected {ctx.device.type}")
            total += images.float().mean() + targets.float().sum()
            checked += 1
    expect(checked == 4 and bool(torch.isfinite(total)), f"{checked} batches checked (expected 4), sum {total}")
    detail: Dict[str, Any] = {"batches": checked, "random_erasing": "every image (--reprob 1)",
                              "sync_debug_mode": "error" if ctx.cuda else "not available on the CPU (unchecked)"}
    if not ctx.cuda:
        detail["note"] = "the 4 batches came from DALI's CPU backend without the sync detector (a CUDA feature)"
    return detail


# -- 6. YOLOS training and evaluation ---------------------------------------------------------------
def check_yolos(ctx: Context) -> Dict[str, Any]:
    out = ctx.folder("yolos")
    flags = ["--coco_path", ctx.coco, *YOLOS, "--device", ctx.dev_flag]
    result = ctx.main("yolos", *flags, "--output_dir", out, "--epochs", "2", name="yolos_train")
    on_device(result, ctx, "YOLOS")
    log = check_epochs(out, 2, "YOLOS")
    aps = [r.get("test_AP") for r in log]
    expect(all(isinstance(ap, float) and 0.0 <= ap <= 1.0 for ap in aps), f"YOLOS test AP per epoch {aps}")
    result = ctx.main("yolos", *flags, "--eval", "--resume", out / "checkpoint.pth", name="yolos_eval")
    expect("AP " in result.stdout and "AP50" in result.stdout, f"YOLOS --eval printed no AP:\n{result.stdout[-1500:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("AP "))
    return {"train_AP": aps, "eval": line.strip()}


# -- 7. a process group (NCCL on a GPU) through training and evaluation -------------------------------
# torchrun --nproc_per_node 1 gives WORLD_SIZE=1, for which init_distributed starts no process
# group (ToE/common/distributed.py: only when world_size > 1). This wrapper starts the group
# with the backend init_distributed would pick (NCCL on a GPU, gloo on the CPU; the device set
# first, as init_distributed does per rank) and makes the run treat itself as distributed, so
# DDP, the reductions, the barrier and all_gather_object of the checkpoint go through it.
DIST_WRAPPER = """
import os, sys
import torch
import torch.distributed as dist
from ToE.common import distributed
from {module} import cli

use_cuda = torch.cuda.is_available()
if use_cuda:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group(backend="nccl" if use_cuda else "gloo")
print(f"gpu_check: process group {{dist.get_backend()}}, world size {{dist.get_world_size()}}", flush=True)
set_up = distributed.DistEnv.__post_init__


def counting_this_group(self):  # distributed: more than one process, or this one-process group
    set_up(self)
    self.distributed = self.distributed or dist.is_initialized()


distributed.DistEnv.__post_init__ = counting_this_group
cli(sys.argv[1:])
"""


def check_nccl(ctx: Context) -> Dict[str, Any]:
    work = ctx.folder("nccl")
    wrapper = work / "dist_wrapper.py"
    wrapper.write_text(DIST_WRAPPER.format(module=TRAINERS["deit"].module))
    out = work / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(wrapper)]
    result = ctx.run([*torchrun, "--data-path", ctx.images, "--output_dir", out, *DEIT, "--device", ctx.dev_flag,
                      "--epochs", "2", "--log-interval", "2"], "nccl_train")
    backend = "nccl" if ctx.cuda else "gloo"
    expect(f"gpu_check: process group {backend}, world size 1" in result.stdout,
           f"the process group was not {backend}:\n{result.stdout[-1500:]}")
    on_device(result, ctx, f"{backend} run")
    log = check_epochs(out, 2, f"one-process {backend} run")
    expect(all(r.get("test_acc1") is not None for r in log), f"{backend}: no evaluation in the log")
    checkpoint = load(out / "checkpoint.pth")
    expect(checkpoint.get("world_size") == 1 and "0" in checkpoint.get("rng", {}),
           f"{backend}: checkpoint world_size {checkpoint.get('world_size')}, "
           f"rng keys {list(checkpoint.get('rng', {}))}")
    # the weights are the model's own (no DDP "module." prefix): they load into a plain model
    expect(not any(key.startswith("module.") for key in checkpoint["model"]), f"{backend}: DDP prefix in the weights")
    return {"backend": backend, "ddp": True, "epochs": 2, "test_acc1": [r["test_acc1"] for r in log]}


# -- 8. SIGUSR1 mid-epoch, then --auto-resume ---------------------------------------------------------
# DeiT with a task that sends its own process SIGUSR1 when training step {when} (counted over the
# run) begins, written beside the run and started through the public trainer entry
# (``trainer_entry``: flags, lifecycle, one-line errors and exit codes as ToE/deit/main.py's)
SIGNAL_TRAINER = """# gpu_check's sigusr1 check: DeiT, whose training step {when} sends SIGUSR1 to its own process
import itertools
import os
import signal

from ToE.common.lifecycle import trainer_entry
from {package}.main import get_args_parser
from {package}.trainer import DeiTTask

STEPS = itertools.count(1)


class SignalAtStep(DeiTTask):
    def train_step(self, model, batch):
        if next(STEPS) == {when}:
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().train_step(model, batch)


parse_args, main, cli = trainer_entry("DeiT that signals itself at step {when} (gpu_check)", get_args_parser,
                                      __name__ + ":SignalAtStep")

if __name__ == "__main__":
    cli()
"""


def check_sigusr1(ctx: Context) -> Dict[str, Any]:
    work = ctx.folder("sigusr1")
    trainer = work / "signal_trainer.py"
    trainer.write_text(SIGNAL_TRAINER.format(package=TRAINERS["deit"].package, when=9))  # epoch 1, step 3 of 6
    out = work / "out"
    flags = ["--data-path", ctx.images, "--output_dir", out, *DEIT, "--device", ctx.dev_flag, "--epochs", "3",
             "--log-interval", "1", "--auto-resume"]
    stopped = ctx.run([sys.executable, trainer, *flags], "sigusr1_stopped", expect_rc=3)
    expect("SIGUSR1 received in epoch 1 after step" in stopped.stderr,
           f"the stop message does not name SIGUSR1 in epoch 1:\n{stopped.stderr[-1500:]}")
    checkpoint = load(out / "checkpoint.pth")
    position = checkpoint.get("position")
    expect(position is not None and position["epoch"] == 1 and position["step"] > 0,
           f"the mid-epoch checkpoint holds position {position}, expected epoch 1 and a step > 0")
    expect([r["epoch"] for r in run_log(out)] == [0], "the log after the stop should hold epoch 0 only")
    result = ctx.main("deit", *flags, name="sigusr1_resumed")
    on_device(result, ctx, "resumed run")
    check_epochs(out, 3, "SIGUSR1 + --auto-resume")
    return {"stopped_at": {"epoch": position["epoch"], "step": position["step"]}, "exit_code": 3, "resumed_to": 3}


# -- 8a. two ranks: no_sync with accumulation, uneven evaluation shards, a stop seen by one rank, 2 -> 1 ---
# DeiT on 2 processes through ToE/common/torchrun.py, each process reporting what its DDP did: the
# gradient all-reduces of every micro-batch (a counting DDP comm hook: no_sync must leave all but an
# update's last micro-batch without one), whether the gradients the optimizer steps with are equal on
# both ranks, and its training steps. Rank 1 alone sends itself SIGUSR1 when GPU_CHECK_STOP_AT is set.
# With fewer GPUs than ranks (one H100), both ranks share GPU 0 over gloo, which reduces CUDA tensors
# too: a stand-in for NCCL, which needs a GPU per rank; with two or more GPUs it is NCCL, as a real
# run; without a GPU, gloo on the CPU.
TWO_RANK_TRAINER = """# gpu_check's two_ranks check: DeiT on 2 processes reporting its DDP traffic
import atexit
import itertools
import json
import os
import signal

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from ToE.common.lifecycle import trainer_entry
from {package}.main import get_args_parser
from {package}.trainer import DeiTTask

RANK = int(os.environ.get("RANK", "0"))
STOP_AT = int(os.environ.get("GPU_CHECK_STOP_AT", "0"))  # the training step at which rank 1 signals itself
REPORT = {{"rank": RANK, "backend": None, "steps": 0, "updates": [], "unequal_gradients": 0, "signalled_at": None}}
if torch.cuda.is_available() and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
    os.environ["LOCAL_RANK"] = "0"  # one GPU for both ranks: gloo over its CUDA tensors stands in for NCCL
    torch.cuda.set_device(0)
    dist.init_process_group(backend="gloo")
STEPS = itertools.count(1)
COMM = [0]  # gradient buckets all-reduced so far


def counting(state, bucket):
    COMM[0] += 1
    return default_hooks.allreduce_hook(state, bucket)


class TwoRanks(DeiTTask):
    marks = []  # COMM at the start of each micro-batch of the current update

    def train_step(self, model, batch):
        if REPORT["steps"] == 0 and hasattr(model, "register_comm_hook"):  # DDP
            REPORT["backend"] = dist.get_backend()
            model.register_comm_hook(None, counting)
        step = REPORT["steps"] = next(STEPS)
        if RANK == 1 and step == STOP_AT:
            REPORT["signalled_at"] = step
            os.kill(os.getpid(), signal.SIGUSR1)
        self.marks.append(COMM[0])
        return super().train_step(model, batch)

    def before_optimizer_step(self, model):
        # all-reduces in each micro-batch's backward: the later marks, then the count now
        ends = self.marks[1:] + [COMM[0]]
        REPORT["updates"].append([end - start for start, end in zip(self.marks, ends)])
        self.marks.clear()
        if dist.is_initialized():
            grads = torch.cat([p.grad.detach().flatten().double() for p in model.parameters() if p.grad is not None])
            mine = [float(grads.sum()), float(grads.abs().sum())]
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
            REPORT["unequal_gradients"] += any(other != mine for other in every)
        return super().before_optimizer_step(model)


def write_report():
    with open(os.path.join(os.environ["GPU_CHECK_REPORT"], f"rank{{RANK}}.json"), "a") as handle:
        handle.write(json.dumps(REPORT) + "\\n")


atexit.register(write_report)
parse_args, main, cli = trainer_entry("DeiT on 2 ranks reporting its DDP traffic (gpu_check)", get_args_parser,
                                      __name__ + ":TwoRanks")

if __name__ == "__main__":
    cli()
"""


def _rank_reports(folder: Path) -> List[Dict[str, Any]]:
    """Every report the ranks wrote into ``folder`` (one line per process start)."""
    reports = []
    for path in sorted(folder.glob("rank*.json")):
        reports += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return reports


def no_sync_verdict(reports: List[Dict[str, Any]], accum: int) -> Optional[str]:
    """What is wrong with the ranks' DDP traffic, or None: every update must have ``accum`` micro-batches,
    all-reduce in its last one only (no_sync in the others), and step with equal gradients on every rank."""
    for report in reports:
        if report["backend"] is None:
            return f"rank {report['rank']} trained without a process group"
        for counts in report["updates"]:
            if len(counts) != accum or any(counts[:-1]) or counts[-1] == 0:
                return (f"rank {report['rank']}: an update's micro-batches all-reduced {counts} gradient bucket(s); "
                        f"expected {accum} micro-batches, none before the last (no_sync) and some in the last")
        if report["unequal_gradients"]:
            return (f"rank {report['rank']}: {report['unequal_gradients']} update(s) stepped with gradients that "
                    "differ between the ranks")
    return None


def check_two_ranks(ctx: Context) -> Dict[str, Any]:
    work = ctx.folder("two_ranks")
    trainer = work / "two_rank_trainer.py"
    trainer.write_text(TWO_RANK_TRAINER.format(package=TRAINERS["deit"].package))
    # 24 images, 2 ranks x 2 per micro-batch, 8 per update: accumulation 2, 3 updates an epoch; the stop
    # check every 2 micro-batches; 7 test images, shards of 4 and 3
    accum = 2
    flags = [*DEIT, "--data-path", ctx.images, "--device", ctx.dev_flag, "--epochs", "3", "--batch-size", "2",
             "--global-batch", "8", "--log-interval", "2"]
    launcher = [sys.executable, str(ROOT / "ToE" / "common" / "torchrun.py"), "--standalone", "--nproc_per_node", "2"]
    runs = {}
    for name, stop_at in (("straight", 0), ("stopped", 9)):
        out, reports = work / name, work / f"{name}_reports"
        reports.mkdir()
        env_extra = {"GPU_CHECK_REPORT": str(reports), "GPU_CHECK_STOP_AT": str(stop_at)}
        runs[name] = ctx.run([*launcher, trainer, *flags, "--output_dir", out, "--auto-resume"], f"two_ranks_{name}",
                             expect_rc=3 if stop_at else 0, extra_env=env_extra)
        verdict = no_sync_verdict(_rank_reports(reports), accum)
        expect(verdict is None, f"{name}: {verdict}")
    straight, stopped = work / "straight", work / "stopped"
    on_device(runs["straight"], ctx, "two ranks")
    log = check_epochs(straight, 3, "two ranks")
    backends = sorted({r["backend"] for r in _rank_reports(work / "straight_reports")})
    # uneven shards: the 2-rank evaluation counted each of the 7 test images once, as one process does
    single = ctx.main("deit", *flags, "--eval", "--resume", straight / "checkpoint.pth", name="two_ranks_eval")
    line = next((text for text in single.stdout.splitlines() if text.startswith("Accuracy on ")), "")
    expect(line.startswith("Accuracy on 7 test images"), f"one-process --eval: {line or single.stdout[-800:]}")
    alone = float(line.split("top-1 ")[1].split(" %")[0])
    expect(log[-1].get("test_images") == 7 and abs(log[-1]["test_acc1"] - alone) < 0.01,  # printed to 2 decimals
           f"2 ranks evaluated {log[-1].get('test_images')} test image(s) to top-1 {log[-1]['test_acc1']}; one process "
           f"evaluates 7 to {alone}")
    # a stop seen by rank 1 alone: both ranks stop at the same update with one mid-epoch checkpoint
    expect("SIGUSR1 received in epoch 1" in runs["stopped"].stderr,
           f"the stop message does not name SIGUSR1 in epoch 1:\n{runs['stopped'].stderr[-1500:]}")
    signalled = [r for r in _rank_reports(work / "stopped_reports") if r["signalled_at"]]
    expect([r["rank"] for r in signalled] == [1], f"the signal was sent by ranks {[r['rank'] for r in signalled]}")
    position = load(stopped / "checkpoint.pth").get("position")
    expect(position is not None and position["epoch"] == 1 and position["step"] == 4,
           f"the checkpoint holds position {position}; expected epoch 1, step 4 (the update after rank 1's signal)")
    # 2 ranks resumed as 1: the 8 images per update kept by accumulating 4 micro-batches of 2, and the rest of
    # the epoch is the 8 images that the 2 updates done did not train on: 1 update, then epoch 2's 3
    reports = work / "resumed_reports"
    reports.mkdir()
    resumed = ctx.run([sys.executable, trainer, *flags, "--output_dir", stopped, "--auto-resume"],
                      "two_ranks_resumed_as_one", extra_env={"GPU_CHECK_REPORT": str(reports)})
    expect("written by 2 process(es), this run has 1" in resumed.stdout,
           f"resuming 2 ranks' checkpoint on one process said nothing of it:\n{resumed.stdout[-1500:]}")
    alone_steps = [(r["steps"], len(r["updates"])) for r in _rank_reports(reports)]
    expect(alone_steps == [(16, 4)], f"resumed on one process, it trained (micro-batches, updates) {alone_steps}; "
                                     "expected (16, 4): the 4 of epoch 1's last update and epoch 2's 12")
    check_epochs(stopped, 3, "2 ranks resumed as 1")
    return {"backends": backends, "accumulation": accum, "test_images": 7,
            "stopped_at": {key: position[key] for key in ("epoch", "step", "updates")},
            "stand_in": "gloo on one GPU" if ctx.cuda and torch.cuda.device_count() < 2 else None}


# -- 8b. float16 with --clip-grad: unscaled before clipped ---------------------------------------------
def _grad_norm(model: torch.nn.Module) -> float:
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def fp16_clip_verdict(first: List[Any], second: List[Any], scale_ratio: float, clip: float) -> Optional[str]:
    """None when float16 training clipped unscaled gradients; else what is wrong. ``first`` and ``second``
    are (gradient norm when clipping began, norm after clipping) per update of two passes over the same
    batches, the loss scale of the first pass ``scale_ratio`` times the second's. Unscaled first, the norms
    at clipping do not follow the loss scale (their medians agree within 4x); clipped while still scaled,
    they differ by about ``scale_ratio``. Every norm above ``clip`` was cut to ``clip`` (1 % slack)."""
    finite = [[before for before, _ in records if np.isfinite(before)] for records in (first, second)]
    if min(len(f) for f in finite) < 2:
        return (f"too few updates with finite gradients ({len(finite[0])} and {len(finite[1])}): the loss scale "
                "overflows")
    clipped = [(before, after) for before, after in (*first, *second) if np.isfinite(before) and before > clip]
    if not clipped:
        return f"no gradient norm exceeded --clip-grad {clip}: the clip was not exercised"
    over = [(before, after) for before, after in clipped if after > clip * 1.01]
    if over:
        return f"gradients above --clip-grad {clip} were not clipped to it (norm before, after): {over[:3]}"
    ratio = float(np.median(finite[0]) / np.median(finite[1]))
    if not 0.25 < ratio < 4.0:
        return (f"the gradient norm at clipping followed the loss scale (ratio {ratio:.3g} for a scale ratio of "
                f"{scale_ratio:g}): the gradients were clipped before GradScaler.unscale_")
    return None


def check_fp16_clip(ctx: Context) -> Dict[str, Any]:
    """DeiT in float16 with GradScaler and ``--clip-grad 0.01`` (every update clipped), through
    ``Run.train_steps``; a subclass of the task reads the gradient norm as its public
    ``before_optimizer_step`` begins and after it clipped. 6 warm-up updates (the scale settles), 6 updates,
    the loss scale divided by 256 (``GradScaler.update(new_scale=...)``), the same 6 batches again:
    ``fp16_clip_verdict`` (clipped to the limit, and in unscaled units: the norms do not move with the
    scale); then the weights changed (the optimizer stepped), are finite, and the scale is finite and > 0.
    Not exercised on the CPU: float16 autocast with the GradScaler needs CUDA (the trainers train float16
    on GPUs only)."""
    if not ctx.cuda:
        raise NotExercised("float16 training with the GradScaler needs CUDA (the trainers refuse --amp-dtype "
                           "float16 on the CPU): unscale-before-clip was not checked")
    from ToE.common.lifecycle import Run
    from ToE.deit.main import parse_args
    from ToE.deit.trainer import DeiTTask

    clip = 0.01
    records: List[Any] = []

    class ClipProbe(DeiTTask):
        def before_optimizer_step(self, model):
            before = _grad_norm(model)
            norm = super().before_optimizer_step(model)
            records.append((before, _grad_norm(model)))
            return norm

    args = parse_args(["--data-path", str(ctx.images), *DEIT, "--device", ctx.dev_flag, "--amp-dtype", "float16",
                       "--clip-grad", str(clip), "--log-interval", "1000000", "--epochs", "3"])
    torch.manual_seed(0)
    run = Run(args, ClipProbe)
    task = run.task
    expect(run.scaler.is_enabled(), "float16: the run has no enabled GradScaler")
    run.toe.update_current_stage(0)
    plan = task.plan[0]
    batches = list(task.train_loader(0, plan, 0))
    initial = {k: v.detach().clone() for k, v in task.model.state_dict().items() if v.is_floating_point()}
    run.train_steps(0, plan, batches, 0, None)  # warm-up: early overflows halve the scale
    records.clear()
    scale_first = float(run.scaler.get_scale())
    run.train_steps(0, plan, batches, 0, None)
    first = list(records)
    records.clear()
    run.scaler.update(new_scale=float(run.scaler.get_scale()) / 256.0)
    scale_second = float(run.scaler.get_scale())
    run.train_steps(0, plan, batches, 0, None)
    second = list(records)
    verdict = fp16_clip_verdict(first, second, scale_first / scale_second, clip)
    expect(verdict is None, f"float16 + --clip-grad: {verdict}")
    state = task.model.state_dict()
    finite_weights(state, "float16 + --clip-grad: model")
    expect(any(not torch.equal(state[k], v) for k, v in initial.items()),
           "float16 + --clip-grad: the weights did not change (the optimizer never stepped)")
    scale = float(run.scaler.get_scale())
    expect(np.isfinite(scale) and scale > 0, f"float16 + --clip-grad: loss scale {scale}")
    return {"clip_grad": clip, "updates": len(first) + len(second), "loss_scales": [scale_first, scale_second],
            "grad_norm_medians": [float(np.median([b for b, _ in r if np.isfinite(b)])) for r in (first, second)],
            "final_scale": scale}


# -- 9. the speed table -------------------------------------------------------------------------------
def _timer(device: torch.device):
    """``time(fn, repeats)``: milliseconds per call; CUDA events on a GPU, perf_counter on the CPU."""

    def time_it(fn: Callable[[], Any], repeats: int) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / repeats
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - started) * 1000.0 / repeats

    return time_it


def _step_times(device: torch.device, fn: Callable[[], Any], steps: int) -> List[float]:
    """Milliseconds of each of ``steps`` calls of ``fn``: a pair of CUDA events around each call on a GPU
    (one synchronize at the end, so the calls queue as in training), perf_counter on the CPU."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        torch.cuda.synchronize(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def speed_verdict(full_ms: List[float], stage1_ms: List[float]) -> Optional[str]:
    """None when ToE's stage-1 step is faster than the full-token step (medians of the timed steps);
    else why the speed check fails (stage 1 as slow or slower, or no valid timing)."""
    if not full_ms or not stage1_ms:
        return f"no timed steps (full {len(full_ms)}, stage 1 {len(stage1_ms)})"
    if not all(np.isfinite(v) and v > 0 for v in [*full_ms, *stage1_ms]):
        return f"invalid step times: full {full_ms}, stage 1 {stage1_ms}"
    full, stage1 = float(np.median(full_ms)), float(np.median(stage1_ms))
    if stage1 >= full:
        return (f"ToE's stage-1 step ({stage1:.2f} ms, median of {len(stage1_ms)}) is not faster than the full-token "
                f"step ({full:.2f} ms, median of {len(full_ms)}): {full / stage1:.2f}x")
    return None


def check_speed(ctx: Context) -> Dict[str, Any]:
    """One training step (forward + backward + AdamW, bf16 autocast) of deit_small_patch16_224 at
    224 px, batch 256 (not launch-bound: each step is tens of milliseconds of GPU work), with ToE in stage 1
    (keep rate 0.5, seeds 0.25, k = 2) against a full-token step: each step timed by its own CUDA events,
    3 warm-up steps, then 2 interleaved rounds of 1 untimed and 5 timed steps per configuration; the medians decide, and
    the check FAILS when the stage-1 median is not below the full-token median (``speed_verdict``). The
    operator's own forward + backward on the block-0 output as a share of the stage-1 step.
    On the CPU the check is NOT EXERCISED (reported so, never passed): the same code runs as a smoke test on
    deit_small cut to 2 blocks, 96 wide, 32 px with 4 px patches (64 patch tokens), batch 4, float32, where
    per-call overhead, not token count, sets the time, so its timings say nothing of ToE's speed."""
    import timm

    import token_select

    device = ctx.device
    if ctx.cuda:
        name, kwargs, size, batch, amp, warmup, repeats = "deit_small_patch16_224", {}, 224, 256, torch.bfloat16, 3, 5
    else:
        name, kwargs, size, batch, amp, warmup, repeats = ("deit_small_patch16_224",
                                                          {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 96,
                                                           "num_heads": 2}, 32, 4,
                                                          None, 1, 2)
    if ctx.quick:
        warmup, repeats = 1, 3
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs).to(device).train()
    toe = token_select.attach(model, token_select.TokenSelect(expansion_step=[0, 1], keep_rate=[0.5, 1.0],
                                                              initialization_keep_rate=0.25))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    amp_context = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else (
        lambda: torch.autocast(device.type, enabled=False))

    def step() -> None:
        with amp_context():
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    time_it = _timer(device)
    times: Dict[str, List[float]] = {"full": [], "stage1": []}
    for epoch in (1, 0):  # warm-up, full tokens then stage 1: kernels, optimizer state, the operator's caches
        toe.update_current_stage(epoch)
        time_it(step, warmup)
    rounds = (("full", 1), ("stage1", 0)) * (2 if ctx.cuda and not ctx.quick else 1)  # interleaved: drift hits both
    for config, epoch in rounds:
        toe.update_current_stage(epoch)
        if ctx.cuda:
            time_it(step, 1)  # the first step after a stage change is not timed
        times[config] += _step_times(device, step, repeats)
    results = {config: float(np.median(values)) for config, values in times.items()}
    toe.update_current_stage(0)
    num_patches = model.patch_embed.num_patches
    kept = toe.kept_patch_tokens(num_patches)
    # the operator alone, on the block-0 output of these images (all tokens: the operator is off
    # while block 0 computes it, else its hook would already reduce them), forward + backward
    toe.update_current_stage(1)
    with torch.no_grad(), amp_context():
        block0 = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(images))))
    toe.update_current_stage(0)
    expect(block0.shape[1] == model.num_prefix_tokens + num_patches, f"block-0 output {tuple(block0.shape)}")
    block0 = block0.detach().requires_grad_(True)

    def operator_step() -> None:
        with amp_context():
            out, _ = toe.token_select(block0)
        out.float().sum().backward()

    time_it(operator_step, warmup)
    operator_ms = time_it(operator_step, repeats)
    expect(all(np.isfinite(v) and v > 0 for v in results.values()), f"step times {results}")
    table = {"model": name, "model_kwargs": kwargs, "input": size, "batch": batch,
             "amp": str(amp).replace("torch.", "") if amp else "float32", "timer": "CUDA events" if ctx.cuda else
             "perf_counter", "device": torch.cuda.get_device_name(device) if ctx.cuda else "cpu",
             "patch_tokens": num_patches, "stage1_kept_tokens": kept, "repeats": repeats,
             "timed_steps": {config: len(values) for config, values in times.items()}, "statistic": "median",
             "full_step_ms": results["full"], "stage1_step_ms": results["stage1"],
             "full_steps_ms": times["full"], "stage1_steps_ms": times["stage1"],
             "stage1_speedup": results["full"] / results["stage1"], "operator_ms": operator_ms,
             "operator_share_of_stage1": operator_ms / results["stage1"]}
    path = ctx.out / "speed.json"
    path.write_text(json.dumps(table, indent=2))
    ctx.speed = table
    print(f"  speed ({table['device']}, {name} {kwargs or ''} at {size} px, batch {batch}, {table['amp']}, "
          f"{table['timer']}):")
    print(f"    full-token step   {table['full_step_ms']:9.2f} ms")
    print(f"    stage-1 step      {table['stage1_step_ms']:9.2f} ms   ({kept} of {num_patches} patch tokens, "
          f"{table['stage1_speedup']:.2f}x)")
    print(f"    operator fwd+bwd  {operator_ms:9.2f} ms   ({100 * table['operator_share_of_stage1']:.1f} % of the "
          f"stage-1 step)")
    print(f"    written to {path}")
    detail = {"json": str(path), **{k: table[k] for k in ("full_step_ms", "stage1_step_ms", "stage1_speedup",
                                                         "operator_share_of_stage1")}}
    if not ctx.cuda:
        print("    (CPU: a smoke run of the timing code on a cut-down model, not a measurement)")
        raise NotExercised("the speed check needs CUDA: on the CPU only a smoke run of its timing code ran, on a "
                           "2-block model at batch 4 whose step time is per-call overhead, not token count, so "
                           "stage 1 against full tokens was not judged", detail)
    verdict = speed_verdict(times["full"], times["stage1"])
    expect(verdict is None, f"speed: {verdict} (deit_small, {size} px, batch {batch}; {path})")
    return detail


# -- the runner ---------------------------------------------------------------------------------------
CHECKS: Dict[str, Callable[[Context], Dict[str, Any]]] = {
    "operator": check_operator,
    "no_host_sync": check_no_host_sync,
    "no_host_sync_vpt": check_no_host_sync_vpt,
    "no_host_sync_lvvit": check_no_host_sync_lvvit,
    "no_host_sync_et": check_no_host_sync_et,
    "fp16_clip": check_fp16_clip,
    "deit_amp": check_deit_amp,
    "lvvit": check_lvvit,
    "efficienttrain": check_efficienttrain,
    "dali": check_dali,
    "no_host_sync_dali": check_no_host_sync_dali,
    "yolos": check_yolos,
    "nccl": check_nccl,
    "sigusr1": check_sigusr1,
    "two_ranks": check_two_ranks,
    "speed": check_speed,
}


SUMMARIES = {
    "operator": "TokenSelect on CUDA equals the CPU (kept indices, outputs, gradients), every distance, bf16/fp16",
    "no_host_sync": "20 training steps (Run.train_steps, bf16, ToE, EMA) under set_sync_debug_mode('error')",
    "no_host_sync_vpt": "--finetune onto another grid and class count, deep VPT: the step under the same detector",
    "no_host_sync_lvvit": "LV-ViT's step (token labels, MixToken, dense loss) under the same detector",
    "no_host_sync_et": "EfficientTrain's step (accumulation 2, per-update lr, low-pass view) under the detector",
    "fp16_clip": "float16 + GradScaler + --clip-grad: clipped in unscaled units, stepped, finite; CPU: not exercised",
    "deit_amp": "DeiT bf16 + EMA; DeiT fp16 (GradScaler) --stop-after-epochs, then --auto-resume",
    "lvvit": "LV-ViT with token labels from ToE.lvvit.generate_label and a tiny teacher",
    "efficienttrain": "EfficientTrain over two curriculum segments (24 -> 32 px), torch input",
    "dali": "EfficientTrain with DALI input on JPEGs (mixed decoder: nvJPEG); --dali require: missing DALI fails",
    "no_host_sync_dali": "DALI's training loader (outputs to torch, batch random erasing, labels) under the detector",
    "yolos": "YOLOS training and --eval on a tiny COCO layout",
    "nccl": "torchrun, a one-process NCCL (CPU: gloo) group and DDP through training and evaluation",
    "sigusr1": "SIGUSR1 mid-epoch: exit 3, mid-epoch checkpoint; --auto-resume finishes the run",
    "two_ranks": "2 ranks: no_sync with accumulation, uneven evaluation shards, a stop seen by one rank, resumed as 1",
    "speed": "deit_small 224 px batch 256 bf16: fails unless the stage-1 median step beats full tokens; CPU: not "
             "exercised",
}
SUBPROCESS_CHECKS = ("deit_amp", "lvvit", "efficienttrain", "dali", "yolos", "nccl", "sigusr1", "two_ranks")
STATUS_MARKS = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP", "not exercised": "N/A "}


def _run_check(name: str, ctx: Context) -> Dict[str, Any]:
    """Run one check; report it as passed, failed (with what went wrong) or skipped."""
    print(f"[run ] {name}", flush=True)
    started = time.perf_counter()
    entry: Dict[str, Any] = {"name": name}
    try:
        entry["detail"] = CHECKS[name](ctx)
        entry["status"] = "passed"
    except NotExercised as reason:
        entry["status"], entry["message"] = "not exercised", str(reason)
        if reason.detail:
            entry["detail"] = reason.detail
    except Skipped as reason:
        entry["status"], entry["message"] = "skipped", str(reason)
    except Exception as error:  # noqa: BLE001 - every failure is reported, the other checks still run
        entry["status"] = "failed"
        entry["message"] = str(error) if isinstance(error, CheckFailed) else \
            f"{error.__class__.__name__}: {error}\n{traceback.format_exc()}"
    finally:
        if ctx.cuda and name not in SUBPROCESS_CHECKS:
            torch.cuda.set_sync_debug_mode(0)
    entry["seconds"] = round(time.perf_counter() - started, 2)
    mark = STATUS_MARKS[entry["status"]]
    lines = [f"[{mark}] {name} ({entry['seconds']:.1f} s)"]
    if entry["status"] != "passed":
        lines.append("       " + entry["message"].replace("\n", "\n       "))
    if isinstance(entry.get("detail"), dict) and entry["detail"].get("note"):
        lines.append(f"       note: {entry['detail']['note']}")
    print("\n".join(lines), flush=True)
    return entry


def parse_args(argv=None) -> argparse.Namespace:
    from ToE.common.args import OneLineParser

    parser = OneLineParser(description="Check every CUDA path of this install (CPU stand-ins without a GPU)")
    parser.add_argument("--out", default=os.environ.get("TOE_GPU_CHECK_OUT", ""),
                        help="folder for the runs, logs and the JSON report (default: $TOE_GPU_CHECK_OUT, else a "
                             "new temporary folder)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", choices=list(CHECKS),
                        help=f"run only these checks ({', '.join(CHECKS)})")
    parser.add_argument("--skip", nargs="+", default=[], metavar="NAME", choices=list(CHECKS),
                        help="leave these checks out")
    parser.add_argument("--jobs", type=int, default=2,
                        help="trainer checks (subprocesses) run at a time (default: 2; 1 runs everything in turn)")
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats in the speed check")
    parser.add_argument("--dali", default="auto", choices=["auto", "require", "off"],
                        help="the dali check: auto runs it when DALI is importable and reports it skipped when "
                             "not; require fails it when DALI is missing; off leaves it out (default: auto)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give at least 1 (the trainer checks run that many at a time)")
    if not args.list and not [n for n in CHECKS if n in (args.only or CHECKS) and n not in args.skip]:
        parser.error("--only and --skip leave no check to run. Skip fewer checks")
    if not args.list and args.out:
        try:
            check_out_folder(Path(args.out))
        except ValueError as error:  # one line, as a trainer's user error (no usage text, no traceback)
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
    return args


# what gpu_check writes into its output folder (a folder holding only these is an earlier gpu_check's)
OUT_ENTRIES = ("data", "runs", "logs", "gpu_check.json", "speed.json")


def check_out_folder(out: Path) -> None:
    """A ValueError that names the problem and the fix when ``out`` cannot be gpu_check's output folder: a file,
    a folder that cannot be made or written, or a folder with other files (gpu_check replaces its own runs in
    OUT/runs, so it writes only into a new or empty folder, or an earlier gpu_check's)."""
    flag = f"--out {out}" + (" ($TOE_GPU_CHECK_OUT)" if os.environ.get("TOE_GPU_CHECK_OUT") == str(out) else "")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} is a file, not a folder. Pass a new folder for the runs, logs and report")
    if out.is_dir():
        others = sorted(entry.name for entry in out.iterdir() if entry.name not in OUT_ENTRIES)
        if others:
            raise ValueError(f"{flag} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) "
                             "and gpu_check writes data/, runs/ and logs/ into it. Pass a new or empty folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} cannot be written (no permission). Pass a folder you can write")
        return
    try:
        out.mkdir(parents=True)
    except OSError as error:  # a file on the way, no permission, a read-only disk
        raise ValueError(f"{flag} cannot be made ({error.strerror or error.__class__.__name__}: "
                         f"{error.filename or out}). Pass a folder you can write") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for name in CHECKS:
            print(f"{name:19s} {SUMMARIES[name]}")
        return 0
    from ToE.common.distributed import unusable_gpu

    problem = unusable_gpu()  # a GPU torch cannot use: the CPU stand-ins would pass and say nothing of it
    if problem:
        print(f"gpu_check FAILED: {problem}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="toe_gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    ctx = Context(out, args.quick, args.dali)
    random.seed(0)
    names = [n for n in CHECKS if n in (args.only or CHECKS) and n not in args.skip]
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        print(f"gpu_check: {torch.cuda.device_count()} GPU(s) visible; checking on {props.name} "
              f"({props.total_memory / 2 ** 30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"gpu_check: no GPU visible; the checks run on the CPU (torch {torch.__version__})")
    print(f"gpu_check: outputs in {out}", flush=True)
    report: Dict[str, Any] = {"cuda": ctx.cuda, "device": torch.cuda.get_device_name(0) if ctx.cuda else "cpu",
                              "torch": torch.__version__, "cuda_version": torch.version.cuda, "out": str(out),
                              "checks": []}
    # the data first: the checks that run side by side read it
    if set(names) - {"operator", "yolos", "speed"}:  # every other check reads the images
        _ = ctx.images
    if "yolos" in names:
        _ = ctx.coco
    started_all = time.perf_counter()
    entries: Dict[str, Dict[str, Any]] = {}
    # The trainer checks (subprocesses) run ``--jobs`` at a time in threads; the in-process checks
    # run one after the other in this thread meanwhile (the sync debug mode is this process's), and
    # the speed check runs last, alone.
    separate = [n for n in names if n in SUBPROCESS_CHECKS]
    here = [n for n in names if n not in SUBPROCESS_CHECKS and n != "speed"]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(_run_check, name, ctx) for name in separate]
        for name in here:
            entries[name] = _run_check(name, ctx)
        for name, future in zip(separate, futures):
            entries[name] = future.result()
    if "speed" in names:
        entries["speed"] = _run_check("speed", ctx)
    report["checks"] = [entries[name] for name in names]
    report["seconds"] = round(time.perf_counter() - started_all, 2)
    report["speed"] = ctx.speed
    failed = [c["name"] for c in report["checks"] if c["status"] == "failed"]
    report["passed"] = not failed
    report["cuda_exercised"] = ctx.cuda
    path = out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2, default=str))

    print("\ncheck               result          seconds")
    for entry in report["checks"]:
        print(f"{entry['name']:19s} {entry['status']:14s} {entry['seconds']:8.1f}")
    print(f"{'total':19s} {'passed' if not failed else 'FAILED':14s} {report['seconds']:8.1f}")
    print(f"report: {path}")
    unexercised = [c["name"] for c in report["checks"] if c["status"] == "not exercised"]
    if unexercised:
        print(f"not exercised (they need CUDA; not passed): {', '.join(unexercised)}")
    if not ctx.cuda:
        print(NO_CUDA)
    if failed:
        print(f"gpu_check FAILED: {', '.join(failed)}")
        return 1
    if ctx.cuda:
        print("gpu_check passed on " + report["device"] + (f" (not exercised: {', '.join(unexercised)})"
                                                          if unexercised else ""))
    else:  # the last line says it too: a CPU pass is not a GPU pass
        print(f"gpu_check passed on the CPU only ({NO_CUDA}; not exercised: {', '.join(unexercised) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
