"""EfficientTrain + ToE on the embedded digits: the comparison a user asks for.

    python -m bench.efficienttrain speed --steps 10        # interleaved step times of every phase
    python -m bench.efficienttrain accuracy --seeds 0 1 2  # the real trainer, 5 configs x seeds
    python -m bench.efficienttrain posembed --steps 10     # position table: per-forward vs resized
    python -m bench.efficienttrain render                  # tables + figure from the stored results

Configurations (the demo recipe ``ToE/EfficientTrain/configs/demo.yaml``, or ``--config FILE``:
its model on 32 px digits, 4 px patches, its epochs (45) unless ``--epochs``, its ToE schedule
(0.6/0.8/1.0 from 0.3, uniform seeds) with the stage starts scaled to the run's length):

- ``full``: all tokens at 32 px;  ``toe``: ToE alone;  ``et``: the ET curriculum (24, 24, 24, 28,
  32 px) alone;  ``et_toe``: both;  ``random``: timm's PatchDropout keeping as many random patch
  tokens (before block 0) as ToE keeps, on the same schedule.

``speed`` times one training step (FFT crop + forward + backward + AdamW, batch 64, random
images) of every distinct (crop, kept tokens, method) phase in rounds, the order rotated each
round, plus a second full-token configuration as the A/A control. A configuration's run-level
speedup in round r is sum over epochs of the full step / sum over epochs of its phase's step (the
per-epoch step count is the same in every phase); the table gives the median over rounds and
the A/A's median and largest deviation. ``accuracy`` runs ``ToE/EfficientTrain/main.py --config
FILE`` plus the configuration's flags per configuration and seed (``--curriculum none`` for
full/toe/random) through ``bench.common.run_repeated``, which appends one JSON line per run
to ``bench/results/efficienttrain_runs.jsonl``; runs already there are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import lru_cache
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import token_select
from bench.common import (demo_config, describe_machine, git_commit, mean_std, read_runs, recipe, rotated, run_numbers,
                          run_repeated, run_trainer, trainer_command)
from ToE.common.config import scaled_stages
from ToE.common.digits import build_digits
from ToE.EfficientTrain.curriculum import freq_crop, plan_curriculum, segment_at
from ToE.flops import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
FIGS = os.path.join(ROOT, "Figs")
COMMAND = "python -m bench.efficienttrain " + " ".join(sys.argv[1:])
# Step timer: wall time; with --cpu-time the process's CPU time on one thread, which a busy shared
# host inflates far less than wall time (it still pays for cache and memory contention).
CLOCK = time.perf_counter
CONFIGS = ("full", "toe", "et", "et_toe", "random")
LABELS = {"full": "full tokens", "toe": "ToE", "et": "ET", "et_toe": "ET + ToE", "random": "random PatchDropout"}
DEMO = demo_config("et")


@lru_cache(maxsize=None)
def demo(recipe_file: str = DEMO) -> SimpleNamespace:
    """What the benches take from the recipe file (default: the EfficientTrain demo): the model
    (name, kwargs, input and patch size), the ToE schedule and the recipe's epochs and lr."""
    values = recipe("et", recipe_file)
    kwargs = dict(values.get("model_kwargs") or {})
    return SimpleNamespace(model=values["model"], kwargs=kwargs, size=int(values["input_size"]),
                           patch=int(values.get("patch_size") or kwargs["patch_size"]),
                           keep=[float(rate) for rate in values["keep_rate"]],
                           init=float(values["initialization_keep_rate"]),
                           multiple=int(values.get("expansion_multiple_stage", 2)),
                           steps=[int(step) for step in values["expansion_step"]], epochs=int(values["epochs"]),
                           lr=float(values["lr"]), initialization=values.get("initialization", "stride"))


def expansion_steps(epochs: int, recipe_file: str = DEMO) -> List[int]:
    """The recipe's stage starts scaled to an ``epochs``-long run."""
    spec = demo(recipe_file)
    return scaled_stages(spec.steps, spec.epochs, epochs)


def config_flags(config: str, epochs: int, recipe_file: str = DEMO) -> List[str]:
    """main.py flags of one configuration (besides the recipe file, data and output)."""
    spec = demo(recipe_file)
    curriculum = ["--curriculum", "et" if config.startswith("et") else "none", "--epochs", str(epochs)]
    if config in ("full", "et"):
        toe = ["--expansion-step", "0", "--keep-rate", "1.0", "--initialization-keep-rate", str(spec.init)]
    else:
        toe = ["--expansion-step", *map(str, expansion_steps(epochs, recipe_file)), "--keep-rate",
               *map(str, spec.keep), "--initialization-keep-rate", str(spec.init)]
    return curriculum + toe + (["--token-drop", "random"] if config == "random" else [])


