"""Input-pipeline throughput: images per second per CPU core of the torch path and of DALI on the CPU,
and the CPU cores one GPU needs to feed deit_small in each ToE stage.

    python -m bench.loader                       # 3,000 photos, workers 1 and 2, 5 rounds
    python -m bench.loader --workers 1 --rounds 3
    python -m bench.loader --render              # measure nothing: rewrite loader.md from loader.json
    python -m bench.loader --quick --out DIR     # smoke run: 48 photos, batch 8, 1 round

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
random erasing 0.25, normalisation): the torch path is ``ToE.common.transforms.build_train_transform``
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
"""

from __future__ import annotations

import argparse
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

from bench.common import ROOT, describe_machine, git_commit, recipe, rotated
from ToE.common.results import paired_ratios

__all__ = ["PHOTO_ROOT", "GPU_ASSUMPTIONS", "build_photo_folder", "photo_manifest", "stage_speedups",
           "cores_needed", "summarise", "format_markdown", "measure", "main"]

RESULTS = os.path.join(ROOT, "bench", "results")
PHOTO_ROOT = os.path.join(ROOT, "data", "photos")
RECIPE = os.path.join(ROOT, "ToE", "deit", "configs", "imagenet_small.yaml")

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
        from ToE.common.lifecycle import epoch_loader
        from ToE.common.transforms import build_train_transform

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
# summary and report
# ---------------------------------------------------------------------------------------------
def _spread(values: Sequence[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(results: Dict[str, object]) -> Dict[str, object]:
    """Fill in the figures derived from the measurements (``main`` and ``--render``): per configuration
    the spread of its rates, per A/A pair the paired ratios, per backend the per-core rate and the
    cores per GPU per stage."""
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
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--photos", type=int, default=3000, help="JPEGs in the photo folder")
    parser.add_argument("--photo-root", default=PHOTO_ROOT, help="folder of the photos (made once, reused)")
    parser.add_argument("--classes", type=int, default=4, help="class folders")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches of each measurement")
    parser.add_argument("--timed", type=int, default=10, help="timed batches of each measurement")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (each measures every configuration)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="workers/threads to measure")
    parser.add_argument("--backends", nargs="+", default=["torch", "dali"], choices=["torch", "dali"])
    parser.add_argument("--recipe", default=RECIPE, help="the recipe whose ToE stages the cores table uses")
    parser.add_argument("--render", action="store_true", help="measure nothing: rewrite loader.md from loader.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 48 photos, batch 8, 1 + 2 batches, 1 round, 1 worker")
    parser.add_argument("--out", default=None, help="folder for loader.md and loader.json "
                                                    "(default: bench/results; with --quick: a temporary folder)")
    return parser


def _load() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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
    if args.quick:
        args.photos, args.batch_size, args.warmup, args.timed, args.rounds, args.workers = 48, 8, 1, 2, 1, [1]
        if args.photo_root == PHOTO_ROOT:
            args.photo_root = os.path.join(out, "photos")
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

    load_before = _load()
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
               "load": {"before": load_before, "after": _load()}, "dali_version": dali_version,
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
