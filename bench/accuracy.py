"""The embedded mini-table: accuracy and training time of ToE against full tokens on digits.

    python -m bench.accuracy                 # 7 configs x 3 seeds, about 75 min on 2 cores
    python -m bench.accuracy --quick         # smoke run: 3 epochs, 1 seed, its own folders
    python -m bench.accuracy --resume        # keep the runs already in accuracy_runs.jsonl, do the rest
    python -m bench.accuracy --render        # train nothing: rewrite the tables from accuracy_runs.jsonl

Trains the demo model (timm ``vit_tiny_patch16_224`` at 96 wide, 6 blocks, 3 heads, 32 px
images, 4 px patches: 64 tokens) on the embedded digits data through the real DeiT trainer
``ToE/deit/main.py`` (a subprocess per run), reading each run's ``log.txt`` (JSON lines): the
final test top-1 and the seconds spent training. Configurations (all for the same epochs, the
expansion steps at thirds of the run):

- ``full``: full tokens (the schedule ``--expansion-step 0 --keep-rate 1.0``, i.e. ToE off);
- ``deit-stride`` / ``deit-uniform``: the DeiT schedule 0.5 0.75 1.0 / r0 0.25, published
  (stride) and uniform seeds;
- ``aggressive-stride`` / ``aggressive-uniform``: 0.4 0.7 1.0 / r0 0.2 (the LV-ViT rates);
- ``deit-stride-k1`` / ``deit-stride-k3``: the DeiT schedule with stride seeds and 1 or 3
  repetition steps per stage instead of 2 (``--expansion-multiple-stage``).

Runs are interleaved by seed (every configuration with seed 0, then with seed 1, ...) and the
order of the configurations rotates from seed to seed (seed i starts at configuration i mod n),
so drift of the machine and the place in the order hit every configuration alike. Every run is
kept: one JSON line each in ``accuracy_runs.jsonl``, in the order they ran. The tables in
``bench/results/accuracy.{md,json}`` pair each ToE run with the full-token run of the same
seed: the mean paired difference in top-1 and its standard error over the seeds, the mean
paired time ratio (speedup) and its standard error; and, per schedule, uniform against stride
seeds paired the same way. ``python -m bench.figures accuracy`` draws the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from bench.common import describe_machine, git_commit, rotated
from ToE.common.digits import build_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")

__all__ = ["CONFIGS", "DEMO_TRAINER_ARGS", "SEED_RULE_PAIRS", "config_args", "read_log", "paired_by_seed",
           "mean_se", "summarise", "seed_rule", "format_markdown", "main"]

# The demo model and recipe of run/demo.sh (keep the two in step): a small ViT, AdamW at 1e-3
# (not rescaled by the batch), cosine to 1e-5 after 3 warm-up epochs, light augmentation only
# (the 8x8 digits upscaled to 32 px do not suit RandAugment, mixup or flips), no EMA.
DEMO_TRAINER_ARGS = ["--device", "cpu", "--model", "vit_tiny_patch16_224",
                     "--model-kwargs", "embed_dim=96", "depth=6", "num_heads=3",
                     "--input-size", "32", "--patch-size", "4", "--crop-pct", "1.0",
                     "--unscale-lr", "--min-lr", "1e-5", "--warmup-epochs", "3", "--weight-decay", "0.05",
                     "--drop-path", "0.1", "--smoothing", "0.1", "--aa", "none", "--reprob", "0", "--mixup", "0",
                     "--cutmix", "0", "--hflip", "0", "--scale", "0.6", "1.0", "--no-repeated-aug", "--no-model-ema"]

# name -> (label, keep rates, initialization keep rate, seed rule, repetition steps); None = full tokens
CONFIGS: Dict[str, Optional[tuple]] = {
    "full": None,
    "deit-stride": ("ToE 0.5/0.75/1.0, r0 0.25, stride seeds", [0.5, 0.75, 1.0], 0.25, "stride", 2),
    "deit-uniform": ("ToE 0.5/0.75/1.0, r0 0.25, uniform seeds", [0.5, 0.75, 1.0], 0.25, "uniform", 2),
    "aggressive-stride": ("ToE 0.4/0.7/1.0, r0 0.2, stride seeds", [0.4, 0.7, 1.0], 0.2, "stride", 2),
    "aggressive-uniform": ("ToE 0.4/0.7/1.0, r0 0.2, uniform seeds", [0.4, 0.7, 1.0], 0.2, "uniform", 2),
    "deit-stride-k1": ("ToE 0.5/0.75/1.0, r0 0.25, stride seeds, k=1", [0.5, 0.75, 1.0], 0.25, "stride", 1),
    "deit-stride-k3": ("ToE 0.5/0.75/1.0, r0 0.25, stride seeds, k=3", [0.5, 0.75, 1.0], 0.25, "stride", 3),
}

# (uniform-seed config, stride-seed config) of one schedule: compared seed by seed.
SEED_RULE_PAIRS = (("deit-uniform", "deit-stride"), ("aggressive-uniform", "aggressive-stride"))

# Keys a trainer may use for the seconds one epoch spent training, evaluation excluded (first
# found wins; ToE/deit writes "epoch_seconds").
_TIME_KEYS = ("epoch_seconds", "train_time", "train_seconds", "epoch_time")


def label_of(name: str) -> str:
    return "full tokens" if CONFIGS.get(name) is None else CONFIGS[name][0]


def config_args(name: str, epochs: int) -> List[str]:
    """The trainer's ToE flags for configuration ``name``: stages start at thirds of the run."""
    spec = CONFIGS[name]
    if spec is None:
        # A one-stage schedule that keeps every token: the operator never reduces.
        return ["--expansion-step", "0", "--keep-rate", "1.0", "--initialization-keep-rate", "1.0"]
    _, rates, r0, initialization, expansion_multiple_stage = spec
    steps = [round(i * epochs / len(rates)) for i in range(len(rates))]
    return (["--expansion-step", *map(str, steps), "--keep-rate", *map(str, rates),
             "--initialization-keep-rate", str(r0), "--expansion-multiple-stage", str(expansion_multiple_stage),
             "--initialization", initialization])


