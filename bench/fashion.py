"""Fashion-MNIST: ToE against the token reducers a user would pick instead, one recipe, several seeds.

    apt-get install dataset-fashion-mnist     # once (or pass --source DIR with the four IDX files)
    python -m bench.fashion                   # the headline table: 7 methods x 5 seeds + 2 A/A runs
    python -m bench.fashion --render          # train nothing: rewrite table, summary and figure from the runs
    python -m bench.fashion --calibrate       # short runs (3 epochs on 2,000 images) per method: the
                                              # table's time on this machine, estimated

Every method trains the same small ViT with the same recipe through the real DeiT trainer
(``ToE/deit/main.py``: the demo recipe file with this bench's flags on top, a subprocess per run);
only the token reduction differs:

- ``full``: all tokens (``--expansion-step 0 --keep-rate 1.0``: the operator never reduces);
- ``toe``: Token Expansion (``--reducer toe``), the published operator with published (stride) seeds;
- ``random``, ``topk``, ``tome``: ``--reducer random|topk|tome`` (``token_select.make_reducer``): at
  ToE's place (after block 0), on ToE's schedule, with ToE's kept count in every stage;
- ``patchdrop``: ``--token-drop random``, timm's own PatchDropout (``patch_drop_rate``) before
  block 0, as a user would call it, keeping ToE's count in every stage (so blocks 0..depth-1 all
  run short: cheaper than the after-block-0 reducers);
- ``patchdrop-flops``: the same PatchDropout keeping more tokens (126 and 160 of 196 where ToE keeps
  98 and 147), so that every stage trains ToE's FLOPs (``SCHEDULE_CHANGES``);
- ``full-aa``: full tokens again with the first ``--aa-seeds`` seeds, an A/A control: its time
  ratio to ``full`` is the timing noise of the machine, its accuracy difference the run-to-run
  nondeterminism (zero where training is deterministic).

The recipe (``RECIPE`` and ``GRIDS`` below): Fashion-MNIST at its native 28 px, 2 px patches, so a
14 x 14 grid of 196 patch tokens, as DeiT at 224 px has; a ViT 48 wide, 4 blocks, 3 heads
(``--grid 7``: 4 px patches, 49 tokens, 64 wide, 6 blocks, 4 heads);
AdamW at lr 1e-3 (batch 64), cosine schedule without warmup, label smoothing 0.1, random
crops (scale 0.8-1) and flips, no RandAugment, mixup or EMA; ``--epochs`` (6) epochs on a
class-balanced ``--train-subset`` (15,000) of the 60,000 training images, the ToE stages (keep
0.5, 0.75, 1.0; r0 0.25; 2 repetition steps) at thirds of the run. Each run's top-1 is measured
once, at its end, on all 10,000 test images (a separate ``--eval`` of the final checkpoint); during
training the trainer evaluates a class-balanced 1,000-image part of the test set each epoch, only
for its log (nothing is selected on it). With 4 blocks, block 0 (always full) is a quarter of the
model, so the after-block-0 reducers save less than on DeiT-S (12 blocks): the FLOP ratio column
says how much.

Runs are two at a time, one thread each (``--parallel``, ``--threads``), in seed-major order with
the method order rotated from seed to seed, so each method meets every neighbour and every stretch
of the machine's drift alike. Each finished run is one JSON line in
``bench/results/fashion/runs.jsonl`` (its numbers, the load average before and after it, what
ran beside it); a rerun skips the runs already there (same recipe), so an interrupted bench
resumes; a run interrupted mid-way continues from its last epoch checkpoint (``--auto-resume``).
To stop a bench between runs, send it SIGTERM (``kill PID``; a bench started with ``&`` ignores
Ctrl-C): the runs in flight finish and are kept, no other starts, it exits 3. A stopped bench
(SIGTERM, Ctrl-C, a failed run) still writes its table and records its command in ``sessions``.
Outputs: ``bench/results/fashion/{summary.json,table.md,results.json}`` (results.json holds no runs:
they are in ``runs.jsonl`` only) and
``Figs/fashion_accuracy_time.png`` (needs matplotlib; skipped with a note without it).
``summary.json`` is a list with one object per method: ``method``, ``seeds``, ``top1_mean``,
``top1_se`` (over seeds), ``diff_vs_full``/``diff_se`` (top-1 minus full tokens' with the same
seed, mean and standard error over seeds; ``diff_vs_toe``/``diff_vs_toe_se`` the same against ToE),
``time_ratio`` (training time against full tokens' of the same
seed, each stage-normalised by the run's own last-stage epochs (``own_time_ratio``), mean over seeds;
evaluation excluded; ``wall_time_ratio`` is the plain ratio of seconds) and ``flop_ratio``
(``token_select.vit_step_flops`` over the schedule, against full tokens; the operators' own work is not
counted).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from bench.common import (append_run, demo_config, describe_machine, git_commit, mean_se, mean_std, paired_by_seed,
                          read_runs, rotated, run_numbers, run_trainer, StopRequest,
                          trainer_command)
from ToE.common.log import read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "fashion")
FIGURE = os.path.join(ROOT, "Figs", "fashion_accuracy_time.png")
DATA = os.path.join(ROOT, "data", "fashion")
TEST_IMAGES = 10000

# the model, a timm ViT at 28 px, by patch grid (--grid): 14 x 14 = 196 patch tokens in 2 px patches, 48
# wide, 4 blocks, 3 heads (the default: the grid of DeiT at 224 px); or 7 x 7 = 49 tokens in 4 px patches,
# 64 wide, 6 blocks, 4 heads, about as costly per image with fewer, richer tokens
INPUT_SIZE = 28
GRIDS = {14: (2, {"embed_dim": 48, "depth": 4, "num_heads": 3}), 7: (4, {"embed_dim": 64, "depth": 6, "num_heads": 4})}


def model_flags(grid: int = 14) -> List[object]:
    patch, kwargs = GRIDS[grid]
    return ["--model", "vit_tiny_patch16_224", "--model-kwargs", *[f"{k}={v}" for k, v in kwargs.items()],
            "--input-size", INPUT_SIZE, "--patch-size", patch]


def describe_model(grid: int) -> str:
    patch, kwargs = GRIDS[grid]
    return (f"{INPUT_SIZE} px in {patch} px patches ({grid} x {grid} = {grid * grid} patch tokens), ViT "
            f"{kwargs['embed_dim']} wide, {kwargs['depth']} blocks, {kwargs['num_heads']} heads")

# the recipe, on top of the DeiT demo's recipe file (every value the run depends on is set here)
# (no warmup: with DeiT's published per-epoch lr stepping, which the trainer follows, one warmup epoch
# would train the first two of the six epochs at the warmup lr)
RECIPE = ["--batch-size", 64, "--lr", "1e-3", "--unscale-lr", "--min-lr", "1e-5", "--warmup-epochs", 0,
          "--weight-decay", "0.05", "--drop-path", "0.0", "--smoothing", "0.1", "--aa", "none", "--reprob", 0,
          "--mixup", 0, "--cutmix", 0, "--hflip", "0.5", "--scale", "0.8", "1.0", "--crop-pct", "1.0",
          "--no-repeated-aug", "--no-model-ema", "--device", "cpu", "--num_workers", 0, "--no-pin-mem",
          "--amp-dtype", "float32", "--log-interval", 100]
# ToE's schedule (the DeiT published rates), stages at thirds of the run
KEEP_RATE, INIT_RATE, MULTIPLE = [0.5, 0.75, 1.0], 0.25, 2

# method -> (label, trainer flags besides the schedule; None: full tokens)
METHODS: Dict[str, Tuple[str, Optional[List[str]]]] = {
    "full": ("full tokens", None),
    "toe": ("ToE (after block 0)", ["--reducer", "toe", "--initialization", "stride"]),
    "random": ("random tokens (after block 0)", ["--reducer", "random"]),
    "topk": ("top-k by class-token similarity (after block 0)", ["--reducer", "topk"]),
    "tome": ("ToMe merging (after block 0)", ["--reducer", "tome"]),
    "patchdrop": ("PatchDropout at the input (timm)", ["--token-drop", "random"]),
    "patchdrop-flops": ("PatchDropout at the input, ToE's FLOPs per stage (timm)", ["--token-drop", "random"]),
    "full-aa": ("full tokens again (A/A control)", None),
}
HEADLINE = [name for name in METHODS if name != "full-aa"]
# Where a method's schedule differs from ToE's: keep rates, r0, k, the stage starts as shares of the run.
# patchdrop-flops: PatchDropout at the input runs every block short (block 0 too), so at ToE's kept count
# ("patchdrop") it trains fewer FLOPs than ToE; these keep rates give it ToE's FLOPs in every stage instead
# (126 and 160 of 196 patch tokens where ToE keeps 98 and 147 after block 0; tests/test_fashion.py checks
# the match, within 0.2 %, on the 14 x 14 grid).
SCHEDULE_CHANGES: Dict[str, Dict[str, object]] = {"patchdrop-flops": {"keep_rate": [0.645, 0.82, 1.0]}}
# The paper's ablations on the same data, one change to ToE each (the rest as "toe"); the trainer flags, and
# the schedule where it changes (keep rates, r0, k, the stage starts as shares of the run). r0 with k1 = 2 r0
# as the published configurations (ToE/deit/configs/imagenet_small_r0_*.yaml); Hyper: the stages of the
# paper's "Hyper" rows (epochs 0/131/261 of 300, ToE/deit/configs/imagenet_small_hyper.yaml).
ABLATIONS: Dict[str, Tuple[str, List[str], Dict[str, object]]] = {
    "init-random": ("initialization: random seeds per image", ["--initialization", "random"], {}),
    "expand-random": ("expansion: random tokens", ["--expansion", "random"], {}),
    "expand-none": ("expansion: none (every kept token a seed)", ["--expansion", "none"], {}),
    "merge-drop": ("merging: none (left-out tokens dropped)", ["--merging", "drop"], {}),
    "r0-0.20": ("r0 0.20 (keep 0.4/0.7/1.0)", [], {"keep_rate": [0.4, 0.7, 1.0], "init_rate": 0.2}),
    "r0-0.30": ("r0 0.30 (keep 0.6/0.8/1.0)", [], {"keep_rate": [0.6, 0.8, 1.0], "init_rate": 0.3}),
    "r0-0.40": ("r0 0.40 (keep 0.8/0.9/1.0)", [], {"keep_rate": [0.8, 0.9, 1.0], "init_rate": 0.4}),
    "k1": ("k = 1 repetition step", [], {"multiple": 1}),
    "k3": ("k = 3 repetition steps", [], {"multiple": 3}),
    "manhattan": ("distance: manhattan", ["--distance", "manhattan"], {}),
    "euclidean": ("distance: euclidean", ["--distance", "euclidean"], {}),
    "hyper": ("Hyper stages (at 0, 131/300, 261/300 of the run)", [], {"starts": [0.0, 131 / 300, 261 / 300]}),
}
# What the paper says of each ablation row (DeiT on ImageNet), for the table's last column: its claims as
# the issue and the paper's text state them; its numbers for these rows are unknown to this project
# (docs/reproduce.md), so the column quotes no figures.
_PARTS = "each of initialization, expansion and merging adds accuracy: replacing it costs top-1"
PAPER_CLAIMS: Dict[str, str] = {
    "full": "the reference", "toe": "no loss of top-1 at about 1.3x",
    **{name: _PARTS for name in ("init-random", "expand-random", "expand-none", "merge-drop")},
    **{name: "robust to the speedup factor: top-1 holds across r0" for name in ("r0-0.20", "r0-0.30", "r0-0.40")},
    **{name: "k = 2 is the published default" for name in ("k1", "k3")},
    **{name: "cosine is the published default" for name in ("manhattan", "euclidean")},
    "hyper": "the Hyper rows: another stage layout and minimal lr (only the stages here)",
}
for _name, (_label, _flags, _schedule) in ABLATIONS.items():
    METHODS[_name] = (_label, ["--reducer", "toe", "--initialization", "stride", *_flags])
    SCHEDULE_CHANGES[_name] = _schedule
ABLATION_SET = ["full", "toe", *ABLATIONS]

__all__ = ["METHODS", "method_flags", "stage_starts", "flop_ratio", "summarise", "format_markdown", "main"]


TARGET_SE = 0.3  # points: the paired standard error every row of the table should reach (the target)

# ---------------------------------------------------------------------------------------------
# what a run is
# ---------------------------------------------------------------------------------------------
def stage_starts(epochs: int, shares: Optional[Sequence[float]] = None) -> List[int]:
    """The epochs the stages start at: thirds of the run, or ``shares`` of it (Hyper)."""
    shares = shares if shares is not None else [i / len(KEEP_RATE) for i in range(len(KEEP_RATE))]
    return [round(share * epochs) for share in shares]


def schedule_of(method: str, epochs: int) -> Tuple[List[int], List[float], float, int]:
    """(stage starts, keep rates, r0, k) of ``method``: ToE's unless an ablation changes them."""
    change = SCHEDULE_CHANGES.get(method, {})
    return (stage_starts(epochs, change.get("starts")), list(change.get("keep_rate", KEEP_RATE)),
            float(change.get("init_rate", INIT_RATE)), int(change.get("multiple", MULTIPLE)))


