"""AP of full-token training vs ToE for the YOLOS demo detector on the embedded digits-det set.

    python -m bench.yolos_accuracy --seeds 0 1 2              # trains 2 x 3 runs, then renders
    python -m bench.yolos_accuracy --render                   # rewrite the table from the .jsonl only

A run stored in the .jsonl whose folder still holds its complete log is kept, not retrained (the
runs are deterministic), so adding seeds trains only the new ones.

Every run is ``ToE/yolos/run/demo.sh`` itself (same data, model, schedule; its summary and figure
included, the wall time too) with ``--seed S``; "full" adds one keep-1.0 stage (all tokens in
every epoch), "toe" is the demo's schedule. Configurations alternate per seed (full first for even seeds, ToE first for
odd ones), so slow phases of the machine do not all fall on one configuration. AP is the last
epoch's pycocotools bbox AP on the 300 val canvases, all tokens. Results:
``bench/results/yolos_accuracy.{md,jsonl}`` (the work folder keeps the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

from bench.common import describe_machine, git_commit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
EPOCHS = 20
DEMO = os.path.join(ROOT, "ToE", "yolos", "run", "demo.sh")
# the demo's own training command (ToE/yolos/run/demo.sh, its ToE stages scaled to --epochs), with:
CONFIGS = {"full": ["--expansion-step", "0", "--keep-rate", "1.0"], "toe": []}


def run_one(config: str, seed: int, epochs: int, work: str) -> Dict[str, object]:
    out = os.path.join(work, f"{config}-seed{seed}")
    env = dict(os.environ, PY=sys.executable, DEMO_OUT=out, DEMO_EPOCHS=str(epochs), TQDM_DISABLE="1")
    start = time.perf_counter()
    subprocess.run(["bash", DEMO, *CONFIGS[config], "--seed", str(seed), "--overwrite"], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "log.txt")) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    last = records[-1]
    return {"config": config, "seed": seed, "epochs": epochs, "AP": last["test_AP"], "AP50": last["test_AP50"],
            "AP75": last["test_AP75"], "train_seconds": sum(r["epoch_seconds"] for r in records),
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
            spread = f" ± {statistics.stdev(aps) / len(aps) ** 0.5:.4f} (SE)" if len(aps) > 1 else ""
            lines.append(f"- {config}: mean AP {statistics.fmean(aps):.4f}{spread} over {len(aps)} seed(s)")
    paired = {}
    for row in rows:
        paired.setdefault(row["seed"], {})[row["config"]] = row
    diffs = [p["toe"]["AP"] - p["full"]["AP"] for p in paired.values() if {"toe", "full"} <= set(p)]
    speed = [p["full"]["train_seconds"] / p["toe"]["train_seconds"] for p in paired.values()
             if {"toe", "full"} <= set(p)]
    if diffs:
        lines.append(f"- ToE - full, paired by seed: AP {statistics.fmean(diffs):+.4f} over {len(diffs)} seed(s); "
                     f"training-time ratio full / ToE {statistics.fmean(speed):.2f}x (run-level wall time on a shared "
                     "machine: see the load column)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--work", default="runs/bench-yolos-accuracy", help="folder of the runs")
    parser.add_argument("--render", action="store_true", help="only rewrite the table from the stored runs")
    args = parser.parse_args()
    stem = os.path.join(RESULTS, "yolos_accuracy")
    if args.render:
        with open(stem + ".jsonl") as handle:
            lines = [json.loads(line) for line in handle if line.strip()]
        header, rows = lines[0], lines[1:]
    else:
        header = {"machine": describe_machine(), "commit": git_commit(),
                  "command": "python -m bench.yolos_accuracy " + " ".join(sys.argv[1:])}
        rows = []
        os.makedirs(RESULTS, exist_ok=True)
        # Runs are deterministic: a finished run of the same command stored before is kept, not retrained.
        stored = {}
        if os.path.isfile(stem + ".jsonl"):
            with open(stem + ".jsonl") as handle:
                for line in list(handle)[1:]:
                    row = json.loads(line)
                    stored[(row["config"], row["seed"], row["epochs"])] = row
        for seed in args.seeds:
            order = list(CONFIGS) if seed % 2 == 0 else list(reversed(CONFIGS))
            for config in order:
                log = os.path.join(args.work, f"{config}-seed{seed}", "log.txt")
                key = (config, seed, args.epochs)
                if key in stored and os.path.isfile(log) and sum(1 for _ in open(log)) == args.epochs:
                    rows.append(stored[key])
                    continue
                rows.append(run_one(config, seed, args.epochs, args.work))
                print(json.dumps(rows[-1]), flush=True)
                with open(stem + ".jsonl", "w") as handle:
                    for item in [header] + rows:
                        handle.write(json.dumps(item) + "\n")
    text = render(rows, header)
    with open(stem + ".md", "w") as handle:
        handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