def read_log(path: str) -> Dict[str, object]:
    """Final test top-1 and summed training seconds from a trainer's ``log.txt`` (JSON lines)."""
    records = []
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    epochs = [r for r in records if "test_acc1" in r]
    if not epochs:
        raise ValueError(f"{path}: no JSON line with test_acc1")
    time_key = next((k for k in _TIME_KEYS if isinstance(epochs[-1].get(k), (int, float))), None)
    seconds = [float(r[time_key]) for r in epochs] if time_key else []
    stages = [r.get("stage", 0) for r in epochs]
    return {"acc1": float(epochs[-1]["test_acc1"]), "best_acc1": max(float(r["test_acc1"]) for r in epochs),
            "epochs_logged": len(epochs), "time_key": time_key,
            "train_seconds": sum(seconds) if seconds else None,
            "robust_train_seconds": robust_seconds(seconds, stages) if seconds else None,
            "slow_epochs": slow_epochs(seconds, stages) if seconds else 0,
            "epoch_seconds": seconds, "acc1_per_epoch": [float(r["test_acc1"]) for r in epochs]}


def slow_epochs(epoch_seconds: Sequence[float], stages: Sequence[int], factor: float = 1.25) -> int:
    """Epochs that took over ``factor`` times their stage's median epoch (the same work, slower)."""
    medians = {stage: statistics.median([t for t, s in zip(epoch_seconds, stages) if s == stage])
               for stage in set(stages)}
    return sum(t > factor * medians[s] for t, s in zip(epoch_seconds, stages))


