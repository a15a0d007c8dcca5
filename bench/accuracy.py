"""The embedded mini-table: accuracy and training time of ToE against full tokens on digits.

    python -m bench.accuracy                 # 7 configs x 3 seeds, about 75 min on 2 cores
    python -m bench.accuracy --quick         # smoke run: 3 epochs, 1 seed, its own folders
    python -m bench.accuracy --resume        # keep the runs already in accuracy_runs.jsonl, do the rest
    python -m bench.accuracy --render        # train nothing: rewrite the tables from accuracy_runs.jsonl

Trains the demo recipe ``ToE/deit/configs/demo.yaml`` (or ``--config FILE``: timm
``vit_tiny_patch16_224`` at 96 wide, 6 blocks, 3 heads, 32 px images, 4 px patches: 64 tokens)
on the embedded digits data through the real DeiT trainer (``main.py --config FILE`` plus the
configuration's flags, a subprocess per run), reading each run's ``log.txt`` through
``bench.common``: the final test top-1 and the seconds spent training. Configurations
(all for the same epochs, the expansion steps at thirds of the run):

- ``full``: full tokens (the schedule ``--expansion-step 0 --keep-rate 1.0``, i.e. ToE off);
- ``deit-stride`` / ``deit-uniform``: the DeiT schedule 0.5 0.75 1.0 / r0 0.25, published
  (stride) and uniform seeds;
- ``aggressive-stride`` / ``aggressive-uniform``: 0.4 0.7 1.0 / r0 0.2 (the LV-ViT rates);
- ``deit-stride-k1`` / ``deit-stride-k3``: the DeiT schedule with stride seeds and 1 or 3
  repetition steps per stage instead of 2 (``--expansion-multiple-stage``).

Runs go through ``bench.common.run_repeated``: interleaved by seed (every configuration
with seed 0, then with seed 1, ...), the order of the configurations rotated from seed to seed
(seed i starts at configuration i mod n), so drift of the machine and the place in the order hit
every configuration alike; every run kept as one JSON line in ``accuracy_runs.jsonl``, in the
order they ran. The tables in
``bench/results/accuracy.{md,json}`` pair each ToE run with the full-token run of the same
seed: the mean paired difference in top-1 and its standard error over the seeds, the mean
paired time ratio (speedup) and its standard error; and, per schedule, uniform against stride
seeds paired the same way. ``python -m bench.figures accuracy`` draws the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

from bench.common import (demo_config, describe_machine, git_commit, mean_se, mean_std, paired_by_seed, read_runs,
                          recipe, run_numbers, run_repeated, run_trainer, trainer_command)
from ToE.common.digits import build_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "data", "digits")
RESULTS = os.path.join(ROOT, "bench", "results")

__all__ = ["CONFIGS", "SEED_RULE_PAIRS", "config_args", "run_command", "summarise", "seed_rule", "format_markdown",
           "main"]

# The demo model and recipe are ToE/deit/configs/demo.yaml (a small ViT, AdamW at the demo's lr,
# light augmentation, no EMA); a configuration is that file plus its ToE flags below.
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


def _acc_difference(run, reference):
    return run["acc1"] - reference["acc1"]


def _speedup(run, reference):
    return reference["time_s"] / run["time_s"]


def _robust_speedup(run, reference):
    return reference.get("robust_time_s", reference["time_s"]) / run.get("robust_time_s", run["time_s"])


def summarise(runs: Sequence[Dict[str, object]], order: Sequence[str]) -> List[Dict[str, object]]:
    """Per configuration: mean and std over seeds, and the statistics paired by seed with full tokens."""
    full = [r["acc1"] for r in runs if r["config"] == "full"]
    full_std = mean_std(full)[1] if full else None
    rows = []
    for name in order:
        mine = [r for r in runs if r["config"] == name]
        if not mine:
            continue
        row = {"config": name, "label": label_of(name), "seeds": [r["seed"] for r in mine],
               "acc1_runs": [r["acc1"] for r in mine], "time_runs": [r["time_s"] for r in mine],
               "robust_time_runs": [r.get("robust_time_s", r["time_s"]) for r in mine]}
        row["acc1_mean"], row["acc1_std"] = mean_std(row["acc1_runs"])
        row["time_mean"], row["time_std"] = mean_std(row["time_runs"])
        row["robust_time_mean"], row["robust_time_std"] = mean_std(row["robust_time_runs"])
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


def run_command(name: str, seed: int, epochs: int, out_dir: str, data_path: str,
                recipe_file: Optional[str] = None, batch_size: Optional[int] = None, lr: Optional[float] = None,
                trainer_args: Sequence[str] = ()) -> List[str]:
    """The DeiT command of one run: the recipe file (default: the demo's), then the run's own flags;
    the batch size and lr are the recipe's unless given."""
    overrides = ["--data-path", data_path, "--output_dir", out_dir, "--epochs", epochs, "--seed", seed,
                 *(["--batch-size", batch_size] if batch_size is not None else []),
                 *(["--lr", lr] if lr is not None else []), *config_args(name, epochs), "--overwrite", *trainer_args]
    return trainer_command("deit", recipe_file, *overrides)


def run_one(name: str, seed: int, args, data_path: str, log=print) -> Dict[str, object]:
    """Train one configuration with one seed through the trainer; return its numbers."""
    out_dir = os.path.join(args.work_dir, f"{name}_seed{seed}")
    command = run_command(name, seed, args.epochs, out_dir, data_path, args.config, args.batch_size, args.lr,
                          args.trainer_args)
    log(f"[accuracy] {name} seed {seed}: {' '.join(command[1:])}")
    wall = run_trainer(command, out_dir, args.threads)
    parsed = run_numbers(out_dir)
    log(f"[accuracy]   top-1 {parsed['acc1']:.2f} %, train {parsed['train_seconds']:.1f} s, wall {wall:.1f} s")
    return {"config": name, "seed": seed, "epochs": args.epochs, "acc1": parsed["acc1"],
            "best_acc1": parsed["best_acc1"], "acc1_per_epoch": parsed["acc1_per_epoch"],
            "epoch_seconds": parsed["epoch_seconds"], "time_s": parsed["train_seconds"],
            "robust_time_s": parsed["robust_train_seconds"], "slow_epochs": parsed["slow_epochs"],
            "time_key": "epoch_seconds", "wall_s": wall}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=demo_config("deit"),
                        help="the recipe every configuration starts from (its ToE flags are the configuration's)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="configurations to train (their order rotates from seed to seed)")
    parser.add_argument("--epochs", type=int, default=36, help="epochs per run (same for every config)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--batch-size", type=int, default=None, help="trainer --batch-size (default: the recipe's)")
    parser.add_argument("--lr", type=float, default=None, help="trainer --lr (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each training run")
    parser.add_argument("--data-path", default=DIGITS,
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
    if args.render:
        # The runs file holds every number of every run, so the per-run folders are not needed.
        runs = read_runs(runs_path)
        if not runs:
            build_parser().error(f"--render: no runs to render in {runs_path}; train them first "
                                 f"(python -m bench.accuracy) or pass the --out folder that holds them")
        args.seeds = sorted({r["seed"] for r in runs})
        args.configs = [c for c in CONFIGS if any(r["config"] == c for r in runs)]
        args.epochs = runs[0]["epochs"]
    else:
        if not args.resume and os.path.exists(runs_path):
            os.remove(runs_path)
        if os.path.abspath(args.data_path) == DIGITS:  # another folder (e.g. data/digits-shift) is the caller's
            build_digits(args.data_path, size=32)
        runs = run_repeated(args.configs, args.seeds, lambda name, seed: run_one(name, seed, args, args.data_path),
                            runs_path, keep=lambda run: run.get("epochs") == args.epochs, log=lambda line: None)
    time_keys = {r["time_key"] for r in runs}
    values = recipe("deit", args.config) if not args.render else {}
    provenance = {"machine": describe_machine(), "commit": git_commit(),
                  "command": " ".join(["python -m bench.accuracy", *(sys.argv[1:] if argv is None else argv)]),
                  "recipe": os.path.relpath(args.config, ROOT),
                  "batch_size": args.batch_size or values.get("batch_size"), "lr": args.lr or values.get("lr"),
                  "trainer_args": args.trainer_args}
    json_path = os.path.join(args.out, f"accuracy{suffix}.json")
    if args.render and os.path.exists(json_path):
        # Re-rendering changes the tables, not where, how, with which recipe and at which commit the runs were trained.
        with open(json_path) as handle:
            previous = json.load(handle)
        provenance = {key: previous.get(key) for key in provenance}
    results = {**provenance, "epochs": args.epochs, "seeds": args.seeds,
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