def method_flags(method: str, epochs: int) -> List[str]:
    """The trainer flags that make ``method`` (the schedule and the reduction)."""
    _, flags = METHODS[method]
    if flags is None:
        return ["--expansion-step", "0", "--keep-rate", "1.0", "--initialization-keep-rate", "1.0"]
    starts, keep, r0, k = schedule_of(method, epochs)
    return ["--expansion-step", *map(str, starts), "--keep-rate", *map(str, keep),
            "--initialization-keep-rate", str(r0), "--expansion-multiple-stage", str(k), *flags]


def flop_ratio(method: str, epochs: int, grid: int = 14) -> float:
    """Training FLOPs of ``method``'s whole run over full tokens' (``token_select.vit_step_flops``
    per stage: block 0 full and the rest at the kept count after block 0, every block at the kept
    count for PatchDropout at the input; the operators' own similarity work is not counted)."""
    import token_select

    patch, kwargs = GRIDS[grid]
    patches = grid * grid
    width, depth = kwargs["embed_dim"], kwargs["depth"]
    shape = dict(num_prefix_tokens=1, mlp_ratio=4.0, num_classes=10)
    patch_dim = 3 * patch * patch
    full = token_select.vit_step_flops(patches, width, depth, patch_dim=patch_dim, **shape)
    _, flags = METHODS[method]
    if flags is None:
        return 1.0
    starts, keep, r0, k = schedule_of(method, epochs)
    kept_per_stage = token_select.kept_tokens_per_stage(patches, keep, r0, k)
    total = 0.0
    for epoch in range(epochs):
        stage = token_select.stage_of_epoch(epoch, starts)
        kept = kept_per_stage[stage - 1] if stage >= 1 else patches
        if "--token-drop" in flags:  # PatchDropout: the patch embedding on all patches, every block on the kept
            total += (token_select.vit_step_flops(kept, width, depth, patch_dim=0, **shape)
                      + 3.0 * 2.0 * patches * patch_dim * width)
        else:
            total += token_select.vit_step_flops(patches, width, depth, kept_patches=kept, patch_dim=patch_dim,
                                                 **shape)
    return total / (full * epochs)