def robust_seconds(epoch_seconds: Sequence[float], stages: Sequence[int]) -> float:
    """Training seconds with each epoch counted at its stage's median epoch time.

    Every epoch of one stage does the same work, so a few epochs slowed by the machine do not
    move the total; every epoch still counts.
    """
    total = 0.0
    for stage in sorted(set(stages)):
        mine = [t for t, s in zip(epoch_seconds, stages) if s == stage]
        total += statistics.median(mine) * len(mine)
    return total


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_se(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and standard error (sample std / sqrt(n)); the error is None for fewer than 2 values."""
    values = list(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return statistics.fmean(values), se


def paired_by_seed(runs: Sequence[Dict[str, object]], config: str, reference: str,
                   combine: Callable[[Dict[str, object], Dict[str, object]], float]) -> List[Tuple[int, float]]:
    """(seed, combine(run of ``config``, run of ``reference`` with that seed)) for each seed both have."""
    references = {r["seed"]: r for r in runs if r["config"] == reference}
    return sorted((r["seed"], combine(r, references[r["seed"]]))
                  for r in runs if r["config"] == config and r["seed"] in references)


def _acc_difference(run, reference):
    return run["acc1"] - reference["acc1"]


def _speedup(run, reference):
    return reference["time_s"] / run["time_s"]


def _robust_speedup(run, reference):
    return reference.get("robust_time_s", reference["time_s"]) / run.get("robust_time_s", run["time_s"])


def summarise(runs: Sequence[Dict[str, object]], order: Sequence[str]) -> List[Dict[str, object]]:
    """Per configuration: mean and std over seeds, and the statistics paired by seed with full tokens."""
    full = [r["acc1"] for r in runs if r["config"] == "full"]
    full_std = _mean_std(full)[1] if full else None
    rows = []
    for name in order:
        mine = [r for r in runs if r["config"] == name]
        if not mine:
            continue
        row = {"config": name, "label": label_of(name), "seeds": [r["seed"] for r in mine],
               "acc1_runs": [r["acc1"] for r in mine], "time_runs": [r["time_s"] for r in mine],
               "robust_time_runs": [r.get("robust_time_s", r["time_s"]) for r in mine]}
        row["acc1_mean"], row["acc1_std"] = _mean_std(row["acc1_runs"])
        row["time_mean"], row["time_std"] = _mean_std(row["time_runs"])
        row["robust_time_mean"], row["robust_time_std"] = _mean_std(row["robust_time_runs"])
        for key, combine in (("acc1_delta", _acc_difference), ("speedup", _speedup),
                             ("robust_speedup", _robust_speedup)):
            pairs = paired_by_seed(runs, name, "full", combine)
            row[f"{key}_per_seed"] = pairs
            row[key], row[f"{key}_se"] = mean_se([v for _, v in pairs]) if pairs else (None, None)
        # "Within one spread": not below full tokens by more than full tokens' std over seeds.
        row["within_one_spread"] = None if row["acc1_delta"] is None else row["acc1_delta"] >= -full_std
        rows.append(row)
    return rows


def seed_rule(runs: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per schedule of ``SEED_RULE_PAIRS``: uniform minus stride top-1, paired by seed."""
    comparisons = []
    for uniform, stride in SEED_RULE_PAIRS:
        pairs = paired_by_seed(runs, uniform, stride, _acc_difference)
        if pairs:
            mean, se = mean_se([v for _, v in pairs])
            comparisons.append({"uniform": uniform, "stride": stride, "per_seed": pairs, "mean": mean, "se": se,
                                "schedule": label_of(uniform).replace(", uniform seeds", "")})
    return comparisons


def _with_se(mean: Optional[float], se: Optional[float], spec: str, suffix: str = "") -> str:
    if mean is None:
        return "n/a"
    return f"{mean:{spec}}{suffix}" + ("" if se is None else f" ± {se:.2f}")


def format_markdown(results: Dict[str, object]) -> str:
    """The mini-table, its paired statistics and the order the runs ran in, as markdown."""
    machine = results["machine"]
    seeds = len(results["seeds"])
    lines = [f"Command: `{results['command'].strip()}` (commit {results.get('commit') or 'not recorded'}). "
             f"Demo ViT (96 wide, 6 blocks, 64 tokens) on embedded digits, {results['epochs']} epochs, seeds "
             f"{results['seeds']}, expansion steps at thirds of the run, 2 repetition steps unless the "
             f"config says k. Time = seconds spent in training epochs (evaluation excluded; "
             f"source: {results['time_source']}). Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, "
             f"torch {machine['torch']}.", "",
             "| config | seeds | top-1 % (mean ± std) | Δ top-1 vs full, paired (mean ± SE) | within one spread "
             "| train time s (mean ± std) | speedup, paired (mean ± SE) "
             "| speedup at stage-median epochs, paired (mean ± SE) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["summary"]:
        if row["config"] == "full":
            paired = ["reference", "-", "reference", "reference"]
        else:
            paired = [_with_se(row["acc1_delta"], row["acc1_delta_se"], "+.2f"),
                      "n/a" if row["within_one_spread"] is None else ("yes" if row["within_one_spread"] else "no"),
                      _with_se(row["speedup"], row["speedup_se"], ".2f", "x"),
                      _with_se(row["robust_speedup"], row["robust_speedup_se"], ".2f", "x")]
        lines.append(f"| {row['label']} | {len(row['seeds'])} | {row['acc1_mean']:.2f} ± {row['acc1_std']:.2f} | "
                     f"{paired[0]} | {paired[1]} | {row['time_mean']:.1f} ± {row['time_std']:.1f} | "
                     f"{paired[2]} | {paired[3]} |")
    lines += ["", f"Paired by seed: each run is compared with the full-token run of the same seed (n = {seeds} "
                  "seeds); mean over seeds ± standard error (std of the n paired values / √n). Speedup = full-token "
                  "time / ToE time of the same seed. Within one spread: mean top-1 not below full tokens' by "
                  "more than full tokens' std over seeds."]
    for comparison in results.get("seed_rule", []):
        per_seed = ", ".join(f"{d:+.2f} (seed {s})" for s, d in comparison["per_seed"])
        lines += ["", f"Seed rule, {comparison['schedule']}: uniform − stride top-1, paired by seed: {per_seed}; "
                      f"mean {_with_se(comparison['mean'], comparison['se'], '+.2f')} points (± SE, "
                      f"n = {len(comparison['per_seed'])})."]
    order: Dict[int, List[str]] = {}
    for run in results["runs"]:
        order.setdefault(run["seed"], []).append(run["config"])
    slow = sum(r.get("slow_epochs", 0) for r in results["runs"])
    total = sum(len(r.get("epoch_seconds", [])) for r in results["runs"])
    lines += ["", f"Runs: {len(results['runs'])}, every one in the table. Order they ran in: "
                  + "; ".join(f"seed {s}: " + ", ".join(names) for s, names in order.items())
                  + f". Epochs slower than 1.25x their stage's median epoch: {slow} of {total}."]
    return "\n".join(lines)


def run_one(name: str, seed: int, args, data_path: str, log=print) -> Dict[str, object]:
    """Train one configuration with one seed through the trainer; return its numbers."""
    out_dir = os.path.join(args.work_dir, f"{name}_seed{seed}")
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "log.txt")
    if os.path.exists(log_path):
        os.remove(log_path)  # a stale log from an earlier run must not be read back
    command = [sys.executable, os.path.join(ROOT, "ToE", "deit", "main.py"), *DEMO_TRAINER_ARGS,
               "--data-path", data_path, "--output_dir", out_dir, "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(seed),
               "--num_workers", "0", *config_args(name, args.epochs),
               *args.trainer_args]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log(f"[accuracy] {name} seed {seed}: {' '.join(command[1:])}")
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    with open(os.path.join(out_dir, "stdout.txt"), "w") as handle:
        handle.write(completed.stdout)
    if completed.returncode != 0:
        raise RuntimeError(f"trainer failed ({name}, seed {seed}, exit {completed.returncode}):\n"
                           + completed.stdout[-3000:])
    parsed = read_log(log_path)
    # Without per-epoch times in the log, the subprocess wall time stands in for both.
    time_s = parsed["train_seconds"] if parsed["train_seconds"] is not None else wall
    robust = parsed["robust_train_seconds"] if parsed["robust_train_seconds"] is not None else time_s
    log(f"[accuracy]   top-1 {parsed['acc1']:.2f} %, train {time_s:.1f} s, wall {wall:.1f} s")
    return {"config": name, "seed": seed, "epochs": args.epochs, "acc1": parsed["acc1"],
            "best_acc1": parsed["best_acc1"], "acc1_per_epoch": parsed["acc1_per_epoch"],
            "epoch_seconds": parsed["epoch_seconds"], "time_s": time_s, "robust_time_s": robust,
            "slow_epochs": parsed["slow_epochs"], "time_key": parsed["time_key"], "wall_s": wall}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="configurations to train (their order rotates from seed to seed)")
    parser.add_argument("--epochs", type=int, default=36, help="epochs per run (same for every config)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--batch-size", type=int, default=64, help="trainer --batch-size")
    parser.add_argument("--lr", type=float, default=1e-3, help="trainer --lr")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each training run")
    parser.add_argument("--data-path", default=os.path.join(ROOT, "data", "digits"),
                        help="embedded digits data at 32 px "
                             "(written by ToE.common.digits if missing, as run/demo.sh does)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "toe_accuracy"),
                        help="per-run output folders (checkpoints, logs); not part of the repository; "
                             "--quick uses WORK_DIR_quick")
    parser.add_argument("--trainer-args", nargs=argparse.REMAINDER, default=[],
                        help="everything after this flag goes to ToE/deit/main.py unchanged")
    parser.add_argument("--render", action="store_true",
                        help="train nothing: rewrite accuracy.{md,json} from the runs in accuracy_runs.jsonl")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in accuracy_runs.jsonl")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 epochs, seed 0, results in a temporary folder")
    parser.add_argument("--out", default=None,
                        help="folder for accuracy.{md,json} and the runs "
                             "(default: bench/results; with --quick: a temporary folder)")
    return parser


