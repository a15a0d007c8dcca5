"""Input-pipeline throughput: images per second per CPU core of the torch path and of DALI on the CPU,
and the CPU cores one GPU needs to feed deit_small in each ToE stage.

    python -m bench.loader                       # 3,000 photos, workers 1 and 2, 5 rounds
    python -m bench.loader --workers 1 --rounds 3
    python -m bench.loader --render              # measure nothing: rewrite loader.md from loader.json
    python -m bench.loader --quick --out DIR     # smoke run: 48 photos, batch 8, 1 round
    python -m bench.loader --before-after        # the DALI loader at HEAD against the working tree's

ToE's speedup exists only if the input pipeline keeps up with the faster model: stage 1 of the
DeiT-S recipe runs about 1.9x as many images per second through the GPU as full tokens, so it
asks that much more of the loader.

The images: a folder of ImageNet-sized JPEGs (``build_photo_folder``) made from the two real
photographs scikit-learn ships (china.jpg and flower.jpg, 427 x 640): each file a random crop
of one of them, resized to 500 x 375 (a fifth portrait, 375 x 500), flipped at random,
recoloured (per-channel gains and a gamma) and saved as JPEG at quality 90, as ImageNet's photos
are. A seeded generator per file makes the folder reproducible; it sits in ImageNet's layout
(train/<class>/) under data/photos and is reused while its manifest matches.

The augmentation is the DeiT recipe's at 224 px, built by the trainer's own code with the DeiT
trainer's default flags (random-resized crop 0.08-1, flip 0.5, RandAugment rand-m9-mstd0.5-inc1,
random erasing 0.25, normalisation): the torch path is ``ToE.common.data.build_train_transform``
in ``ToE.common.data.image_folder`` read by ``ToE.common.lifecycle.epoch_loader`` (the trainer's
DataLoader: PIL decode and augmentation in ``--num_workers`` worker processes); DALI is
``ToE.common.dali.train_loader`` with the CPU decoder and ``--num_workers`` pipeline threads.

Measurement: a configuration is (backend, workers). Each measurement builds a fresh loader,
reads ``--warmup`` batches untimed, then times the next ``--images`` images from the arrival of
the last warm-up batch to the arrival of the last timed one; it also counts the CPU seconds all
processes involved spent meanwhile (this process's threads, DALI's included, plus each DataLoader
worker's, from /proc). Rounds interleave the configurations, the order rotated each round, and at
one worker each backend is measured twice per round (A/A control: ``torch`` against ``torch#2``,
``dali`` against ``dali#2``), so the reader sees the noise of the measurement. This process runs
with one torch thread (DALI's random erasing on the batch and the copy out of DALI run here).

Per-core rate: images per CPU-second, i.e. the images one fully used core turns out (the rate with
one worker is also given; on a machine shared with other jobs it is lower, since the worker does
not always get its core). CPU cores one GPU needs = GPU images/s x stage speedup / per-core rate,
where the GPU images/s are assumptions (``GPU_ASSUMPTIONS``, not measured here) and the stage
speedups the FLOP model's (``token_select.vit_step_flops``) for the published deit_small schedule
(ToE/deit/configs/imagenet_small.yaml), i.e. assuming the GPU realises the FLOP speedup.
Results go to ``bench/results/loader.{md,json}``.

``--before-after`` measures only the DALI loader, as the trainer uses it, before and after issue 32:
``ToE/common/dali.py`` at ``--before-ref`` (imported from ``git show``: a new pipeline per epoch, files
read one after another in the training thread) against the working tree's (one ``TrainLoader`` per
run, files read ahead). A measurement is one run of ``--epochs`` epochs, each with another sample
order and seed; per epoch it records the start cost (wall and CPU seconds from asking for the
epoch to its first batch) and the rate of the batches after ``--warmup`` more (images per second
and per CPU-second of this process, which holds DALI's threads and the reader threads). Each loader
is measured twice per round (A/A), the order rotated per round; the section is added to
``loader.json`` and ``loader.md`` with the other measurements kept as they are.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from bench.common import ROOT, describe_machine, git_commit, load_average, paired_ratios, recipe, rotated

__all__ = ["PHOTO_ROOT", "GPU_ASSUMPTIONS", "build_photo_folder", "photo_manifest", "stage_speedups",
           "cores_needed", "summarise", "format_markdown", "measure", "main"]

RESULTS = os.path.join(ROOT, "bench", "results")
PHOTO_ROOT = os.path.join(ROOT, "data", "photos")
RECIPE = os.path.join(ROOT, "ToE", "deit", "configs", "imagenet_small.yaml")
# the defaults of the flags that --before-after measures with other values
MAIN_DEFAULTS = {"photos": 3000, "photo_root": PHOTO_ROOT, "batch_size": 64, "warmup": 2, "timed": 10, "rounds": 5}
BEFORE_AFTER_DEFAULTS = {"photos": 400, "photo_root": os.path.join(ROOT, "data", "photos_before_after"),
                         "batch_size": 32, "warmup": 1, "timed": 6, "rounds": 3}

# GPU training throughput of deit_small_patch16_224 with full tokens, images/s: assumptions, not
# measurements of this bench. The RTX 3090 figure is timm's published training benchmark
# (results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv in huggingface/pytorch-image-models:
# 1053.64 images/s, batch 384, AMP, PyTorch 1.12, CUDA 11.3); the H100 figure is an estimate
# (about 3.3x the 3090 for a small ViT with bf16), to be replaced by a measurement.
GPU_ASSUMPTIONS = [
    {"gpu": "RTX 3090", "images_per_s": 1053.64,
     "source": "timm's published training benchmark (AMP, batch 384, PyTorch 1.12 / CUDA 11.3)"},
    {"gpu": "H100", "images_per_s": 3500.0, "source": "an estimate (not a published or measured figure)"},
]


# ---------------------------------------------------------------------------------------------
# the photo folder
# ---------------------------------------------------------------------------------------------
def photo_manifest(count: int, classes: int, seed: int, size: Sequence[int] = (500, 375), quality: int = 90,
                   portrait: float = 0.2) -> Dict[str, object]:
    """What a photo folder is made of; a folder whose manifest.json equals this is reused."""
    return {"source": "sklearn.datasets.load_sample_images (china.jpg, flower.jpg)", "count": int(count),
            "classes": int(classes), "seed": int(seed), "size": [int(size[0]), int(size[1])],
            "quality": int(quality), "portrait": float(portrait), "version": 1}


def _photo(sources: Sequence[np.ndarray], index: int, manifest: Dict[str, object]):
    """The ``index``-th photo: a PIL image drawn from its own generator (seed, index)."""
    from PIL import Image

    rng = np.random.default_rng([manifest["seed"], index])
    source = sources[int(rng.integers(len(sources)))]
    width, height = manifest["size"]
    if rng.random() < manifest["portrait"]:
        width, height = height, width
    src_h, src_w = source.shape[:2]
    # the largest crop of the output's aspect that fits, scaled to 40-100 % of its area
    scale = min(src_w / width, src_h / height) * float(np.sqrt(rng.uniform(0.4, 1.0)))
    crop_w, crop_h = int(width * scale), int(height * scale)
    left, top = int(rng.integers(0, src_w - crop_w + 1)), int(rng.integers(0, src_h - crop_h + 1))
    image = Image.fromarray(source[top:top + crop_h, left:left + crop_w]).resize((width, height),
                                                                                 Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # recolour: per-channel gain, one gamma, as a lookup table per channel
    gains, gamma = rng.uniform(0.75, 1.25, size=3), rng.uniform(0.7, 1.4)
    levels = np.arange(256) / 255.0
    table = np.concatenate([np.clip(levels * gain, 0.0, 1.0) ** gamma for gain in gains])
    return image.point([int(v * 255.0 + 0.5) for v in table])


def build_photo_folder(root: str = PHOTO_ROOT, count: int = 3000, classes: int = 4, seed: int = 0,
                       log=print) -> List[str]:
    """ImageNet-layout JPEGs (``root/train/class_<k>/photo_<i>.jpg``, photo i in class i mod classes)
    made from scikit-learn's sample photos (module doc); the paths, in index order. Reused when
    ``root/manifest.json`` says it holds the same photos."""
    from sklearn.datasets import load_sample_images

    manifest = photo_manifest(count, classes, seed)
    paths = [os.path.join(root, "train", f"class_{i % classes}", f"photo_{i:05d}.jpg") for i in range(count)]
    manifest_path = os.path.join(root, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as handle:
            if json.load(handle) == manifest and all(os.path.isfile(p) for p in paths):
                return paths
        shutil.rmtree(os.path.join(root, "train"), ignore_errors=True)  # another folder of ours: remade
    elif os.path.isdir(os.path.join(root, "train")) and os.listdir(os.path.join(root, "train")):
        raise SystemExit(f"{root}/train exists without a manifest.json of bench.loader: not overwritten. "
                         "Pass another --photos folder")
    log(f"[bench] writing {count} photos to {root}")
    sources = list(load_sample_images().images)
    for k in range(classes):
        os.makedirs(os.path.join(root, "train", f"class_{k}"), exist_ok=True)
    for index, path in enumerate(paths):
        _photo(sources, index, manifest).save(path, format="JPEG", quality=manifest["quality"])
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle, indent=2)
    return paths


# ---------------------------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------------------------
def stage_speedups(recipe_file: str = RECIPE) -> Dict[str, object]:
    """FLOP-ideal step speedup of each ToE stage of a recipe (``token_select.vit_step_flops`` on the
    recipe's model), and of the whole run with its epochs per stage."""
    import token_select
    from ToE.flops import analytic_step_flops, create_model, model_shape

    values = recipe("deit", recipe_file)
    with torch.device("meta"):  # the shape only: no weights initialised
        shape = model_shape(create_model(values["model"], int(values.get("input_size") or 224)))
    kept = token_select.kept_tokens_per_stage(shape["num_patches"], values["keep_rate"],
                                              values["initialization_keep_rate"], values["expansion_multiple_stage"])
    full = analytic_step_flops(shape)
    steps, epochs = list(values["expansion_step"]), int(values["epochs"])
    stages = []
    for stage, kept_patches in enumerate(kept, start=1):
        first = steps[stage - 1]
        last = steps[stage] if stage < len(steps) else epochs
        stages.append({"stage": stage, "keep_rate": values["keep_rate"][stage - 1], "kept_patches": kept_patches,
                       "epochs": last - first, "speedup": full / analytic_step_flops(shape, kept_patches)})
    run = epochs / sum(s["epochs"] / s["speedup"] for s in stages)
    return {"recipe": os.path.relpath(recipe_file, ROOT), "model": values["model"],
            "num_patches": shape["num_patches"], "stages": stages, "run_speedup": run}


def cores_needed(gpu_images_per_s: float, speedup: float, per_core_rate: float) -> float:
    """CPU cores that keep one GPU fed: the GPU's full-token images/s x the stage's speedup, over the
    images one core prepares per second."""
    if per_core_rate <= 0:
        raise ValueError(f"per-core rate must be positive, got {per_core_rate}")
    return gpu_images_per_s * speedup / per_core_rate


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _process_cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds of process ``pid`` so far (/proc/PID/stat), None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return None


def _cpu_seconds(worker_pids: Sequence[int]) -> Optional[float]:
    """CPU seconds of this process (all its threads) plus the given worker processes."""
    total = time.process_time()
    for pid in worker_pids:
        seconds = _process_cpu_seconds(pid)
        if seconds is None:
            return None
        total += seconds
    return total


class _Order(torch.utils.data.Sampler):
    """A fixed list of indices, with the ``set_epoch`` that ``epoch_loader`` calls."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def trainer_args(workers: int):
    """The DeiT trainer's flags at their defaults (the recipe's augmentation), ``--num_workers workers``."""
    from ToE.deit.main import parse_args

    return parse_args(["--num_workers", str(workers)])


def _time_batches(iterator, warmup: int, timed: int, batch: int, worker_pids) -> Dict[str, object]:
    for _ in range(warmup):
        next(iterator)
    pids = worker_pids()
    start, cpu_start = time.perf_counter(), _cpu_seconds(pids)
    for _ in range(timed):
        images, _targets = next(iterator)
        assert images.shape[0] == batch
    wall = time.perf_counter() - start
    cpu_end = _cpu_seconds(pids)
    cpu = None if cpu_start is None or cpu_end is None else cpu_end - cpu_start
    return {"images": timed * batch, "wall_s": wall, "cpu_s": cpu}


def measure(backend: str, workers: int, samples, indices: Sequence[int], batch: int, warmup: int, timed: int,
            seed: int) -> Dict[str, object]:
    """One measurement of ``backend`` (torch or dali) with ``workers`` workers/threads: images,
    wall seconds and CPU seconds of ``timed`` batches after ``warmup`` untimed ones."""
    args = trainer_args(workers)
    order = list(indices)[:(warmup + timed) * batch]
    if backend == "torch":
        from ToE.common.data import image_folder
        from ToE.common.data import epoch_loader
        from ToE.common.data import build_train_transform

        transform = build_train_transform(
            args.input_size, auto_augment=args.aa, color_jitter=args.color_jitter,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
            scale=tuple(args.scale), hflip=args.hflip)  # as ClassificationTask.train_transform
        dataset = image_folder(samples, "train", transform)
        torch.manual_seed(seed)
        loader = epoch_loader(dataset, _Order(order), 0, SimpleNamespace(batch=batch), 0, num_workers=workers,
                              pin_memory=False, persistent_workers=False)
        iterator = iter(loader)
        try:
            return _time_batches(iterator, warmup, timed, batch,
                                 lambda: [w.pid for w in getattr(iterator, "_workers", [])])
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown:
                shutdown()
    if backend == "dali":
        from ToE.common import dali
        from ToE.common.data import image_folder

        dataset = image_folder(samples, "train")
        loader = dali.train_loader(dataset.samples, order, batch, args.input_size, args, args.aa,
                                   torch.device("cpu"), seed)
        try:
            return _time_batches(iter(loader), warmup, timed, batch, lambda: [])
        finally:
            del loader
    raise ValueError(f"unknown backend {backend!r}")


def config_name(backend: str, workers: int, repeat: int = 1) -> str:
    return f"{backend}/{workers}" + (f"#{repeat}" if repeat > 1 else "")


def configurations(backends: Sequence[str], workers: Sequence[int]) -> List[Dict[str, object]]:
    """Every (backend, workers); at the fewest workers each backend twice (the A/A control)."""
    configs = []
    for count in workers:
        for backend in backends:
            configs.append({"name": config_name(backend, count), "backend": backend, "workers": count})
            if count == min(workers):
                configs.append({"name": config_name(backend, count, 2), "backend": backend, "workers": count,
                                "aa_of": config_name(backend, count)})
    return configs


# ---------------------------------------------------------------------------------------------
# the DALI loader before and after issue 32: per-epoch start cost and images per CPU-second
# ---------------------------------------------------------------------------------------------
BEFORE_AFTER = ("before", "after")


def dali_before(ref: str = "HEAD"):
    """``ToE/common/dali.py`` as committed at ``ref`` (the loader that built a pipeline per epoch), imported
    as a module of ``ToE.common`` from a temporary file; (module, the commit's short hash)."""
    import importlib.util
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    commit = git("rev-parse", "--short", ref).strip()
    source = git("show", f"{commit}:ToE/common/dali.py")
    with open(os.path.join(ROOT, "ToE", "common", "dali.py")) as handle:
        if handle.read() == source:
            raise SystemExit(f"ToE/common/dali.py at {commit} is the working tree's: nothing to compare. Pass "
                             "--before-ref with the commit before the one-pipeline loader")
    folder = tempfile.mkdtemp(prefix="toe_dali_before_")  # kept while the process runs: DALI reads the source
    atexit.register(shutil.rmtree, folder, True)  # of the graph functions (its conditionals) at every build
    path = os.path.join(folder, f"dali_{commit}.py")
    with open(path, "w") as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location(f"ToE.common._dali_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its relative imports resolve in ToE.common
    return module, commit


def measure_epochs(version: str, before, samples, orders: Sequence[Sequence[int]], seeds: Sequence[int], batch: int,
                   warmup: int, workers: int) -> Dict[str, object]:
    """One run of ``len(orders)`` epochs with the DALI loader ``version`` ("before": ``before.train_loader``
    builds each epoch's pipeline, as the trainer did; "after": one ``TrainLoader`` asked for each epoch, as
    the trainer does now), CPU decoder: per epoch the wall and CPU seconds from asking for the epoch to its
    first batch (the start cost), and of its batches after ``warmup`` more (the steady rate). CPU seconds
    are this process's (DALI's threads and the reader threads run in it)."""
    from ToE.common import dali

    args = trainer_args(workers)
    device = torch.device("cpu")
    loader = dali.TrainLoader(samples, args.input_size, args, device, max_batch=batch) if version == "after" else None
    built = dali.BUILDS["train"]
    epochs = []
    for order, seed in zip(orders, seeds):
        wall, cpu = time.perf_counter(), time.process_time()
        if loader is None:
            batches = before.train_loader(samples, order, batch, args.input_size, args, args.aa, device, seed)
        else:
            batches = loader.epoch(order, batch, args.aa, seed)
        iterator = iter(batches)
        next(iterator)
        start_s, start_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        for _ in range(warmup):
            next(iterator)
        wall, cpu, images = time.perf_counter(), time.process_time(), 0
        for images_batch, _ in iterator:
            images += images_batch.shape[0]
        epochs.append({"start_s": start_s, "start_cpu_s": start_cpu_s, "images": images,
                       "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})
        del iterator, batches
    return {"epochs": epochs, "pipelines_built": (dali.BUILDS["train"] - built) if loader is not None else len(orders),
            "load": load_average()}


def before_after_configs() -> List[Dict[str, object]]:
    """before, before#2, after, after#2: each loader twice per round (the A/A control)."""
    return [{"name": name + suffix, "version": name, **({"aa_of": name} if suffix else {})}
            for name in BEFORE_AFTER for suffix in ("", "#2")]


def run_before_after(args, log=print) -> Dict[str, object]:
    """The measurements of ``--before-after`` (rounds of every configuration, the order rotated per round)."""
    import PIL

    from ToE.common.data import image_folder

    before, commit = dali_before(args.before_ref)
    load_before = load_average()
    torch.set_num_threads(1)
    build_photo_folder(args.photo_root, args.photos, args.classes)
    samples = image_folder(args.photo_root, "train").samples
    per_epoch = (1 + args.warmup + args.timed) * args.batch_size
    if per_epoch > len(samples):
        raise SystemExit(f"{per_epoch} images per epoch but --photos {len(samples)}")
    configs = before_after_configs()
    # untimed: the first pipeline a process builds pays one-time costs (DALI's conditionals, imports) that
    # would fall on whichever loader came first
    for version in BEFORE_AFTER:
        measure_epochs(version, before, samples, [list(range((1 + args.warmup) * args.batch_size))], [0],
                       args.batch_size, args.warmup, args.workers[0])
    rounds = []
    for index in range(args.rounds):
        rng = np.random.default_rng(index)
        orders = [[int(i) for i in rng.permutation(len(samples))[:per_epoch]] for _ in range(args.epochs)]
        seeds = [int(s) for s in rng.integers(2 ** 31, size=args.epochs)]
        measurements = []
        for name in rotated([c["name"] for c in configs], index):
            version = next(c["version"] for c in configs if c["name"] == name)
            result = measure_epochs(version, before, samples, orders, seeds, args.batch_size, args.warmup,
                                    args.workers[0])
            measurements.append({"config": name, **result})
            log(f"[bench] round {index + 1}/{args.rounds} {name}: start " + ", ".join(
                f"{e['start_s']:.2f}" for e in result["epochs"]) + " s, " + ", ".join(
                f"{e['images'] / e['cpu_s']:.0f}" for e in result["epochs"]) + " images per CPU-second", flush=True)
        rounds.append({"order": [m["config"] for m in measurements], "measurements": measurements})
    return {"machine": describe_machine(), "commit": git_commit(), "before_commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(["python -m bench.loader", *args.argv]),
            "load": {"before": load_before, "after": load_average()}, "pillow_version": PIL.__version__,
            "params": {"photos": len(samples), "photo_root": _shown(args.photo_root), "batch": args.batch_size,
                       "epochs": args.epochs, "warmup": args.warmup, "timed": args.timed, "workers": args.workers[0],
                       "torch_threads_main": 1},
            "configs": configs, "rounds": rounds}


def summarise_before_after(section: Dict[str, object]) -> Dict[str, object]:
    """Per configuration: the start cost of a run's first epoch and of its later ones (medians over rounds,
    and over epochs), the steady images per CPU-second and per second; paired per round, the A/A ratios
    and after / before."""
    def runs(name: str) -> List[Dict[str, object]]:
        return [m for r in section["rounds"] for m in r["measurements"] if m["config"] == name]

    def per_round(name: str, key: str) -> List[float]:
        return [_run_figures(m)[key] for m in runs(name)]

    for config in section["configs"]:
        figures = [_run_figures(m) for m in runs(config["name"])]
        for key in ("first_start_s", "later_start_s", "later_start_cpu_s", "images_per_cpu_s", "images_per_s"):
            config[key] = _spread([f[key] for f in figures if f[key] is not None]) \
                if any(f[key] is not None for f in figures) else None
        config["pipelines_built"] = statistics.median(m["pipelines_built"] for m in runs(config["name"]))

    def paired(first: str, second: str) -> Dict[str, object]:
        pair = {"configs": [first, second]}
        for key in ("later_start_s", "images_per_cpu_s"):
            ratios = paired_ratios(per_round(second, key), per_round(first, key))
            pair[key] = {"ratios": ratios, "median": statistics.median(ratios),
                         "max_deviation": max(abs(1.0 - r) for r in ratios)}
        return pair

    section["aa_controls"] = [paired(c["aa_of"], c["name"]) for c in section["configs"] if "aa_of" in c]
    section["after_vs_before"] = paired("before", "after")
    return section


def _run_figures(run: Dict[str, object]) -> Dict[str, Optional[float]]:
    epochs = run["epochs"]
    later = epochs[1:]
    images, cpu, wall = (sum(e[k] for e in epochs) for k in ("images", "cpu_s", "wall_s"))
    return {"first_start_s": epochs[0]["start_s"],
            "later_start_s": statistics.median(e["start_s"] for e in later) if later else None,
            "later_start_cpu_s": statistics.median(e["start_cpu_s"] for e in later) if later else None,
            "images_per_cpu_s": images / cpu, "images_per_s": images / wall}


def format_before_after(section: Dict[str, object]) -> List[str]:
    """The markdown lines of the before/after section."""
    p, load, machine = section["params"], section["load"], section["machine"]
    lines = ["", "## The DALI loader before and after issue 32 (one pipeline per run, files read ahead)", "",
             f"Command: `{section['command']}` (commit {section.get('commit') or 'not recorded'}, {section['date']}; "
             f"before = ToE/common/dali.py at {section['before_commit']}, imported from `git show`). Machine: "
             f"{machine['cpu_model']}, {machine['cpu_count']} cores, shared with other jobs: load average "
             f"{load['before']} before and {load['after']} after (1, 5, 15 min). DALI's CPU decoder, "
             f"{p['workers']} DALI thread(s), one torch thread; {p['photos']} of the photo JPEGs above "
             f"({p['photo_root']}). Each measurement is one run of {p['epochs']} epochs of "
             f"{1 + p['warmup'] + p['timed']} batches of {p['batch']} (the DeiT recipe's augmentation at 224 px: "
             "RandAugment, random erasing 0.25), another order and seed per epoch. Start cost: seconds from "
             "asking for an epoch (the trainer's `_dali_loader`) to its first batch; the first epoch of a run "
             f"builds the pipeline in both. Rate: the {p['timed']} batches after {p['warmup']} more, images per "
             "CPU-second of this process (DALI's and the reader threads included). Medians over "
             f"{len(section['rounds'])} rounds (min - max); later epochs: median over epochs 2-{p['epochs']}. One run "
             "of each loader before the rounds, untimed, takes the process's one-time costs.", "",
             "| loader | first epoch: s to first batch | later epochs: s to first batch | later epochs: CPU-s "
             "to first batch | images per CPU-second | images/s | pipelines built per run |",
             "|---|---|---|---|---|---|---|"]

    def cell(spread: Optional[Dict[str, float]], digits: int) -> str:
        if not spread:
            return "n/a"
        return f"{spread['median']:.{digits}f} ({spread['min']:.{digits}f} - {spread['max']:.{digits}f})"

    for c in section["configs"]:
        lines.append(f"| {c['name']} | {cell(c['first_start_s'], 2)} | {cell(c['later_start_s'], 3)} | "
                     f"{cell(c['later_start_cpu_s'], 3)} | {cell(c['images_per_cpu_s'], 1)} | "
                     f"{cell(c['images_per_s'], 1)} | {c['pipelines_built']:g} |")

    def ratio_text(pair: Dict[str, object]) -> str:
        parts = []
        for key, what in (("later_start_s", "later epochs' start cost"), ("images_per_cpu_s", "images per CPU-second")):
            r = pair[key]
            parts.append(f"{what} ratio median {r['median']:.3f}, rounds {min(r['ratios']):.3f} to "
                         f"{max(r['ratios']):.3f} (largest |1 - ratio| {r['max_deviation']:.3f})")
        return "; ".join(parts)

    lines.append("")
    for aa in section["aa_controls"]:
        lines += [f"A/A control, {aa['configs'][1]} / {aa['configs'][0]} (the same loader twice per round, paired by "
                  f"round): {ratio_text(aa)}.", ""]
    lines += [f"After / before, paired by round: {ratio_text(section['after_vs_before'])}. A ratio inside its A/A "
              "band cannot be told from noise.", "",
              "The first table's DALI rows were measured before this change (commit "
              f"{section['before_commit']}'s loader, a fresh pipeline per measurement, timed after warm-up: the "
              "steady rate, not the start cost)."]
    return lines


# ---------------------------------------------------------------------------------------------
# summary and report
# ---------------------------------------------------------------------------------------------
def _spread(values: Sequence[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(results: Dict[str, object]) -> Dict[str, object]:
    """Fill in the figures derived from the measurements (``main`` and ``--render``): per configuration
    the spread of its rates, per A/A pair the paired ratios, per backend the per-core rate and the
    cores per GPU per stage; and the DALI before/after section's (``summarise_before_after``)."""
    if "dali_before_after" in results:
        summarise_before_after(results["dali_before_after"])
    if "configs" not in results:  # the before/after section alone
        return results
    configs = results["configs"]
    for config in configs:
        runs = [m for r in results["rounds"] for m in r["measurements"] if m["config"] == config["name"]]
        config["images_per_s"] = _spread([m["images"] / m["wall_s"] for m in runs])
        config["images_per_s_per_worker"] = {k: v / config["workers"] for k, v in config["images_per_s"].items()}
        cpu = [m["images"] / m["cpu_s"] for m in runs if m.get("cpu_s")]
        config["images_per_cpu_s"] = _spread(cpu) if cpu else None
        config["cpu_cores_busy"] = statistics.median([m["cpu_s"] / m["wall_s"] for m in runs if m.get("cpu_s")]) \
            if cpu else None

    def rates(name: str, per: str = "wall_s") -> List[float]:
        return [next(m["images"] / m[per] for m in r["measurements"] if m["config"] == name)
                for r in results["rounds"]]

    def paired(first: str, second: str) -> Dict[str, object]:
        """Paired per-round ratios second / first of images/s and of images per CPU-second."""
        pair = {"configs": [first, second]}
        for key, per in (("", "wall_s"), ("cpu_", "cpu_s")):
            if per == "cpu_s" and not all(m.get("cpu_s") for r in results["rounds"] for m in r["measurements"]):
                continue
            ratios = paired_ratios(rates(second, per), rates(first, per))
            pair.update({key + "ratios": ratios, key + "median": statistics.median(ratios),
                         key + "max_deviation": max(abs(1.0 - r) for r in ratios)})
        return pair

    results["aa_controls"] = [paired(c["aa_of"], c["name"]) for c in configs if "aa_of" in c]
    fewest = min(c["workers"] for c in configs)
    backends = sorted({c["backend"] for c in configs}, key=["torch", "dali"].index)
    if {"torch", "dali"} <= set(backends):
        results["dali_vs_torch"] = {"workers": fewest, **paired(config_name("torch", fewest),
                                                                config_name("dali", fewest))}
    per_core = {}
    for backend in backends:
        single = [c for c in configs if c["backend"] == backend and c["workers"] == fewest]
        cpu = [m["images"] / m["cpu_s"] for r in results["rounds"] for m in r["measurements"]
               if m.get("cpu_s") and any(m["config"] == c["name"] for c in single)]
        wall = [m["images"] / m["wall_s"] / fewest for r in results["rounds"] for m in r["measurements"]
                if any(m["config"] == c["name"] for c in single)]
        per_core[backend] = {"images_per_cpu_s": statistics.median(cpu) if cpu else None,
                             "images_per_s_per_worker": statistics.median(wall), "workers": fewest}
    results["per_core"] = per_core
    speed = results["stage_speedups"]
    table = []
    for gpu in results["gpu_assumptions"]:
        for stage in [*speed["stages"], {"stage": "run", "speedup": speed["run_speedup"]}]:
            row = {"gpu": gpu["gpu"], "stage": stage["stage"], "speedup": stage["speedup"],
                   "gpu_images_per_s": gpu["images_per_s"] * stage["speedup"]}
            for backend, rate in per_core.items():
                basis = rate["images_per_cpu_s"] or rate["images_per_s_per_worker"]
                row[backend] = cores_needed(gpu["images_per_s"], stage["speedup"], basis)
            table.append(row)
    results["cores_per_gpu"] = table
    return results


def format_markdown(results: Dict[str, object]) -> str:
    if "configs" not in results:  # the before/after section alone
        return "\n".join(["# The DALI loader before and after", *format_before_after(results["dali_before_after"])[2:]]
                         ) + "\n"
    machine = results["machine"]
    load = results.get("load", {})
    p = results["params"]
    lines = [
        "# Input pipeline: images per second per CPU core, and CPU cores per GPU for deit_small with ToE", "",
        f"Command: `{results['command']}` (commit {results.get('commit') or 'not recorded'}, {results['date']}). "
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores (vCPUs), {machine.get('memory_gib')} GiB, "
        f"torch {machine['torch']}, timm {machine.get('timm', '?')}, DALI {results.get('dali_version') or 'absent'}, "
        f"Pillow {results.get('pillow_version', '?')}; no GPU (DALI ran its CPU decoder). The machine was shared "
        f"with other jobs: load average {load.get('before', '?')} before and {load.get('after', '?')} after "
        "(1, 5, 15 min), so rates measured here are lower bounds of what a dedicated core does. The CPU-second "
        "rates are much less affected than the wall-clock ones (a worker waiting for a core spends no CPU "
        "time), though a core shared with other jobs (caches, SMT siblings) still lowers them.", "",
        f"Images: {p['photos']} JPEGs of 500 x 375 (a fifth 375 x 500), quality 90, made from scikit-learn's "
        f"two sample photographs (random crop, flip, recolour; seed {p['photo_seed']}), in {p['photo_root']}. "
        "Augmentation: the DeiT recipe at 224 px with the trainer's own code (random-resized crop 0.08-1, flip, "
        "RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, normalisation). Each measurement: a fresh loader, "
        f"batch {p['batch']}, {p['warmup']} warm-up batches, then {p['timed']} timed batches "
        f"({p['timed'] * p['batch']} images); {len(results['rounds'])} rounds, the configurations interleaved "
        "in an order rotated each round. Workers: DataLoader worker processes (torch) or DALI pipeline threads.",
        "", "| configuration | images/s (median) | min - max over rounds | images/s per worker | "
            "images per CPU-second | CPU cores busy |", "|---|---|---|---|---|---|"]
    for c in results["configs"]:
        r, cpu, busy = c["images_per_s"], c.get("images_per_cpu_s"), c.get("cpu_cores_busy")
        lines.append(f"| {c['name']} | {r['median']:.1f} | {r['min']:.1f} - {r['max']:.1f} | "
                     f"{c['images_per_s_per_worker']['median']:.1f} | "
                     + (f"{cpu['median']:.1f} ({cpu['min']:.1f} - {cpu['max']:.1f})" if cpu else "n/a") + " | "
                     + (f"{busy:.2f}" if busy is not None else "n/a") + " |")
    lines.append("")
    def pair_text(pair: Dict[str, object]) -> str:
        text = (f"images/s ratio median {pair['median']:.3f}, rounds {min(pair['ratios']):.3f} to "
                f"{max(pair['ratios']):.3f} (largest |1 - ratio| {pair['max_deviation']:.3f})")
        if "cpu_ratios" in pair:
            text += (f"; images per CPU-second ratio median {pair['cpu_median']:.3f}, rounds "
                     f"{min(pair['cpu_ratios']):.3f} to {max(pair['cpu_ratios']):.3f} (largest |1 - ratio| "
                     f"{pair['cpu_max_deviation']:.3f})")
        return text

    for aa in results["aa_controls"]:
        lines += [f"A/A control, {aa['configs'][1]} / {aa['configs'][0]} (the same configuration twice per round, "
                  f"paired by round): {pair_text(aa)}.", ""]
    if "dali_vs_torch" in results:
        d = results["dali_vs_torch"]
        lines += [f"DALI (CPU) / torch at {d['workers']} worker(s), paired by round: {pair_text(d)}. A ratio "
                  "inside its A/A band cannot be told from noise.", ""]
    lines.append("")
    per_core = results["per_core"]
    lines.append("Per-core rate (the basis of the table below): " + "; ".join(
        f"{b} {v['images_per_cpu_s']:.1f} images per CPU-second ({v['images_per_s_per_worker']:.1f} images/s "
        f"with {v['workers']} worker)" if v["images_per_cpu_s"] else
        f"{b} {v['images_per_s_per_worker']:.1f} images/s per worker" for b, v in per_core.items()) + ".")
    speed = results["stage_speedups"]
    lines += ["", f"Stage speedups: the FLOP model (token_select.vit_step_flops) for {speed['model']} on the "
                  f"published schedule ({speed['recipe']}): " + ", ".join(
                      f"stage {s['stage']} (keep {s['keep_rate']}, {s['kept_patches']} of {speed['num_patches']} "
                      f"patches, {s['epochs']} epochs) {s['speedup']:.3f}x" for s in speed["stages"])
              + f"; whole run {speed['run_speedup']:.3f}x. Assumed: the GPU realises the FLOP speedup.", ""]
    lines.append("GPU throughput, full tokens (assumptions, not measured here): " + "; ".join(
        f"{g['gpu']} {g['images_per_s']:.0f} images/s ({g['source']})" for g in results["gpu_assumptions"]) + ".")
    backends = list(per_core)
    lines += ["", "CPU cores one GPU needs to keep deit_small fed = GPU images/s x stage speedup / per-core rate "
                  "(cores of this machine's kind; 'run' = the whole 300-epoch run's average):", "",
              "| GPU | stage | speedup | images/s to feed | " + " | ".join(f"cores, {b}" for b in backends) + " |",
              "|---|---|---|---|" + "---|" * len(backends)]
    for row in results["cores_per_gpu"]:
        lines.append(f"| {row['gpu']} | {row['stage']} | {row['speedup']:.3f}x | {row['gpu_images_per_s']:.0f} | "
                     + " | ".join(f"{row[b]:.1f}" for b in backends) + " |")
    lines += ["", "DALI here is its CPU fallback. On a GPU node DALI decodes with nvJPEG on the GPU (\"mixed\") "
                  "and augments there, so it needs far fewer cores than this table's DALI column; that was not "
                  "measured (no GPU)."]
    if "dali_before_after" in results:
        lines += format_before_after(results["dali_before_after"])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--photos", type=int, default=None, help="JPEGs in the photo folder (default: 3000; "
                                                                  "400 with --before-after)")
    parser.add_argument("--photo-root", default=None, help="folder of the photos, made once and reused (default: "
                                                          "data/photos; data/photos_before_after with --before-after)")
    parser.add_argument("--classes", type=int, default=4, help="class folders")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 64; 32 with "
                                                                     "--before-after)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed batches of each measurement (default: 2; with --before-after: of each epoch "
                             "after its first, 1)")
    parser.add_argument("--timed", type=int, default=None, help="timed batches of each measurement (default: 10; "
                                                                "with --before-after: of each epoch, 6)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds, each measuring every configuration "
                                                                 "(default: 5; 3 with --before-after)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="workers/threads to measure")
    parser.add_argument("--backends", nargs="+", default=["torch", "dali"], choices=["torch", "dali"])
    parser.add_argument("--recipe", default=RECIPE, help="the recipe whose ToE stages the cores table uses")
    parser.add_argument("--before-after", action="store_true",
                        help="measure only the DALI loader of --before-ref against the working tree's: per-epoch "
                             "start cost and images per CPU-second (added to loader.json/.md, the rest kept)")
    parser.add_argument("--before-ref", default="HEAD", help="the commit whose ToE/common/dali.py is 'before'")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run with --before-after")
    parser.add_argument("--render", action="store_true", help="measure nothing: rewrite loader.md from loader.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 48 photos, batch 8, 1 + 2 batches, 1 round, 1 worker")
    parser.add_argument("--out", default=None, help="folder for loader.md and loader.json "
                                                    "(default: bench/results; with --quick: a temporary folder)")
    return parser


def _write(results: Dict[str, object], out: str) -> str:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "loader.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    text = format_markdown(results)
    with open(os.path.join(out, "loader.md"), "w") as handle:
        handle.write(text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.render:
        out = args.out or RESULTS
        with open(os.path.join(out, "loader.json")) as handle:
            results = summarise(json.load(handle))
        print(_write(results, out))
        return results
    out = args.out or (os.path.join(tempfile.gettempdir(), "toe_bench") if args.quick else RESULTS)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    defaults = BEFORE_AFTER_DEFAULTS if args.before_after else MAIN_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.photos, args.batch_size, args.warmup, args.timed, args.rounds, args.workers = 48, 8, 1, 2, 1, [1]
        args.epochs = 2
        if args.photo_root == defaults["photo_root"]:
            args.photo_root = os.path.join(out, "photos")
    if args.before_after:
        section = summarise_before_after(run_before_after(args))
        stored = os.path.join(out, "loader.json")
        results = {}
        if os.path.isfile(stored):
            with open(stored) as handle:
                results = json.load(handle)
        results["dali_before_after"] = section
        results = summarise(results)
        print(_write(results, out))
        return results
    backends = list(args.backends)
    dali_version = None
    if "dali" in backends:
        try:
            import nvidia.dali
            dali_version = nvidia.dali.__version__
        except ImportError:
            print("[bench] NVIDIA DALI is not installed: measuring the torch path only")
            backends.remove("dali")
    import PIL

    load_before = load_average()
    torch.set_num_threads(1)
    build_photo_folder(args.photo_root, args.photos, args.classes)
    rng = np.random.default_rng(0)
    order = [int(i) for i in rng.permutation(args.photos)]
    needed = (args.warmup + args.timed) * args.batch_size
    if needed > args.photos:
        parser.error(f"{needed} images per measurement but --photos {args.photos}")
    configs = configurations(backends, sorted(set(args.workers)))
    rounds = []
    for index in range(args.rounds):
        measurements = []
        for config in rotated([c["name"] for c in configs], index):
            spec = next(c for c in configs if c["name"] == config)
            # each round reads another stretch of the shuffled folder (the page cache holds it all)
            offset = (index * needed) % args.photos
            indices = (order[offset:] + order[:offset])[:needed]
            result = measure(spec["backend"], spec["workers"], args.photo_root, indices, args.batch_size,
                             args.warmup, args.timed, seed=index)
            measurements.append({"config": config, **result})
            print(f"[bench] round {index + 1}/{args.rounds} {config}: {result['images'] / result['wall_s']:.1f} "
                  f"images/s" + (f", {result['images'] / result['cpu_s']:.1f} per CPU-second" if result["cpu_s"]
                                 else ""), flush=True)
        rounds.append({"order": [m["config"] for m in measurements], "measurements": measurements})
    results = {"machine": describe_machine(), "commit": git_commit(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join(["python -m bench.loader", *(sys.argv[1:] if argv is None else argv)]),
               "load": {"before": load_before, "after": load_average()}, "dali_version": dali_version,
               "pillow_version": PIL.__version__,
               "params": {"photos": args.photos, "photo_seed": 0, "photo_root": _shown(args.photo_root),
                          "photo_digest": _digest(args.photo_root, args.photos, args.classes),
                          "batch": args.batch_size, "warmup": args.warmup, "timed": args.timed,
                          "torch_threads_main": 1},
               "configs": configs, "rounds": rounds, "gpu_assumptions": GPU_ASSUMPTIONS,
               "stage_speedups": stage_speedups(args.recipe)}
    results = summarise(results)
    print(_write(results, out))
    return results


def _shown(path: str) -> str:
    """``path`` relative to the repository when inside it, else as it is."""
    relative = os.path.relpath(os.path.abspath(path), ROOT)
    return path if relative.startswith("..") else relative


def _digest(root: str, count: int, classes: int) -> str:
    """SHA-256 over the photo files in index order: two folders with the same digest hold the same bytes."""
    digest = hashlib.sha256()
    for i in range(count):
        with open(os.path.join(root, "train", f"class_{i % classes}", f"photo_{i:05d}.jpg"), "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    main()