def recipe_key(args) -> str:
    """What makes two runs of a method comparable: the recipe, the epochs and the data subsets."""
    text = json.dumps([list(map(str, model_flags(args.grid) + RECIPE)), KEEP_RATE, INIT_RATE, MULTIPLE, args.epochs,
                       args.train_subset, args.monitor_images, INPUT_SIZE])
    return hashlib.sha1(text.encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# data: the full folder (ToE.common.fashion) and the bench's class-balanced subsets of it
# ---------------------------------------------------------------------------------------------
def _balanced(files_by_class: Dict[str, List[str]], count: int, seed: int) -> Dict[str, List[str]]:
    """``count`` files spread evenly over the classes (seeded), each class's in sorted order."""
    rng = np.random.RandomState(seed)
    classes = sorted(files_by_class)
    per_class = [count // len(classes) + (i < count % len(classes)) for i in range(len(classes))]
    chosen = {}
    for name, share in zip(classes, per_class):
        files = sorted(files_by_class[name])
        if share > len(files):
            raise ValueError(f"class {name} has {len(files)} images, fewer than {share}")
        chosen[name] = sorted(files[i] for i in rng.choice(len(files), share, replace=False))
    return chosen


def build_subset(full: str, out: str, train_images: int, monitor_images: int, seed: int = 0) -> str:
    """A folder of hard links (copies where links fail) into ``full``: ``train_images`` training and
    ``monitor_images`` test images, class-balanced, seeded. Built through ``build_folder`` (staged,
    renamed, idempotent, a foreign folder refused)."""
    from ToE.common.digits import build_folder

    def listing(split: str) -> Dict[str, List[str]]:
        root = os.path.join(full, split)
        return {name: os.listdir(os.path.join(root, name)) for name in os.listdir(root)
                if os.path.isdir(os.path.join(root, name))}

    def write(staging: str) -> None:
        for split, count in (("train", train_images), ("val", monitor_images)):
            for name, files in _balanced(listing(split), count, seed).items():
                os.makedirs(os.path.join(staging, split, name))
                for file in files:
                    source, target = os.path.join(full, split, name, file), os.path.join(staging, split, name, file)
                    try:
                        os.link(source, target)
                    except OSError:
                        shutil.copyfile(source, target)

    stamp = f"fashion-subset {os.path.abspath(full)} train {train_images} val {monitor_images} seed {seed}"
    return build_folder(out, stamp, lambda old: old.startswith("fashion-subset "), write, "bench.fashion")


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------
_EVAL = re.compile(r"Accuracy on (\d+) test images: top-1 ([\d.]+) %")


def run_command(method: str, seed: int, epochs: int, out_dir: str, data_path: str, *extra, grid: int = 14
                ) -> List[str]:
    return trainer_command("deit", demo_config("deit"), *model_flags(grid), *RECIPE, "--data-path", data_path,
                           "--output_dir", out_dir, "--epochs", epochs, "--seed", seed, *method_flags(method, epochs),
                           "--auto-resume", *extra)


def final_eval(method: str, seed: int, epochs: int, out_dir: str, data_path: str, threads: int, grid: int = 14
               ) -> Dict[str, object]:
    """Top-1 of the run's final checkpoint on every test image of ``data_path`` (a separate --eval)."""
    command = trainer_command("deit", demo_config("deit"), *model_flags(grid), *RECIPE, "--data-path", data_path,
                              "--epochs", epochs, "--seed", seed, *method_flags(method, epochs), "--eval", "--resume",
                              os.path.join(out_dir, "checkpoint.pth"))
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    match = _EVAL.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"evaluation failed (exit {result.returncode}): {' '.join(command)}\n"
                           f"{(result.stdout + result.stderr)[-3000:]}")
    return {"acc1": float(match.group(2)), "test_images": int(match.group(1)), "eval_wall_s": wall}


class Neighbours:
    """Which runs are in flight, so each run records what ran beside it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running: Dict[Tuple[str, int], float] = {}
        self.seen: Dict[Tuple[str, int], set] = {}

    def start(self, job):
        with self.lock:
            self.seen[job] = set(self.running)
            for other in self.running:
                self.seen[other].add(job)
            self.running[job] = time.time()

    def stop(self, job) -> List[str]:
        with self.lock:
            del self.running[job]
            return sorted(f"{config} seed {seed}" for config, seed in self.seen.pop(job))


def run_one(method: str, seed: int, args, neighbours: Neighbours, log=print) -> Dict[str, object]:
    """Train one method with one seed, then evaluate it on the whole test set; its record."""
    job = (method, seed)
    out_dir = os.path.join(args.work_dir, args.recipe, f"{method}_seed{seed}")
    command = run_command(method, seed, args.epochs, out_dir, args.subset_path, grid=args.grid)
    neighbours.start(job)
    load_before, started = os.getloadavg(), time.time()
    try:
        log(f"[fashion] {method} seed {seed}: {' '.join(command[1:])}")
        wall = run_trainer(command, out_dir, args.threads)
        numbers = run_numbers(out_dir, args.epochs)
        if numbers is None:
            raise RuntimeError(f"{out_dir}/log.txt does not hold {args.epochs} epochs")
        evaluation = final_eval(method, seed, args.epochs, out_dir, args.data_path, args.threads, args.grid)
    finally:
        beside = neighbours.stop(job)
    records = read_log(out_dir)
    run = {"config": method, "seed": seed, "recipe": args.recipe, "grid": args.grid, "epochs": args.epochs,
           **evaluation, "monitor_acc1": numbers["acc1"], "time_s": numbers["train_seconds"],
           "robust_time_s": numbers["robust_train_seconds"], "epoch_seconds": numbers["epoch_seconds"],
           "slow_epochs": numbers["slow_epochs"], "kept_tokens": [r.get("kept_tokens") for r in records],
           "wall_s": wall, "started": started, "load_before": list(load_before),
           "load_after": list(os.getloadavg()), "beside": beside, "threads": args.threads,
           **({"untimed": args.untimed} if args.untimed else {})}
    log(f"[fashion]   {method} seed {seed}: top-1 {run['acc1']:.2f} % on {run['test_images']} images, train "
        f"{run['time_s']:.1f} s, load {load_before[0]:.2f} -> {run['load_after'][0]:.2f}")
    return run


def _result(future) -> object:
    """``future.result()``, waiting in half-second steps: the kernel may hand a SIGTERM to a worker
    thread, and Python runs the handler in the main thread only when that thread runs again, so a
    main thread blocked until the run ends would see the signal only then."""
    while not future.done():
        wait([future], timeout=0.5)
    return future.result()


def run_all(methods: Sequence[str], seeds: Sequence[int], aa_seeds: Sequence[int], args,
            runs_path: str, log=print) -> List[Dict[str, object]]:
    """Every (method, seed), ``args.parallel`` at a time, seed-major with the method order rotated
    from seed to seed (the A/A control joins the seeds it is run for); each run appended to
    ``runs_path`` when it finishes; runs already there with this recipe are skipped."""
    runs = [run for run in read_runs(runs_path) if run.get("recipe") == args.recipe]
    done = {(run["config"], run["seed"]) for run in runs}
    jobs = []
    for index, seed in enumerate(seeds):
        order = rotated(list(methods), index)
        if seed in aa_seeds and "full" in order:  # the A/A run half the order away from its reference, not beside it
            order.insert((order.index("full") + len(order) // 2) % len(order) + 1, "full-aa")
        jobs += [(method, seed) for method in order if (method, seed) not in done]
    if not jobs:
        return runs
    log(f"[fashion] {len(jobs)} runs to train ({len(done)} already in {runs_path}), {args.parallel} at a time")
    lock, neighbours = threading.Lock(), Neighbours()

    def work(job) -> bool:
        # Ctrl-C reaches the trainers first: a worker whose run just died would take the next job
        # before the main thread sees KeyboardInterrupt and cancels, so a failure stops it here
        if stop.is_set():
            return False
        try:
            run = run_one(*job, args, neighbours, log)
        except BaseException:
            stop.set()
            raise
        with lock:
            runs.append(run)
            append_run(runs_path, run)
        return True

    # SIGTERM (how a bench started with & is stopped: it ignores Ctrl-C) lets the runs in flight finish
    with StopRequest(log) as stop, ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = [pool.submit(work, job) for job in jobs]  # started in this order, --parallel in flight
        try:
            started = sum(_result(future) for future in futures)
        except BaseException:  # a failed run or Ctrl-C: start nothing more (the runs in flight end first)
            stop.set()
            for future in futures:
                future.cancel()
            raise
        stop.finish(len(jobs) - started)
    return runs


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
def both_top1(run: Dict[str, object], reference: Dict[str, object]) -> Tuple[float, float]:
    """The top-1 of a run and of its reference (``paired_by_seed``'s combine)."""
    return run["acc1"], reference["acc1"]


def summarise(runs: Sequence[Dict[str, object]], methods: Sequence[str], epochs: int, grid: int = 14
              ) -> List[Dict[str, object]]:
    """One row per method with runs: top-1 over seeds, the paired difference from full tokens and
    the paired training-time ratio (each seed's run against full tokens' run with the same seed)."""
    rows = []
    for method in methods:
        mine = sorted((r for r in runs if r["config"] == method), key=lambda r: r["seed"])
        if not mine:
            continue
        top1 = [r["acc1"] for r in mine]
        top1_mean, top1_se = mean_se(top1)
        full_pairs = paired_by_seed(runs, method, "full", both_top1)
        diffs = [(seed, a - b) for seed, (a, b) in full_pairs]
        timed = [r for r in runs if timed_run(r)]
        walls = paired_by_seed(timed, method, "full", lambda a, b: a["time_s"] / b["time_s"])
        ratios = paired_by_seed(timed, method, "full", lambda a, b: own_time_ratio(a) / own_time_ratio(b))
        diff, diff_se = mean_se([d for _, d in diffs]) if diffs else (None, None)
        # the question the table is for, whether ToE's choice beats the others, paired by seed as well
        toe_diffs = ([(seed, a - b) for seed, (a, b) in paired_by_seed(runs, method, "toe", both_top1)]
                     if method != "toe" else [])
        toe_diff, toe_diff_se = mean_se([d for _, d in toe_diffs]) if toe_diffs else (None, None)
        ratio, ratio_se = mean_se([v for _, v in ratios]) if ratios else (None, None)
        wall, wall_se = mean_se([v for _, v in walls]) if walls else (None, None)
        my_times = [r["time_s"] for r in mine if timed_run(r)]
        time_mean, time_std = mean_std(my_times) if my_times else (None, None)
        rows.append({
            "method": method, "label": METHODS[method][0], "seeds": [r["seed"] for r in mine],
            "top1_mean": top1_mean, "top1_se": top1_se, "top1_per_seed": top1,
            "diff_vs_full": diff, "diff_se": diff_se, "diff_per_seed": [d for _, d in diffs],
            # how much pairing by seed removes: the seed's share of the spread both runs have in common
            "corr_with_full": (float(np.corrcoef(*zip(*(pair for _, pair in full_pairs)))[0, 1])
                               if len(full_pairs) > 2 and method != "full" else None),
            "diff_vs_toe": toe_diff, "diff_vs_toe_se": toe_diff_se, "diff_vs_toe_per_seed": [d for _, d in toe_diffs],
            "time_ratio": ratio, "time_ratio_se": ratio_se, "time_ratio_per_seed": [v for _, v in ratios],
            "wall_time_ratio": wall, "wall_time_ratio_se": wall_se, "wall_time_ratio_per_seed": [v for _, v in walls],
            "time_s_mean": time_mean, "time_s_std": time_std,
            "time_s_se": time_std / len(my_times) ** 0.5 if len(my_times) > 1 else None,
            "timed_seeds": [r["seed"] for r in mine if timed_run(r)],
            "flop_ratio": flop_ratio(method, epochs, grid),
        })
    return rows


def seeds_plan(summary: Sequence[Dict[str, object]], runs: Sequence[Dict[str, object]], methods: Sequence[str],
               epochs: int, parallel: int = 2, target: float = TARGET_SE, first_seeds: int = 5,
               reference: str = "full") -> Dict[str, object]:
    """What it takes for every paired difference of ``methods`` from ``reference`` (full tokens for the
    headline table; ToE for the ablations, each ToE with one change) to reach a standard error under
    ``target`` points, at the spread of its paired differences so far: ``n > (std / target)^2`` seeds, and
    at least ``first_seeds`` (a spread from fewer is unknown or too rough); the reference as many as the most. The runs
    that adds, each costed at its method's mean wall time (training and final evaluation; timed runs where
    there are, a method without runs at full tokens' x its FLOP ratio), ``parallel`` at a time. The
    spread of a few seeds is itself uncertain: the seed counts are estimates, to be redone as runs land."""
    rows = {row["method"]: row for row in summary}

    def cost(method: str) -> Optional[float]:
        mine = [r for r in runs if r["config"] == method and "wall_s" in r]
        chosen = [r for r in mine if timed_run(r)] or mine
        if chosen:
            return float(np.mean([r["wall_s"] + r.get("eval_wall_s", 0.0) for r in chosen]))
        full = cost("full") if method != "full" else None
        return None if full is None else full * flop_ratio(method, epochs)

    need: Dict[str, int] = {}
    spread: Dict[str, Optional[float]] = {}  # std of each method's paired differences
    for method in methods:
        if method in ("full", "full-aa", reference):
            continue
        diffs = rows[method]["diff_per_seed" if reference == "full" else f"diff_vs_{reference}_per_seed"] \
            if method in rows else []
        if len(diffs) >= 2:  # a spread from 2-4 pairs is too rough to stop at: first_seeds at least
            spread[method] = float(np.std(diffs, ddof=1))
        need[method] = max(first_seeds, len(diffs),
                           int((spread[method] / target) ** 2) + 1 if method in spread else 0)
    if not need:
        return {"target_se": target, "reference": reference, "methods": {}, "runs": 0, "hours": 0.0}
    need[reference] = max(need.values())
    plan, seconds, count = {}, 0.0, 0
    for method, seeds in need.items():
        have = {r["seed"] for r in runs if r["config"] == method}
        missing = [seed for seed in range(seeds) if seed not in have]
        each = cost(method)
        plan[method] = {"seeds": seeds, "have": len(have), "missing": len(missing), "run_s": each,
                        "spread": spread.get(method)}
        count += len(missing)
        seconds += len(missing) * (each or 0.0)
    # one command per seed count, most seeds first, with the reference in it where it misses runs (each
    # method trains only its own seeds)
    groups: Dict[int, List[str]] = {}
    for method, entry in plan.items():
        if entry["missing"] and method != reference:
            groups.setdefault(entry["seeds"], []).append(method)
    bench, extra = ("python -m bench.fashion", " --aa-seeds") if reference == "full" else \
        ("python -m bench.fashion --ablations", "")
    with_reference = need[reference] if plan[reference]["missing"] else None
    commands = [f"{bench} --methods {' '.join(([reference] if seeds == with_reference else []) + names)} "
                f"--seeds 0-{seeds - 1}{extra}" for seeds, names in sorted(groups.items(), reverse=True)]
    if plan[reference]["missing"] and (not groups or max(groups) < need[reference]):
        commands.insert(0, f"{bench} --methods {reference} --seeds 0-{need[reference] - 1}{extra}")
    return {"target_se": target, "reference": reference, "methods": plan, "runs": count,
            "hours": seconds / parallel / 3600, "parallel": parallel, "commands": commands}


def plan_text(plan: Dict[str, object]) -> str:
    """One paragraph: the seeds per method for the target, and the command and hours that add them."""
    against = {"full": "full tokens", "toe": "ToE"}[plan.get("reference", "full")]
    if not plan.get("runs"):
        return f"Every paired standard error against {against} is under {plan['target_se']} points."
    per = ", ".join(f"{method} {entry['seeds']} (has {entry['have']}"
                    + (f", paired spread {entry['spread']:.2f}" if entry.get("spread") is not None else "") + ")"
                    for method, entry in plan["methods"].items() if entry["missing"])
    return (f"To bring every paired standard error against {against} under {plan['target_se']} points at the "
            f"spread so far (an estimate from the seeds there are): seeds {per}; {plan['runs']} more runs, about "
            f"{plan['hours']:.1f} h {plan['parallel']} at a time: "
            + " then ".join(f"`{command}`" for command in plan["commands"])
            + " (each trains only the runs not in runs.jsonl, so any of them can stop and run again).")


def own_time_ratio(run: Dict[str, object]) -> float:
    """A run's training time over what its epochs would have taken at the speed of its own last stage,
    where every method trains on all tokens: ``sum(epoch_seconds) / (epochs x mean of the last stage's
    epochs)``. Each run is its own reference, so the drift of the machine's speed between runs (measured:
    full tokens alone took 380 s with one seed and 446 s with the next; the two runs beside a run slow
    it unlike) cancels; paired by seed against full tokens' own ratio (whose epochs differ only by
    the drift within a run), it is the table's time ratio."""
    starts = schedule_of(run["config"], run["epochs"])[0]
    seconds = run["epoch_seconds"]
    last = seconds[starts[-1]:]
    return sum(seconds) / (len(seconds) * (sum(last) / len(last)))


def timed_run(run: Dict[str, object]) -> bool:
    """Whether a run's training time counts: a run marked ``untimed`` (its reason as the value, e.g.
    measured while the test suite shared the cores) keeps its top-1 but leaves the time columns."""
    return not run.get("untimed")


def _pm(mean, se, spec: str) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:{spec}}" + ("" if se is None else f" ± {se:{spec.lstrip('+')}}")  # the SE to the mean's digits


def read_results(path: str, recipe: str) -> Dict[str, object]:
    """A previous results.json/ablations.json of this recipe ({} where there is none, or another recipe's)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        previous = json.load(handle)
    return previous if previous.get("recipe") == recipe else {}


def training_sessions(results: Dict[str, object]) -> List[Dict[str, object]]:
    """The bench commands that trained a table's runs, oldest first: ``sessions`` in results.json, each
    ``{command, commit, started, finished, bench_load, trained[, stopped]}`` (a file written before
    sessions were kept has one top-level ``command``)."""
    if results.get("sessions"):
        return list(results["sessions"])
    if results.get("command"):
        return [{key: results[key] for key in ("command", "commit", "bench_load") if key in results}]
    return []


def format_markdown(results: Dict[str, object]) -> str:
    machine = results["machine"]
    shown = {row["method"] for row in results["summary"]}
    mine = [run for run in results["runs"] if run["config"] in shown]
    loads = [run["load_before"][0] for run in mine] + [run["load_after"][0] for run in mine]
    load_text = f"{min(loads):.2f}-{max(loads):.2f}" if loads else "not recorded"
    sessions = training_sessions(results)
    commands = "; ".join(f"`{session['command']}` (commit {session.get('commit') or 'not recorded'}"
                         + (f", {session['trained']} runs" if session.get("trained") is not None else "")
                         + (f", stopped ({session['stopped'].split(';')[0]})" if session.get("stopped") else "") + ")"
                         for session in sessions) or "not recorded"
    claims = any(row["method"] in ABLATIONS for row in results["summary"])  # the ablation table
    lines = [
        f"{'Commands' if len(sessions) > 1 else 'Command'}: {commands}. Fashion-MNIST, "
        f"{describe_model(results.get('grid', 14))}, {results['epochs']} epochs on "
        f"{results['train_subset']} training images, stages at epochs {stage_starts(results['epochs'])} keeping "
        f"{KEEP_RATE} of the patch tokens (r0 {INIT_RATE}). Top-1 on all {TEST_IMAGES} test images at the end of "
        f"each run. Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, torch {machine['torch']}; "
        f"{results['parallel']} runs at a time, {results['threads']} thread each; load average (1 min) before and "
        f"after the runs: {load_text}.",
        "",
        "| method | seeds | top-1 % (mean ± SE) | Δ top-1 vs full, paired (mean ± SE) | Δ top-1 vs ToE, paired "
        "(mean ± SE) | training time s (mean ± std) | wall-time ratio vs full, paired | time ratio vs full, paired, "
        "stage-normalised | speedup | FLOP ratio |" + (" the paper says (DeiT, ImageNet) |" if claims else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if claims else "")]
    for row in results["summary"]:
        reference = row["method"] == "full"
        ratio = row["time_ratio"]
        speedup = "1" if reference else ("n/a" if ratio is None else f"{1 / ratio:.2f}x")
        lines.append(
            f"| {row['label']} | {len(row['seeds'])} | {_pm(row['top1_mean'], row['top1_se'], '.2f')} | "
            f"{'reference' if reference else _pm(row['diff_vs_full'], row['diff_se'], '+.2f')} | "
            f"{'reference' if row['method'] == 'toe' else _pm(row['diff_vs_toe'], row['diff_vs_toe_se'], '+.2f')} | "
            f"{_pm(row['time_s_mean'], row['time_s_std'], '.0f')} | "
            f"{'1' if reference else _pm(row['wall_time_ratio'], row['wall_time_ratio_se'], '.3f')} | "
            f"{'1' if reference else _pm(ratio, row['time_ratio_se'], '.3f')} | {speedup} | "
            f"{row['flop_ratio']:.3f} |" + (f" {PAPER_CLAIMS.get(row['method'], '')} |" if claims else ""))
    lines += ["", "Paired: each run against the full-token run (or ToE's) of the same seed; mean over the seeds "
                  "both have ± standard error (std of the paired values / √n). Time: seconds in training epochs "
                  "(evaluation excluded); a ratio < 1 is faster. Wall-time ratio: training seconds over full "
                  "tokens' (runs of one seed train at different times, so it carries the machine's drift between "
                  "runs). Stage-normalised (the speedup's basis): each run's seconds over what its epochs would "
                  "take at the speed of its own last stage, where every method trains all tokens "
                  "(`own_time_ratio` in bench/fashion.py), over the same for full tokens: each run is its own "
                  "reference. FLOP ratio: token_select.vit_step_flops over the schedule (the operators' own work "
                  "not counted). A/A control: full tokens trained again with the same seed at another time; its "
                  "ratios are the timing noise of each column, its Δ top-1 the nondeterminism of training (0 "
                  "here: the runs are deterministic)."]
    untimed: Dict[str, List[str]] = {}
    for run in sorted(mine, key=lambda r: (r["seed"], r["config"])):
        if not timed_run(run):
            untimed.setdefault(str(run["untimed"]), []).append(f"{run['config']} seed {run['seed']}")
    if untimed:
        lines += ["", "Counted for top-1 only, not in the time columns (marked `untimed` in runs.jsonl): "
                      + "; ".join(f"{', '.join(names)} ({reason})" for reason, names in untimed.items()) + "."]
    if results.get("plan"):
        lines += ["", plan_text(results["plan"])]
    lines += [f"\n{note}" for note in results.get("notes", [])]
    return "\n".join(lines)


def figure_points(summary: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """The figure's points: each method's paired difference in top-1 from full tokens (y) against its
    paired, stage-normalised time ratio (x), both mean ± SE over its own seeds, so that rows with
    different seed counts compare as the table does; full tokens at (1, 0). Methods without a timed
    pair have no place on the time axis and are left out."""
    points = []
    for row in summary:
        if row["method"] == "full":
            points.append({"method": "full", "label": f"{row['label']} ({len(row['seeds'])} seeds): reference",
                           "x": 1.0, "x_se": 0.0, "y": 0.0, "y_se": 0.0})
            continue
        if row["time_ratio"] is None or row["diff_vs_full"] is None:
            continue
        points.append({"method": row["method"],
                       "label": f"{row['label']} ({len(row['diff_per_seed'])} seeds): {row['diff_vs_full']:+.2f} "
                                f"± {row['diff_se'] or 0:.2f} pts, {1 / row['time_ratio']:.2f}x",
                       "x": row["time_ratio"], "x_se": row["time_ratio_se"] or 0.0,
                       "y": row["diff_vs_full"], "y_se": row["diff_se"] or 0.0})
    return points


def draw(results: Dict[str, object], path: str = FIGURE) -> Optional[str]:
    """The paired difference in top-1 from full tokens against the paired training-time ratio per
    method (``figure_points``; error bars: standard errors over seeds); None (with a note) where
    matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no figure (pip install matplotlib, then python -m bench.fashion "
              "--render)")
        return None
    fig, ax = plt.subplots(figsize=(7.5, 6.6))
    ax.axhline(0.0, color="grey", lw=0.8)
    for point in figure_points(results["summary"]):
        ax.errorbar(point["x"], point["y"], xerr=point["x_se"], yerr=point["y_se"],
                    fmt="s" if point["method"].startswith("full") else "o", capsize=3, ms=7, label=point["label"])
    ax.set_xlabel("training time relative to full tokens (stage-normalised, paired by seed), mean ± SE")
    ax.set_ylabel(f"Δ top-1 vs full tokens, paired by seed (points,\non the {TEST_IMAGES} test images), mean ± SE")
    ax.set_title(f"Fashion-MNIST, {describe_model(results.get('grid', 14))},\n{results['epochs']} epochs; "
                 f"{results['machine']['cpu_model']}, {results['parallel']} runs at a time, "
                 f"{results['threads']} thread each", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13))  # below the axes: no point hidden
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(results: Dict[str, object], out: str, figure: Optional[str], ablations: bool = False) -> str:
    """results.json (sessions, machine, recipe, summary, plan: everything but the runs, which live once,
    in runs.jsonl), summary.json (one object per method), table.md; the figure. The ablations:
    ablations.json and ablations.md (no figure)."""
    os.makedirs(out, exist_ok=True)
    stored = {**{key: value for key, value in results.items() if key != "runs"}, "runs_file": "runs.jsonl"}
    with open(os.path.join(out, "ablations.json" if ablations else "results.json"), "w") as handle:
        json.dump(stored, handle, indent=2)
    if ablations:
        table = format_markdown(results)
        with open(os.path.join(out, "ablations.md"), "w") as handle:
            handle.write(table + "\n")
        return table
    keys = ("method", "seeds", "top1_mean", "top1_se", "diff_vs_full", "diff_se", "time_ratio", "flop_ratio")
    summary = [{**{key: row[key] for key in keys}, **{key: value for key, value in row.items() if key not in keys}}
               for row in results["summary"]]
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    table = format_markdown(results)
    with open(os.path.join(out, "table.md"), "w") as handle:
        handle.write(table + "\n")
    if figure:
        drawn = draw(results, figure)
        if drawn:
            print(f"figure: {os.path.relpath(drawn, ROOT)}")
    return table