def _read_runs(path: str) -> List[Dict[str, object]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 3, [0]
    suffix = "_quick" if args.quick else ""
    # A smoke run never shares run folders with the real table.
    args.work_dir += suffix
    args.out = args.out or (os.path.join(tempfile.gettempdir(), "toe_bench") if args.quick else RESULTS)
    os.makedirs(args.out, exist_ok=True)
    runs_path = os.path.join(args.out, f"accuracy_runs{suffix}.jsonl")
    runs: List[Dict[str, object]] = []
    if args.render:
        # The runs file holds every number of every run, so the per-run folders are not needed.
        if not os.path.exists(runs_path):
            build_parser().error(f"--render: no runs to render in {runs_path}; train them first "
                                 f"(python -m bench.accuracy) or pass the --out folder that holds them")
        runs = _read_runs(runs_path)
        args.seeds = sorted({r["seed"] for r in runs})
        args.configs = [c for c in CONFIGS if any(r["config"] == c for r in runs)]
        args.epochs = runs[0]["epochs"]
    else:
        if args.resume and os.path.exists(runs_path):
            runs = [r for r in _read_runs(runs_path) if r.get("epochs") == args.epochs]
        elif os.path.exists(runs_path):
            os.remove(runs_path)
        build_digits(args.data_path, size=32)
        done = {(r["config"], r["seed"]) for r in runs}
        for index, seed in enumerate(args.seeds):
            for name in rotated(args.configs, index):
                if (name, seed) in done:
                    continue
                run = run_one(name, seed, args, args.data_path)
                runs.append(run)
                with open(runs_path, "a") as handle:
                    handle.write(json.dumps(run) + "\n")
    time_keys = {r["time_key"] for r in runs}
    provenance = {"machine": describe_machine(), "commit": git_commit(),
                  "command": " ".join(["python -m bench.accuracy", *(sys.argv[1:] if argv is None else argv)])}
    json_path = os.path.join(args.out, f"accuracy{suffix}.json")
    if args.render and os.path.exists(json_path):
        # Re-rendering changes the tables, not where, how and at which commit the runs were trained.
        with open(json_path) as handle:
            previous = json.load(handle)
        provenance = {key: previous.get(key) for key in provenance}
    results = {**provenance, "epochs": args.epochs, "seeds": args.seeds, "batch_size": args.batch_size,
               "lr": args.lr, "trainer_args": args.trainer_args,
               "time_source": ("log.txt " + "/".join(sorted(k for k in time_keys if k))) if None not in time_keys
               else "subprocess wall time",
               "configs": {name: {"label": label_of(name), "trainer_flags": config_args(name, args.epochs)}
                           for name in args.configs},
               "runs": runs, "summary": summarise(runs, args.configs), "seed_rule": seed_rule(runs)}
    with open(json_path, "w") as handle:
        json.dump(results, handle, indent=2)
    table = format_markdown(results)
    with open(os.path.join(args.out, f"accuracy{suffix}.md"), "w") as handle:
        handle.write(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
