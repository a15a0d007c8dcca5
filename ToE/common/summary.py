"""Summarise a finished run: accuracy, time, kept tokens and measured vs FLOP-predicted speed per stage.

    python -m ToE.common.summary runs/demo

Reads ``log.txt`` (one JSON line per epoch) and ``args.yaml`` from the output folder. The speed
of a stage is the full-token stage's median epoch time over that stage's median epoch time; the
prediction is the FLOP ratio of one training step (``token_select.vit_step_flops`` via ``ToE.flops``). Without a
full-token stage in the run there is no measured baseline and only the prediction is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List

import yaml


def read_log(output_dir: str) -> List[Dict]:
    with open(os.path.join(output_dir, "log.txt")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def summarise(output_dir: str) -> str:
    records = read_log(output_dir)
    with open(os.path.join(output_dir, "args.yaml")) as handle:
        args = yaml.safe_load(handle)
    import torch

    from ToE.flops import analytic_step_flops, create_model, model_shape

    with torch.device("meta"):  # only the shape is needed: no memory, no initialisation
        model = create_model(args["model"], args["input_size"], args.get("patch_size"),
                             **dict(args.get("model_kwargs") or {}))
    dims = model_shape(model)
    flops = lambda kept: analytic_step_flops(dims, kept)  # noqa: E731

    by_stage: Dict[int, List[Dict]] = {}
    for record in records:
        by_stage.setdefault(record["stage"], []).append(record)
    full_seconds = [r["epoch_seconds"] for r in records if r["kept_tokens"] == dims["num_patches"]]
    # the very first epoch carries one-off start-up costs; leave it out of the medians where possible
    median = lambda values: statistics.median(values[1:] if len(values) > 2 else values)  # noqa: E731
    full_median = median(full_seconds) if full_seconds else None

    last = records[-1]
    total = sum(r["epoch_seconds"] for r in records)
    best = max(r["test_acc1"] for r in records)
    lines = [f"Run in {output_dir}: {args['model']} {args.get('model_kwargs') or ''}, "
             f"{dims['num_patches']} patch tokens, {len(records)} epochs",
             f"Top-1 on the held-out images: {last['test_acc1']:.2f} % (best {best:.2f} %)"
             + (f", EMA {last['ema_acc1']:.2f} %" if "ema_acc1" in last else ""),
             f"Training time: {total:.1f} s ({total / 60:.1f} min), evaluation excluded",
             "",
             "| stage | epochs | patch tokens kept | median epoch (s) | measured speed | FLOP-predicted speed |",
             "|---|---|---|---|---|---|"]
    for stage in sorted(by_stage):
        group = by_stage[stage]
        kept = group[0]["kept_tokens"]
        seconds = median([r["epoch_seconds"] for r in group])
        measured = f"{full_median / seconds:.2f}x" if full_median else "n/a (no full-token stage)"
        predicted = flops(dims["num_patches"]) / flops(kept)
        lines.append(f"| {stage} | {group[0]['epoch']}-{group[-1]['epoch']} | {kept} of {dims['num_patches']} | "
                     f"{seconds:.2f} | {measured} | {predicted:.2f}x |")
    if full_median:
        full_run = full_median * len(records)
        predicted_run = flops(dims["num_patches"]) * len(records) / sum(flops(r["kept_tokens"]) for r in records)
        lines += ["", f"Whole run: {full_run / total:.2f}x faster than {len(records)} full-token epochs would take "
                      f"(estimated from the full-token stage), FLOP-predicted {predicted_run:.2f}x"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the run's --output_dir")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.output_dir, "log.txt")):
        print(f"error: no log.txt in {args.output_dir}. Pass the --output_dir of a finished run", file=sys.stderr)
        sys.exit(2)
    print(summarise(args.output_dir))


if __name__ == "__main__":
    main()
