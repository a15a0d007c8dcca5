"""The digits comparisons of token labelling with ToE: LV-ViT configurations x seeds.

    python -m bench.lvvit_accuracy --labels runs/demo-lvvit/labels --epochs 30 --seeds 0 1 2
    python -m bench.lvvit_accuracy --render      # train nothing: rewrite accuracy_lvvit.md from its .json

Every run is the LV-ViT demo recipe ``ToE/lvvit/configs/demo.yaml`` (or ``--config FILE``)
through ``ToE/lvvit/main.py --config FILE`` with the token labels of ``--labels`` (the demo,
``bash run/demo.sh lvvit``, writes them), its ToE stages scaled to ``--epochs``, plus:
  toe_tl        nothing: ToE 0.4/0.7/1.0 with token labels, dense loss over all 64 positions (published)
  full_tl       all tokens, token labels
  toe_no_tl     ToE, no label data (every token's target is the image label)
  toe_tl_kept   ToE with token labels, dense loss over the kept positions only
Each run's last-epoch top-1 (online model and EMA, both evaluated with all tokens) and its training
seconds are read from its log.txt (``bench.common.run_numbers``); the table gives mean ±
standard error over the seeds and, per seed, the paired difference to ``toe_tl``. Runs go through
``bench.common.run_repeated`` (seed-major, the order rotated per seed), each kept as a JSON
line of ``--out``_runs.jsonl; the runs already there are not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from bench.common import (demo_config, describe_machine, mean_se, paired_by_seed, recipe, run_numbers, run_repeated,
                          run_trainer, trainer_command)
from ToE.common.config import demo_epoch_flags
from ToE.common.digits import build_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = demo_config("lvvit")
# name -> flags after the recipe's
CONFIGS: Dict[str, List[str]] = {
    "toe_tl": [],
    "full_tl": ["--expansion-step", "0", "--keep-rate", "1.0", "--initialization-keep-rate", "0.2"],
    "toe_no_tl": ["--no-token-label"],
    "toe_tl_kept": ["--dense-loss", "kept"],
}
WITHOUT_TOKEN_LABELS = ("toe_no_tl",)


def run_command(name: str, seed: int, epochs: int, labels: str, out: str, recipe_file: str = DEMO) -> List[str]:
    """The LV-ViT command of one run: the recipe file, its length, the labels and the configuration."""
    recipe_file = recipe_file or DEMO
    label_data = [] if name in WITHOUT_TOKEN_LABELS else ["--token-label-data", labels]
    return trainer_command("lvvit", recipe_file, *demo_epoch_flags("lvvit", epochs, recipe_file),
                           "--data-path", os.path.join(ROOT, "data", "digits"), *label_data,
                           *CONFIGS[name], "--seed", seed, "--output_dir", out, "--overwrite")


def mean_se_text(values: List[float]) -> str:
    mean, se = mean_se(values)
    return f"{mean:.2f}" if se is None else f"{mean:.2f} ± {se:.2f}"


def render(results: Dict) -> str:
    lines = [f"Digits, lvvit_digits, {results['epochs']} epochs, seeds {results['seeds']}; {results['machine']}",
             f"command: {results['command']}", "",
             "| config | top-1 % (online) | top-1 % (EMA) | Δ top-1 vs toe_tl (paired) | train s |",
             "|---|---|---|---|---|"]
    runs = [dict(run, config=name) for name, group in results["runs"].items() for run in group]
    for name, group in results["runs"].items():
        diff = [d for _, d in paired_by_seed(runs, name, "toe_tl", lambda run, base: run["top1"] - base["top1"])]
        lines.append(f"| {name} | {mean_se_text([r['top1'] for r in group])} | "
                     f"{mean_se_text([r['ema_top1'] for r in group])} | "
                     f"{'—' if name == 'toe_tl' else mean_se_text(diff)} | "
                     f"{mean_se_text([r['train_seconds'] for r in group])} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEMO, help="the recipe file (default: the LV-ViT demo's)")
    parser.add_argument("--labels", help="token-label folder of data/digits (the LV-ViT demo writes one)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of a run (default: the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "compare-lvvit"), help="folder of the runs")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "accuracy_lvvit"),
                        help="stem of the .json/.md results and of the _runs.jsonl")
    parser.add_argument("--render", action="store_true", help="train nothing: rewrite the .md from the .json")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or int(recipe("lvvit", args.config)["epochs"])
    if args.render:
        with open(args.out + ".json") as handle:
            results = json.load(handle)
    else:
        if not args.labels:
            parser.error("--labels is needed to train (the token-label folder: bash run/demo.sh lvvit writes one)")
        build_digits(os.path.join(ROOT, "data", "digits"), size=32)

        def run(name: str, seed: int) -> Dict[str, object]:
            out = os.path.join(args.work, f"{name}_seed{seed}")
            run_trainer(run_command(name, seed, args.epochs, args.labels, out, args.config), out)
            numbers = run_numbers(out, args.epochs)
            return {"config": name, "seed": seed, "epochs": args.epochs, "top1": numbers["acc1"],
                    "ema_top1": numbers["ema_acc1"], "train_seconds": numbers["train_seconds"]}

        runs = run_repeated(args.configs, args.seeds, run, args.out + "_runs.jsonl",
                            keep=lambda row: row["epochs"] == args.epochs and row["config"] in args.configs)
        results = {"epochs": args.epochs, "seeds": args.seeds, "machine": describe_machine(),
                   "command": " ".join(["python -m bench.lvvit_accuracy", *(sys.argv[1:] if argv is None else argv)]),
                   "recipe": os.path.relpath(args.config, ROOT),
                   "runs": {name: sorted(({k: r[k] for k in ("seed", "top1", "ema_top1", "train_seconds")}
                                          for r in runs if r["config"] == name and r["seed"] in args.seeds),
                                         key=lambda r: r["seed"]) for name in args.configs}}
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as handle:
            json.dump(results, handle, indent=2)
    table = render(results)
    with open(args.out + ".md", "w") as handle:
        handle.write(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
