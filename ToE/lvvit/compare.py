"""The digits comparisons of token labelling with ToE: configurations x seeds through ToE/lvvit/main.py.

    python -m ToE.lvvit.compare --labels runs/demo-lvvit/labels --epochs 24 --seeds 0 1 \
        --work runs/compare-lvvit --out bench/results/accuracy_lvvit

Configurations (the demo's recipe, ToE/lvvit/run/demo.sh, otherwise):
  toe_tl        ToE 0.4/0.7/1.0 with token labels, dense loss over all 64 positions (published)
  full_tl       all tokens, token labels
  toe_no_tl     ToE, no label data (every token's target is the image label)
  toe_tl_kept   ToE with token labels, dense loss over the kept positions only
Each run's last-epoch top-1 (online model and EMA, both evaluated with all tokens) and its training
seconds are read from its log.txt; the table gives mean +- standard error over the seeds and, per
seed, the paired difference to ``toe_tl``. Runs already complete in --work are read, not re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List

CONFIGS: Dict[str, List[str]] = {
    "toe_tl": ["--token-label"],
    "full_tl": ["--token-label", "--expansion-step", "0", "--keep-rate", "1.0", "--initialization-keep-rate", "0.2"],
    "toe_no_tl": [],
    "toe_tl_kept": ["--token-label", "--dense-loss", "kept"],
}


def recipe(epochs: int, labels: str) -> List[str]:
    third = epochs // 3
    return ["--data-path", "data/digits", "--device", "cpu", "--num_workers", "0", "--model", "lvvit_digits",
            "--img-size", "32", "--crop-pct", "1.0", "--token-label-data", labels, "--token-label-size", "8",
            "--epochs", str(epochs), "--cooldown-epochs", "0", "-b", "64", "--lr", "1e-3", "--min-lr", "1e-5",
            "--warmup-epochs", "3", "--weight-decay", "0.05", "--drop-path", "0.1", "--aa", "rand-m9-mstd0.5-inc1",
            "--reprob", "0.25", "--hflip", "0", "--scale", "0.35", "1.0", "--model-ema-decay", "0.99",
            "--expansion-step", "0", str(third), str(2 * third), "--keep-rate", "0.4", "0.7", "1.0",
            "--initialization-keep-rate", "0.2", "--expansion-multiple-stage", "2", "--initialization", "uniform"]


def read_run(out: str, epochs: int):
    path = os.path.join(out, "log.txt")
    if not os.path.isfile(path):
        return None
    records = [json.loads(line) for line in open(path) if line.strip()]
    if len(records) != epochs:
        return None
    return {"top1": records[-1]["test_acc1"], "ema_top1": records[-1].get("ema_acc1"),
            "train_seconds": sum(r["epoch_seconds"] for r in records)}


def mean_se(values: List[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) / len(values) ** 0.5:.2f}"


def render(results: Dict) -> str:
    lines = [f"Digits, lvvit_digits, {results['epochs']} epochs, seeds {results['seeds']}; {results['machine']}",
             f"command: {results['command']}", "",
             "| config | top-1 % (online) | top-1 % (EMA) | Δ top-1 vs toe_tl (paired) | train s |",
             "|---|---|---|---|---|"]
    base = results["runs"]["toe_tl"]
    for name, runs in results["runs"].items():
        top1 = [r["top1"] for r in runs]
        ema = [r["ema_top1"] for r in runs]
        diff = [r["top1"] - b["top1"] for r, b in zip(runs, base)]
        lines.append(f"| {name} | {mean_se(top1)} | {mean_se(ema)} | "
                     f"{'—' if name == 'toe_tl' else mean_se(diff)} | {mean_se([r['train_seconds'] for r in runs])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="token-label folder of data/digits (the demo writes one)")
    parser.add_argument("--epochs", type=int, default=36)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--work", default="runs/compare-lvvit", help="folder of the runs")
    parser.add_argument("--out", default="bench/results/accuracy_lvvit", help="stem of the .json/.md results")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    from bench.common import describe_machine

    results = {"epochs": args.epochs, "seeds": args.seeds, "machine": describe_machine(),
               "command": " ".join(["python -m ToE.lvvit.compare", *(sys.argv[1:] if argv is None else argv)]),
               "runs": {}}
    for seed in args.seeds:  # seed-major: machine drift spreads over every configuration alike
        for name in args.configs:
            out = os.path.join(args.work, f"{name}_seed{seed}")
            if read_run(out, args.epochs) is None:
                cmd = [sys.executable, "ToE/lvvit/main.py", *recipe(args.epochs, args.labels), *CONFIGS[name],
                       "--seed", str(seed), "--output_dir", out, "--overwrite"]
                print(f"[compare] {name} seed {seed}", flush=True)
                subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    for name in args.configs:
        results["runs"][name] = [dict(seed=seed, **read_run(os.path.join(args.work, f"{name}_seed{seed}"),
                                                            args.epochs)) for seed in args.seeds]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as handle:
        json.dump(results, handle, indent=2)
    table = render(results)
    with open(args.out + ".md", "w") as handle:
        handle.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