# ---------------------------------------------------------------------------------------------
# calibration: the table's time on this machine, from one short run per method
# ---------------------------------------------------------------------------------------------
def estimate(calibration: Sequence[Dict[str, object]], calib_images: int, epochs: int, train_subset: int,
             seeds: int, aa_seeds: int, parallel: int) -> Dict[str, object]:
    """Each method's run time at the table's size, from its calibration run (one epoch per stage on
    ``calib_images`` images): training seconds per image of each stage, scaled to ``train_subset``
    images over the table's stages, plus the run's other time per epoch (start-up, the monitor
    evaluations, checkpoints; counted per epoch, which overestimates a little) and the final evaluation."""
    starts = stage_starts(epochs)
    per_method = {}
    for run in calibration:
        per_image = [t / calib_images for t in run["epoch_seconds"]]          # epoch i is stage i + 1
        training = sum(per_image[min(stage_index(epoch, starts), len(per_image)) - 1] * train_subset
                       for epoch in range(epochs))
        other_per_epoch = (run["wall_s"] - sum(run["epoch_seconds"])) / len(run["epoch_seconds"])
        per_method[run["config"]] = {"train_s": training, "run_s": training + epochs * other_per_epoch
                                     + run["eval_wall_s"], "per_image_ms": [1000 * t for t in per_image]}
    total = sum(m["run_s"] for m in per_method.values()) * seeds
    if "full" in per_method:
        total += per_method["full"]["run_s"] * aa_seeds
    return {"per_method": per_method, "run_seconds_total": total, "wall_hours": total / parallel / 3600}


