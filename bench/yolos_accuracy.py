"""AP of full-token training vs ToE for the YOLOS demo detector on the embedded digits-det set.

    python -m bench.yolos_accuracy --seeds 0 1 2              # trains 2 x 3 runs, then renders
    python -m bench.yolos_accuracy --render                   # rewrite the table from the .jsonl only

Every run is the demo recipe ``ToE/yolos/configs/demo.yaml`` (or ``--config FILE``: same data,
model, schedule) through ``ToE/yolos/main.py --config FILE`` with ``--seed S``, its ToE stages
scaled to ``--epochs`` (``ToE.common.config.demo_epoch_flags``); "full" adds one keep-1.0 stage
(all tokens in every epoch), "toe" is the recipe's schedule. Runs go through
``bench.common.run_repeated``: seed-major, the configuration order rotated per seed (full
first for the first seed, ToE first for the next, ...), so slow phases of the machine do not all
fall on one configuration; each run is one JSON line of ``bench/results/yolos_accuracy.jsonl``
(after a header line: machine, commit, command), and a run already there is kept, not retrained
(the runs are deterministic), so adding seeds trains only the new ones. AP is the last epoch's
pycocotools bbox AP on the 300 val canvases, all tokens; the ToE - full differences and time
ratios are paired by seed (``bench.common.paired_by_seed``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from bench.common import (demo_config, describe_machine, git_commit, mean_se, paired_by_seed, read_runs, run_numbers,
                          run_repeated, run_trainer, trainer_command)
from ToE.common.config import demo_epoch_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
EPOCHS = 20
DEMO = demo_config("yolos")
# the recipe's own training command (its ToE stages scaled to --epochs), with:
CONFIGS = {"full": ["--expansion-step", "0", "--keep-rate", "1.0"], "toe": []}


def run_command(config: str, seed: int, epochs: int, out: str, recipe_file: str = DEMO) -> List[str]:
    """The YOLOS command of one run: the recipe file, its length, then the configuration's flags."""
    return trainer_command("yolos", recipe_file, "--output_dir", out, *demo_epoch_flags("yolos", epochs, recipe_file),
                           *CONFIGS[config], "--seed", seed, "--overwrite")


def run_one(config: str, seed: int, epochs: int, work: str, recipe_file: str = DEMO) -> Dict[str, object]:
    out = os.path.join(work, f"{config}-seed{seed}")
    wall = run_trainer(run_command(config, seed, epochs, out, recipe_file), out)
    numbers = run_numbers(out)
    return {"config": config, "seed": seed, "epochs": epochs, "AP": numbers["AP"], "AP50": numbers["AP50"],
            "AP75": numbers["AP75"], "train_seconds": numbers["train_seconds"],
            "wall_seconds": wall, "load_after": round(os.getloadavg()[0], 2)}


def render(rows: List[Dict[str, object]], header: Dict[str, object]) -> str:
    lines = [f"Machine: {header['machine']['cpu_model']}, {header['machine']['cpu_count']} cores, torch "
             f"{header['machine']['torch']} ({header['machine']['torch_threads']} threads); commit {header['commit']}",
             f"Command: `{header['command']}`", "",
             "| config | seed | AP | AP50 | AP75 | training s (eval excluded) | load average after |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['config']} | {row['seed']} | {row['AP']:.4f} | {row['AP50']:.4f} | {row['AP75']:.4f} | "
                     f"{row['train_seconds']:.1f} | {row['load_after']} |")
    lines.append("")
    for config in CONFIGS:
        aps = [r["AP"] for r in rows if r["config"] == config]
        if aps:
            mean, se = mean_se(aps)
            spread = f" ± {se:.4f} (SE)" if se is not None else ""
            lines.append(f"- {config}: mean AP {mean:.4f}{spread} over {len(aps)} seed(s)")
    diffs = paired_by_seed(rows, "toe", "full", lambda toe, full: toe["AP"] - full["AP"])
    speed = paired_by_seed(rows, "toe", "full", lambda toe, full: full["train_seconds"] / toe["train_seconds"])
    if diffs:
        lines.append(f"- ToE - full, paired by seed: AP {mean_se([d for _, d in diffs])[0]:+.4f} over {len(diffs)} "
                     f"seed(s); training-time ratio full / ToE {mean_se([s for _, s in speed])[0]:.2f}x (run-level "
                     "wall time on a shared machine: see the load column)")
    return "\n".join(lines)


def read_results(path: str):
    """(header, runs) of a results .jsonl: the header is its first line (no "config")."""
    with open(path) as handle:
        first = json.loads(handle.readline() or "{}")
    return ({} if "config" in first else first), read_runs(path)


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEMO, help="the recipe file (default: the YOLOS demo's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--work", default="runs/bench-yolos-accuracy", help="folder of the runs")
    parser.add_argument("--render", action="store_true", help="only rewrite the table from the stored runs")
    parser.add_argument("--out", default=os.path.join(RESULTS, "yolos_accuracy"), help="stem of the .jsonl/.md")
    args = parser.parse_args(argv)
    stem = args.out
    if args.render:
        header, rows = read_results(stem + ".jsonl")
    else:
        header = {"machine": describe_machine(), "commit": git_commit(),
                  "command": "python -m bench.yolos_accuracy " + " ".join(sys.argv[1:] if argv is None else argv)}
        kept = [row for row in read_runs(stem + ".jsonl") if row["epochs"] == args.epochs]
        os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
        with open(stem + ".jsonl", "w") as handle:  # this session's header, then the runs it keeps
            handle.writelines(json.dumps(item) + "\n" for item in [header, *kept])
        rows = run_repeated(list(CONFIGS), args.seeds,
                            lambda config, seed: run_one(config, seed, args.epochs, args.work, args.config),
                            stem + ".jsonl")
    text = render(rows, header)
    with open(stem + ".md", "w") as handle:
        handle.write(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