def phases(config: str, epochs: int, recipe_file: str = DEMO) -> List[Tuple[int, int, str]]:
    """(crop, kept patch tokens, method) of every epoch of ``config``; method toe/random/off."""
    spec = demo(recipe_file)
    segments = plan_curriculum("et" if config.startswith("et") else "none", epochs, spec.size, spec.patch, 1, 2)
    operator = token_select.TokenSelect(expansion_steps(epochs, recipe_file), spec.keep, spec.init, spec.multiple)
    rows = []
    for epoch in range(epochs):
        crop = segment_at(segments, epoch).crop
        patches = (crop // spec.patch) ** 2
        operator.update_current_stage(epoch)
        kept = patches if config in ("full", "et") else operator.kept_patch_tokens(patches)
        method = "off" if kept == patches else ("random" if config == "random" else "toe")
        rows.append((crop, kept, method))
    return rows


def step_flops(crop: int, kept: int, method: str, recipe_file: str = DEMO) -> float:
    """Analytic FLOPs of one training step per sample (``token_select.vit_step_flops``)."""
    spec = demo(recipe_file)
    patches, dim = (crop // spec.patch) ** 2, 3 * spec.patch * spec.patch
    common = dict(embed_dim=spec.kwargs["embed_dim"], depth=spec.kwargs["depth"], patch_dim=dim, num_classes=10)
    if method == "random":  # every block, block 0 included, runs on the kept tokens; the embedding on all
        return token_select.vit_step_flops(kept, **common) + 3 * 2.0 * (patches - kept) * dim * spec.kwargs["embed_dim"]
    return token_select.vit_step_flops(patches, kept_patches=kept, **common)


# ---------------------------------------------------------------------------------------------
# speed: interleaved step times
# ---------------------------------------------------------------------------------------------
def measure_speed(epochs: int, steps: int, warmup: int, batch: int, log=print,
                  recipe_file: str = DEMO) -> Dict[str, object]:
    spec = demo(recipe_file)
    kwargs, size, patch = {k: v for k, v in spec.kwargs.items() if k != "patch_size"}, spec.size, spec.patch
    torch.manual_seed(0)
    model = create_model(spec.model, size, patch, num_classes=10, dynamic_img_size=True, **kwargs).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    per_config = {config: phases(config, epochs, recipe_file) for config in CONFIGS}
    keys = sorted({row for rows in per_config.values() for row in rows})
    names = [f"{c}/{k}/{m}" for c, k, m in keys] + ["A/A full"]

    def configure(key: str) -> None:
        crop, kept, method = (size, (size // patch) ** 2, "off") if key == "A/A full" else \
            (int(key.split("/")[0]), int(key.split("/")[1]), key.split("/")[2])
        patches = (crop // patch) ** 2
        token_select.detach(model)
        model.patch_drop = nn.Identity()
        if method == "toe":  # the run's own schedule, in the stage that keeps `kept` on this grid
            steps = expansion_steps(epochs, recipe_file)
            operator = token_select.TokenSelect(steps, spec.keep, spec.init, spec.multiple,
                                                initialization=spec.initialization,
                                                grid_size=(crop // patch, crop // patch))
            token_select.attach(model, operator)
            operator.current_stage = next(s for s in (1, 2) if (operator.update_current_stage(
                steps[s - 1]), operator.kept_patch_tokens(patches))[1] == kept)
        elif method == "random":
            from timm.layers import PatchDropout
            model.patch_drop = PatchDropout(1.0 - (kept + 0.5) / patches, num_prefix_tokens=1)
        return crop

    def train_step(crop: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        x = freq_crop(images, crop) if crop != size else images
        nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()

    rounds = []
    for index in range(warmup + steps):
        seconds = {}
        for key in rotated(names, index):
            crop = configure(key)
            start = CLOCK()
            train_step(crop)
            seconds[key] = CLOCK() - start
        rounds.append({"warmup": index < warmup, "seconds": seconds})
        log(f"[bench] round {index + 1}/{warmup + steps}" + (" (warm-up)" if index < warmup else ""))
    results = speedups(rounds, epochs, recipe_file)
    timed = [r["seconds"] for r in rounds if not r["warmup"]]
    aa = [r["A/A full"] / r[f"{size}/{(size // patch) ** 2}/off"] for r in timed]
    return {"machine": describe_machine(), "commit": git_commit(), "load_before": os.getloadavg(),
            "clock": CLOCK.__name__,
            "epochs": epochs, "batch": batch, "steps": steps, "warmup": warmup, "configs": results,
            "aa_control": {"median": statistics.median(aa), "max_deviation": max(abs(1 - a) for a in aa)},
            "rounds": rounds, "command": COMMAND}


def speedups(rounds: Sequence[Dict[str, object]], epochs: int, recipe_file: str = DEMO) -> Dict[str, Dict[str, float]]:
    """Per configuration: the median over rounds of the run-level speedup (sum over the epochs of
    the full step / sum of the configuration's phase steps) and the FLOP-ideal one, for a run of
    ``epochs`` epochs (any length whose phases were timed)."""
    size, patch = demo(recipe_file).size, demo(recipe_file).patch
    timed = [r["seconds"] for r in rounds if not r["warmup"]]
    full_key = f"{size}/{(size // patch) ** 2}/off"
    results = {}
    for config in CONFIGS:
        rows = phases(config, epochs, recipe_file)
        run_times = [sum(r[f"{c}/{k}/{m}"] for c, k, m in rows) for r in timed]
        full_times = [r[full_key] * epochs for r in timed]
        ideal = step_flops(size, (size // patch) ** 2, "off", recipe_file) * epochs / sum(
            step_flops(*row, recipe_file) for row in rows)
        results[config] = {"measured_speedup": statistics.median(f / t for f, t in zip(full_times, run_times)),
                           "ideal_speedup": ideal}
    return results


# ---------------------------------------------------------------------------------------------
# posembed: the position table per forward (dynamic) vs a table resized once (fixed at the crop)
# ---------------------------------------------------------------------------------------------
def measure_posembed(steps: int, warmup: int, batch: int, crop: int = 24, log=print,
                     recipe_file: str = DEMO) -> Dict[str, object]:
    spec = demo(recipe_file)
    name, size, patch = spec.model, spec.size, spec.patch
    kwargs = {k: v for k, v in spec.kwargs.items() if k != "patch_size"}
    torch.manual_seed(0)
    models = {"per-forward (table at 32 px, interpolated)": create_model(name, size, patch, num_classes=10,
                                                                         dynamic_img_size=True, **kwargs),
              "resized once (table at the crop)": create_model(name, crop, patch, num_classes=10, **kwargs)}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=spec.lr) for k, m in models.items()}
    images, labels = torch.randn(batch, 3, crop, crop), torch.randint(0, 10, (batch,))
    rounds = []
    for index in range(warmup + steps):
        seconds = {}
        for key in rotated(list(models), index):
            model, optimizer = models[key].train(), optimizers[key]
            start = CLOCK()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            seconds[key] = CLOCK() - start
        if index >= warmup:
            rounds.append(seconds)
    keys = list(models)
    ratio = [r[keys[0]] / r[keys[1]] for r in rounds]
    return {"machine": describe_machine(), "load_before": os.getloadavg(), "crop": crop, "batch": batch,
            "clock": CLOCK.__name__,
            "median_s": {k: statistics.median(r[k] for r in rounds) for k in keys},
            "per_forward_over_resized": {"median": statistics.median(ratio), "min": min(ratio), "max": max(ratio)},
            "rounds": rounds, "command": COMMAND}


# ---------------------------------------------------------------------------------------------
# accuracy: the real trainer
# ---------------------------------------------------------------------------------------------
def run_command(config: str, seed: int, epochs: int, data: str, out: str, recipe_file: str = DEMO) -> List[str]:
    """The EfficientTrain command of one run: the recipe file, then the configuration's flags."""
    return trainer_command("et", recipe_file, *config_flags(config, epochs, recipe_file), "--seed", seed,
                           "--data-path", data, "--output_dir", out, "--overwrite")


def run_one(config: str, seed: int, epochs: int, data: str, work: str, recipe_file: str = DEMO) -> Dict[str, object]:
    out = os.path.join(work, f"{config}-e{epochs}-s{seed}")
    cmd = run_command(config, seed, epochs, data, out, recipe_file)
    wall = run_trainer(cmd, out)
    numbers = run_numbers(out)
    return {"config": config, "seed": seed, "epochs": epochs, "top1": numbers["acc1"],
            "train_seconds": numbers["train_seconds"], "wall_seconds": wall,
            "load_after": os.getloadavg(), "command": " ".join(cmd)}


def render(runs_path: str, speed_path: str, out_md: str, fig_path: Optional[str], epochs: int,
           recipe_file: str = DEMO) -> str:
    """The table (runs of ``epochs`` epochs only) into ``out_md``, the figure into ``fig_path``."""
    runs = [r for r in read_runs(runs_path) if r["epochs"] == epochs]
    speed = json.load(open(speed_path)) if os.path.isfile(speed_path) else None
    lines = []
    if speed:
        # the phases of an `epochs`-long run from the stored step times (the same phase set)
        speed["configs"] = speedups(speed["rounds"], epochs, recipe_file)
        aa = speed["aa_control"]
        lines += [f"Step-level speed: `{speed['command']}` ({speed['steps']} rounds, batch {speed['batch']}, "
                  f"speedups for {epochs}-epoch runs; {speed.get('clock', 'perf_counter')} clock, "
                  f"{speed['machine']['torch_threads']} thread(s), {speed['machine']['cpu_count']} cores, load before "
                  f"{speed['load_before'][0]:.2f}); A/A control (full vs full): median {aa['median']:.3f}, largest "
                  f"deviation {aa['max_deviation']:.3f}", ""]
    lines += ["| configuration | top-1 % (mean ± std) | seeds | epochs | FLOP-ideal speedup | measured step-level "
              "speedup | train wall time (s, mean) | host load after |", "|---|---|---|---|---|---|---|---|"]
    points = []
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config]
        ideal = speed["configs"][config]["ideal_speedup"] if speed else None
        measured = speed["configs"][config]["measured_speedup"] if speed else None
        if mine:
            mean, std = mean_std([r["top1"] for r in mine])
            seconds = statistics.fmean(r["train_seconds"] for r in mine)
            load = max(r["load_after"][0] for r in mine)
            acc = f"{mean:.2f} ± {std:.2f}" if len(mine) > 1 else f"{mean:.2f} (one seed: no spread)"
            points.append((config, mean, std, measured))
        else:
            acc, seconds, load = "not run", None, None
        lines.append(f"| {LABELS[config]} | {acc} | {len(mine)} | {mine[0]['epochs'] if mine else '-'} | "
                     f"{f'{ideal:.2f}x' if ideal else '-'} | {f'{measured:.2f}x' if measured else '-'} | "
                     f"{f'{seconds:.0f}' if seconds else '-'} | {f'{load:.1f}' if load else '-'} |")
    text = "\n".join(lines) + "\n"
    with open(out_md, "w") as handle:
        handle.write(text)
    if fig_path and points and speed:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for config, mean, std, measured in points:
            ax.errorbar(measured, mean, yerr=std, fmt="o", capsize=3, label=LABELS[config])
        ax.set_xlabel("measured step-level speedup vs full tokens (x)")
        ax.set_ylabel("top-1 on digits (%)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(fig_path, dpi=110)
    return text


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["speed", "accuracy", "posembed", "render"])
    parser.add_argument("--config", default=DEMO, help="the recipe file the configurations start from "
                        "(default: the EfficientTrain demo's)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of a run (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "digits"))
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "bench-efficienttrain"))
    parser.add_argument("--out", default=RESULTS, help="folder of the results (default: bench/results; the figure "
                        "goes to Figs/ there, into this folder otherwise)")
    parser.add_argument("--runs", default=None, help="the runs' .jsonl (default: OUT/efficienttrain_runs.jsonl)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time steps in CPU seconds of this process, on 1 thread (for a busy shared host)")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or demo(args.config).epochs
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
        torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    args.runs = args.runs or os.path.join(args.out, "efficienttrain_runs.jsonl")
    speed_path = os.path.join(args.out, "efficienttrain_speed.json")
    if args.what == "speed":
        with open(speed_path, "w") as handle:
            json.dump(measure_speed(args.epochs, args.steps, args.warmup, args.batch,
                                    recipe_file=args.config), handle, indent=1)
    elif args.what == "posembed":
        result = measure_posembed(args.steps, args.warmup, args.batch, recipe_file=args.config)
        with open(os.path.join(args.out, "efficienttrain_posembed.json"), "w") as handle:
            json.dump(result, handle, indent=1)
        print(json.dumps({k: result[k] for k in ("median_s", "per_forward_over_resized", "load_before")}, indent=1))
        return
    elif args.what == "accuracy":
        build_digits(args.data, size=32)

        def run(config: str, seed: int) -> Dict[str, object]:
            row = run_one(config, seed, args.epochs, args.data, args.work, args.config)
            print(f"[bench] {config} seed {seed}: top-1 {row['top1']:.2f} %, {row['train_seconds']:.0f} s", flush=True)
            return row

        # seed-major, the order rotated per seed; runs of these epochs already in --runs are kept
        run_repeated(args.configs, args.seeds, run, args.runs, keep=lambda row: row["epochs"] == args.epochs)
    figs = FIGS if os.path.abspath(args.out) == os.path.abspath(RESULTS) else args.out
    print(render(args.runs, speed_path, os.path.join(args.out, f"efficienttrain_e{args.epochs}.md"),
                 os.path.join(figs, f"efficienttrain_e{args.epochs}.png"), args.epochs, args.config))


if __name__ == "__main__":
    main()