def stage_index(epoch: int, starts: Sequence[int]) -> int:
    import token_select

    return token_select.stage_of_epoch(epoch, starts)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def seed_list(text: str) -> List[int]:
    """A --seeds item: a number, or a range ``A-B`` (both ends in)."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text.strip())
    if not match or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
        raise argparse.ArgumentTypeError(f"'{text}' is not a seed or a range of seeds (e.g. 3 or 0-21)")
    first = int(match.group(1))
    return list(range(first, int(match.group(2) if match.group(2) is not None else first) + 1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.fashion", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=None, choices=[m for m in METHODS if m != "full-aa"],
                        help="methods to train (their order rotates from seed to seed) (default: the headline "
                             f"table's: {' '.join(HEADLINE)}; with --ablations: {' '.join(ABLATION_SET)})")
    parser.add_argument("--ablations", action="store_true",
                        help="the paper's ablations instead of the headline table: full tokens, ToE and one change "
                             "each (initialization, expansion, merging, r0, k, distance, Hyper stages); written to "
                             "ablations.md/.json. Runs that the headline table shares (full, toe) are reused")
    parser.add_argument("--seeds", type=seed_list, nargs="+", default=[[0, 1, 2, 3, 4]],
                        help="training seeds: numbers and ranges (0-21 is 0 to 21)")
    parser.add_argument("--aa-seeds", type=int, nargs="*", default=[0, 1],
                        help="seeds with which full tokens train a second time (the A/A timing control)")
    parser.add_argument("--grid", type=int, default=14, choices=sorted(GRIDS, reverse=True),
                        help="patch grid: 14 (2 px patches, 196 tokens, as DeiT at 224 px) or 7 (4 px patches, 49 "
                             "tokens, a wider and deeper ViT at about the same cost per image)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (ToE stages at thirds)")
    parser.add_argument("--train-subset", type=int, default=15000,
                        help="class-balanced training images per epoch (of 60,000)")
    parser.add_argument("--monitor-images", type=int, default=1000,
                        help="class-balanced test images the trainer evaluates each epoch for its log only (the "
                             "table's top-1 is measured on all 10,000 at the end)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    parser.add_argument("--source", default=None,
                        help="folder of the Fashion-MNIST IDX files (default: the Debian package's)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "toe_fashion"),
                        help="per-run output folders (checkpoints, logs); not part of the repository")
    parser.add_argument("--out", default=RESULTS, help="folder of runs.jsonl, results.json, summary.json, table.md")
    parser.add_argument("--figure", default=FIGURE, help="the figure to draw ('' for none)")
    parser.add_argument("--untimed", default=None, metavar="REASON",
                        help="mark the runs this command trains 'untimed' with REASON (e.g. 'beside the test suite'): "
                             "their top-1 counts, their times stay out of the time columns")
    parser.add_argument("--render", action="store_true", help="train nothing: rewrite the outputs from runs.jsonl")
    parser.add_argument("--calibrate", action="store_true",
                        help="train each method once for 3 epochs (one per stage) on --calibrate-images images, "
                             "then print the estimated time of the table with the other flags' sizes")
    parser.add_argument("--calibrate-images", type=int, default=2000, help="training images of a calibration run")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, object]]:
    from ToE.common.errors import UserError

    args = build_parser().parse_args(argv)
    args.seeds = list(dict.fromkeys(seed for part in args.seeds for seed in part))
    table_methods = ABLATION_SET if args.ablations else [*HEADLINE, "full-aa"]
    if args.methods is None:
        args.methods = ABLATION_SET if args.ablations else HEADLINE
    if args.ablations:
        args.aa_seeds = []
    command = " ".join(["python -m bench.fashion", *(sys.argv[1:] if argv is None else argv)])
    runs_path = os.path.join(args.out, "runs.jsonl")
    args.data_path = DATA
    if not args.render:
        from ToE.common.fashion import build_fashion

        build_fashion(DATA, size=INPUT_SIZE, source=args.source)
    if args.calibrate:
        return calibrate(args, command)
    args.recipe = recipe_key(args)
    if args.render:
        runs = [run for run in read_runs(runs_path)]
        if not runs:
            raise UserError(f"--render: no runs in {runs_path}. Train them first (python -m bench.fashion)")
        args.recipe = runs[-1]["recipe"]
        runs = [run for run in runs if run["recipe"] == args.recipe]
        args.epochs, args.grid = runs[0]["epochs"], runs[0].get("grid", 14)
    stopped: Optional[BaseException] = None
    previous = read_results(os.path.join(args.out, "ablations.json" if args.ablations else "results.json"),
                            args.recipe)
    sessions = training_sessions(previous)
    if args.render:
        provenance = {key: value for key, value in previous.items()
                      if key in ("machine", "train_subset", "monitor_images", "parallel", "threads", "notes")}
    else:
        args.subset_path = build_subset(DATA, os.path.join(ROOT, "data", f"fashion-{args.train_subset}-"
                                                                       f"{args.monitor_images}"),
                                        args.train_subset, args.monitor_images)
        load_start, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        before = len(read_runs(runs_path))
        try:
            runs = run_all(args.methods, args.seeds, args.aa_seeds, args, runs_path)
        except BaseException as error:  # stopped (a signal, Ctrl-C, a failed run): the runs it kept still count
            stopped = error
            runs = [run for run in read_runs(runs_path) if run.get("recipe") == args.recipe]
            if not runs:
                raise
        trained = len(read_runs(runs_path)) - before
        if trained or not sessions:  # a rerun that trained nothing adds no session
            sessions.append({"command": command, "commit": git_commit(), "started": started,
                             "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "trained": trained,
                             "bench_load": {"start": list(load_start), "end": list(os.getloadavg())},
                             **({"stopped": stop_reason(stopped)} if stopped is not None else {})})
        # the notes (what the table shows, written by hand) stay: each names the state it describes
        provenance = {"machine": describe_machine(), "train_subset": args.train_subset,
                      "monitor_images": args.monitor_images, "parallel": args.parallel, "threads": args.threads,
                      **({"notes": previous["notes"]} if previous.get("notes") else {})}
    results = {"sessions": sessions, "machine": describe_machine(), "train_subset": args.train_subset,
               "monitor_images": args.monitor_images, "parallel": args.parallel, "threads": args.threads,
               **provenance, "recipe": args.recipe, "epochs": args.epochs,
               "grid": args.grid,
               "trainer_flags": {"model": list(map(str, model_flags(args.grid))), "recipe": list(map(str, RECIPE)),
                                 **{m: method_flags(m, args.epochs) for m in METHODS}},
               "runs": runs, "summary": summarise(runs, table_methods, args.epochs, args.grid)}
    if args.ablations:
        results["schedules"] = {m: dict(zip(("starts", "keep_rate", "r0", "k"), schedule_of(m, args.epochs)))
                                for m in table_methods}
    results["plan"] = seeds_plan(results["summary"], runs, [m for m in table_methods if m != "full-aa"],
                                 args.epochs, args.parallel, reference="toe" if args.ablations else "full")
    table = write_outputs(results, args.out, args.figure, ablations=args.ablations)
    if stopped is not None:  # the outputs hold what it trained; the command ends as it was stopped
        raise stopped
    print(table)
    return results


def stop_reason(error: BaseException) -> str:
    """What stopped a bench, in one line for its session record (e.g. "KeyboardInterrupt")."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def calibrate(args, command: str) -> Dict[str, object]:
    """One run per method, 3 epochs (one per stage) on ``--calibrate-images`` images, ``--parallel``
    at a time; prints and stores (``OUT/calibration.json``) the estimated time of the table."""
    table_epochs = args.epochs
    args.epochs, args.recipe = 3, "calibration"
    args.subset_path = build_subset(DATA, os.path.join(ROOT, "data", f"fashion-{args.calibrate_images}-"
                                                                   f"{args.monitor_images}"),
                                    args.calibrate_images, args.monitor_images)
    args.work_dir += "_calibration"
    shutil.rmtree(args.work_dir, ignore_errors=True)  # fresh runs: a finished one would be reused, not timed
    with tempfile.TemporaryDirectory() as scratch:
        runs = run_all(args.methods, [0], [], args, os.path.join(scratch, "runs.jsonl"))
    guess = estimate(runs, args.calibrate_images, table_epochs, args.train_subset, len(args.seeds),
                     len(args.aa_seeds), args.parallel)
    report = {"command": command, "commit": git_commit(), "machine": describe_machine(),
              "calibration_images": args.calibrate_images, "table": {
                  "epochs": table_epochs, "train_subset": args.train_subset, "seeds": len(args.seeds),
                  "aa_seeds": len(args.aa_seeds), "parallel": args.parallel}, "estimate": guess, "runs": runs}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "calibration.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    for method, numbers in guess["per_method"].items():
        print(f"{method:>10}: ms per training image by stage {', '.join(f'{t:.2f}' for t in numbers['per_image_ms'])};"
              f" a table run {numbers['run_s'] / 60:.1f} min (training {numbers['train_s'] / 60:.1f} min)")
    print(f"estimated table: {guess['run_seconds_total'] / 3600:.2f} run-hours, {guess['wall_hours']:.2f} h wall "
          f"with {args.parallel} at a time ({len(args.seeds)} seeds x {len(args.methods)} methods + "
          f"{len(args.aa_seeds)} A/A runs)")
    return report


if __name__ == "__main__":
    from ToE.common.errors import run_main

    run_main(main)
