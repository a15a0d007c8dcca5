"""The embedded mini-table: accuracy and training time of ToE against full tokens on digits.

    python -m bench.accuracy                 # 7 configs x 3 seeds, about 75 min on 2 cores
    python -m bench.accuracy --quick         # smoke run: 3 epochs, 1 seed, its own folders
    python -m bench.accuracy --resume        # keep the runs already in runs.jsonl, do the rest
    python -m bench.accuracy --render        # train nothing: rewrite the tables from runs.jsonl

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

Runs are interleaved (seed 0: full, ToE..., seed 1: full, ToE...) so drift of the machine hits
every configuration alike; before each run the script waits for other processes to go quiet
and records the CPU they took during the run. Writes ``bench/results/accuracy.{md,json}``
(mean and std over seeds of top-1 and of training time, speedup over full tokens) and the runs
one per line in ``runs.jsonl``; ``python -m bench.figures accuracy`` draws the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from bench.machine import CpuWatch, describe_machine, wait_until_quiet
from ToE.common.digits import build_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")

__all__ = ["CONFIGS", "DEMO_TRAINER_ARGS", "config_args", "read_log", "summarise", "format_markdown", "main"]

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
    return {"acc1": float(epochs[-1]["test_acc1"]), "best_acc1": max(float(r["test_acc1"]) for r in epochs),
            "epochs_logged": len(epochs), "time_key": time_key,
            "train_seconds": sum(seconds) if time_key else None,
            "robust_train_seconds": robust_seconds(seconds, [r.get("stage", 0) for r in epochs]) if seconds else None,
            "fastest_train_seconds": (robust_seconds(seconds, [r.get("stage", 0) for r in epochs], min)
                                      if seconds else None),
            "slow_epochs": slow_epochs(seconds, [r.get("stage", 0) for r in epochs]) if seconds else 0,
            "epoch_seconds": seconds, "acc1_per_epoch": [float(r["test_acc1"]) for r in epochs]}


def slow_epochs(epoch_seconds: Sequence[float], stages: Sequence[int], factor: float = 1.25) -> int:
    """Epochs that took over ``factor`` times their stage's median: a trace of other processes' load."""
    medians = {stage: statistics.median([t for t, s in zip(epoch_seconds, stages) if s == stage])
               for stage in set(stages)}
    return sum(t > factor * medians[s] for t, s in zip(epoch_seconds, stages))


def robust_seconds(epoch_seconds: Sequence[float], stages: Sequence[int], statistic=statistics.median) -> float:
    """Training seconds with each epoch counted at its stage's median (or ``statistic``) epoch time.

    Every epoch of one stage does the same work, so the median is the undisturbed time; a few
    epochs slowed by other processes on a shared machine then do not move the total. With
    ``statistic=min`` it is the fastest epoch of each stage: the estimate least touched by load
    that lasted a whole stage (timeit's rule).
    """
    total = 0.0
    for stage in sorted(set(stages)):
        mine = [t for t, s in zip(epoch_seconds, stages) if s == stage]
        total += statistic(mine) * len(mine)
    return total


def _mean_std(values: Sequence[float]) -> tuple:
    values = list(values)
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: Sequence[Dict[str, object]], order: Sequence[str]) -> List[Dict[str, object]]:
    """Mean and std over seeds of top-1 and training time per configuration, speedup vs full."""
    rows = []
    for name in order:
        mine = [r for r in runs if r["config"] == name]
        if not mine:
            continue
        acc_mean, acc_std = _mean_std(r["acc1"] for r in mine)
        time_mean, time_std = _mean_std(r["time_s"] for r in mine)
        robust = [r.get("robust_time_s", r["time_s"]) for r in mine]
        robust_mean, robust_std = _mean_std(robust)
        fastest = [r.get("fastest_time_s", r["time_s"]) for r in mine]
        fastest_mean, fastest_std = _mean_std(fastest)
        rows.append({"config": name, "label": label_of(name), "seeds": [r["seed"] for r in mine],
                     "acc1_mean": acc_mean, "acc1_std": acc_std, "time_mean": time_mean, "time_std": time_std,
                     "robust_time_mean": robust_mean, "robust_time_std": robust_std,
                     "fastest_time_mean": fastest_mean, "fastest_time_std": fastest_std,
                     "acc1_runs": [r["acc1"] for r in mine], "time_runs": [r["time_s"] for r in mine],
                     "robust_time_runs": robust, "fastest_time_runs": fastest})
    full = next((r for r in rows if r["config"] == "full"), None)
    for row in rows:
        if full is not None:
            row["speedup"] = full["time_mean"] / row["time_mean"]
            row["robust_speedup"] = full["robust_time_mean"] / row["robust_time_mean"]
            row["fastest_speedup"] = full["fastest_time_mean"] / row["fastest_time_mean"]
            row["acc1_delta"] = row["acc1_mean"] - full["acc1_mean"]
            # "Within one spread": not below the full-token mean by more than the full-token std.
            row["within_one_spread"] = row["acc1_delta"] >= -full["acc1_std"]
        else:
            row["speedup"] = row["robust_speedup"] = row["fastest_speedup"] = 1.0
            row["acc1_delta"], row["within_one_spread"] = 0.0, True
    return rows


def format_markdown(results: Dict[str, object]) -> str:
    """The mini-table as markdown."""
    machine = results["machine"]
    lines = [f"Demo ViT (96 wide, 6 blocks, 64 tokens) on embedded digits, {results['epochs']} epochs, seeds "
             f"{results['seeds']}, expansion steps at thirds of the run, 2 repetition steps unless the "
             f"config says k. Time = seconds spent in training epochs (evaluation excluded; "
             f"source: {results['time_source']}). Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, "
             f"torch {machine['torch']}.", "",
             "| config | seeds | top-1 % (mean ± std) | Δ top-1 vs full | within one spread | train time s, raw "
             "| speedup, raw | speedup, stage medians | time s, stage fastest | speedup, stage fastest |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["summary"]:
        lines.append(f"| {row['label']} | {len(row['seeds'])} | {row['acc1_mean']:.2f} ± {row['acc1_std']:.2f} | "
                     f"{row['acc1_delta']:+.2f} | {'yes' if row['within_one_spread'] else 'no'} | "
                     f"{row['time_mean']:.1f} ± {row['time_std']:.1f} | {row['speedup']:.2f}x | "
                     f"{row['robust_speedup']:.2f}x | {row['fastest_time_mean']:.1f} ± {row['fastest_time_std']:.1f} | "
                     f"{row['fastest_speedup']:.2f}x |")
    disturbed = [r for r in results["runs"] if r.get("other_cpu_cores", 0) > results["max_other_cores"]]
    slow = sum(r.get("slow_epochs", 0) for r in results["runs"])
    total = sum(len(r.get("epoch_seconds", [])) for r in results["runs"])
    lines += ["", f"Runs: {len(results['runs'])}; disturbed by other processes (> {results['max_other_cores']} cores "
                  f"elsewhere on average): {len(disturbed)}; epochs slower than 1.25x their stage's median: "
                  f"{slow} of {total}."]
    return "\n".join(lines)


def _log_fields(parsed: Dict[str, object], wall: float) -> Dict[str, object]:
    """The per-run numbers kept in runs.jsonl (the subprocess wall time if the log has no times)."""
    time_s = parsed["train_seconds"] if parsed["train_seconds"] is not None else wall
    robust = parsed["robust_train_seconds"] if parsed["robust_train_seconds"] is not None else time_s
    fastest = parsed["fastest_train_seconds"] if parsed["fastest_train_seconds"] is not None else time_s
    return {"acc1": parsed["acc1"], "best_acc1": parsed["best_acc1"], "acc1_per_epoch": parsed["acc1_per_epoch"],
            "epoch_seconds": parsed["epoch_seconds"], "time_s": time_s, "robust_time_s": robust,
            "fastest_time_s": fastest,
            "slow_epochs": parsed["slow_epochs"],
            "time_key": parsed["time_key"]}


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
    watch = CpuWatch()
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    other = watch.stop()
    with open(os.path.join(out_dir, "stdout.txt"), "w") as handle:
        handle.write(completed.stdout)
    if completed.returncode != 0:
        raise RuntimeError(f"trainer failed ({name}, seed {seed}, exit {completed.returncode}):\n"
                           + completed.stdout[-3000:])
    parsed = read_log(log_path)
    time_s = _log_fields(parsed, wall)["time_s"]
    log(f"[accuracy]   top-1 {parsed['acc1']:.2f} %, train {time_s:.1f} s, wall {wall:.1f} s, "
        f"other processes {other['other_cpu_cores']:.2f} cores")
    return {"config": name, "seed": seed, **_log_fields(parsed, wall), "wall_s": wall,
            "time_key": parsed["time_key"], "other_cpu_cores": other["other_cpu_cores"],
            "load_average": other["load_average"], "busiest_other": other["busiest"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="configurations to train")
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
    parser.add_argument("--max-other-cores", type=float, default=0.3,
                        help="a run during which other processes used more CPU than this is re-run once")
    parser.add_argument("--no-wait", action="store_true",
                        help="start each run at once instead of waiting for other processes to go quiet")
    parser.add_argument("--max-wait", type=float, default=300.0,
                        help="seconds to wait for a quiet machine before a run; then it runs anyway, flagged")
    parser.add_argument("--render", action="store_true",
                        help="train nothing: rewrite accuracy.{md,json} from the runs in runs.jsonl")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in runs.jsonl")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 epochs, seed 0, no waiting, results in a temporary folder")
    parser.add_argument("--out", default=None,
                        help="folder for accuracy.{md,json} and the runs "
                             "(default: bench/results; with --quick: a temporary folder)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.no_wait = 3, [0], True
    suffix = "_quick" if args.quick else ""
    # A smoke run never shares run folders with the real table.
    args.work_dir += suffix
    args.out = args.out or (os.path.join(tempfile.gettempdir(), "toe_bench") if args.quick else RESULTS)
    os.makedirs(args.out, exist_ok=True)
    runs_path = os.path.join(args.out, f"accuracy_runs{suffix}.jsonl")
    runs: List[Dict[str, object]] = []
    if args.render:
        # runs.jsonl holds every number of every run, so the per-run folders are not needed.
        if not os.path.exists(runs_path):
            build_parser().error(f"--render: no runs to render in {runs_path}; train them first "
                                 f"(python -m bench.accuracy) or pass the --out folder that holds them")
        with open(runs_path) as handle:
            runs = [json.loads(line) for line in handle if line.strip()]
        args.seeds = sorted({r["seed"] for r in runs})
        args.configs = [c for c in CONFIGS if any(r["config"] == c for r in runs)]
        args.epochs = runs[0]["epochs"]
    elif args.resume and os.path.exists(runs_path):
        with open(runs_path) as handle:
            runs = [json.loads(line) for line in handle if line.strip()]
        runs = [r for r in runs if r.get("epochs") == args.epochs]
    elif os.path.exists(runs_path):
        os.remove(runs_path)
    if not args.render:
        build_digits(args.data_path, size=32)
        done = {(r["config"], r["seed"]) for r in runs}
        for seed in args.seeds:
            for name in args.configs:
                if (name, seed) in done:
                    continue
                for attempt in range(2):
                    if not args.no_wait:
                        wait_until_quiet(max_other_cores=0.15, poll_seconds=30, max_wait_seconds=args.max_wait)
                    run = run_one(name, seed, args, args.data_path)
                    if run["other_cpu_cores"] <= args.max_other_cores or attempt == 1 or args.no_wait:
                        break
                    print(f"[accuracy]   disturbed ({run['other_cpu_cores']:.2f} cores elsewhere): running it again")
                run["epochs"] = args.epochs
                runs.append(run)
                with open(runs_path, "a") as handle:
                    handle.write(json.dumps(run) + "\n")
    time_keys = {r["time_key"] for r in runs}
    machine = describe_machine()
    command = "python -m bench.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    json_path = os.path.join(args.out, f"accuracy{suffix}.json")
    if args.render and os.path.exists(json_path):
        # Re-rendering changes the tables, not where and how the runs were trained.
        with open(json_path) as handle:
            previous = json.load(handle)
        machine, command = previous.get("machine", machine), previous.get("command", command)
    results = {"machine": machine, "epochs": args.epochs, "seeds": args.seeds,
               "batch_size": args.batch_size,
               "lr": args.lr, "trainer_args": args.trainer_args, "max_other_cores": args.max_other_cores,
               "time_source": ("log.txt " + "/".join(sorted(k for k in time_keys if k))) if None not in time_keys
               else "subprocess wall time",
               "command": command,
               "configs": {name: {"label": label_of(name), "trainer_flags": config_args(name, args.epochs)}
                           for name in args.configs},
               "runs": runs, "summary": summarise(runs, args.configs)}
    with open(json_path, "w") as handle:
        json.dump(results, handle, indent=2)
    table = format_markdown(results)
    with open(os.path.join(args.out, f"accuracy{suffix}.md"), "w") as handle:
        handle.write(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
