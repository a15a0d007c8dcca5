"""Summarise an EfficientTrain run: accuracy, time, and per phase (crop size x ToE tokens) the
measured speed against the FLOP-predicted one.

    python -m ToE.EfficientTrain.summary runs/demo-et

Reads ``log.txt`` and ``args.yaml`` (through ``ToE.common.summary``). A phase is a run of epochs
with the same crop and kept tokens; its measured speed is the median epoch time of the
full-resolution, full-token phase over its own median (the first epoch of a phase, which pays for
start-up and a new loader, is left out where the phase has 3 or more); the prediction is the FLOP
ratio of one training step (``token_select.vit_step_flops``). The FFT crop and data loading are
in the measured time and not in the prediction.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Dict, List, Tuple

from ToE.common.errors import UserError, run_main
from ToE.common.summary import model_dims, read_args, read_log, run_status, whole_run_line


def _median(values: List[float]) -> float:
    return statistics.median(values[1:] if len(values) > 2 else values)


def summarise(output_dir: str) -> str:
    from ToE.flops import analytic_step_flops

    args = read_args(output_dir)
    records = read_log(output_dir)
    shape = model_dims(args, output_dir)
    full_patches = shape["num_patches"]

    def flops(patches: int, kept: int) -> float:
        return analytic_step_flops(type(shape)(shape, num_patches=patches), kept)

    phases: List[Tuple[Tuple[int, int, int], List[Dict]]] = []
    for record in records:
        key = (record.get("resolution", args["input_size"]), record.get("patch_tokens", full_patches),
               record["kept_tokens"])
        if phases and phases[-1][0] == key:
            phases[-1][1].append(record)
        else:
            phases.append((key, [record]))
    full = [r["epoch_seconds"] for key, group in phases for r in group
            if key[1] == full_patches and key[2] == full_patches]
    full_median = _median(full) if full else None
    total = sum(r["epoch_seconds"] for r in records)
    last = records[-1]
    full_res = [r["test_acc1"] for r in records if r.get("resolution", args["input_size"]) == args["input_size"]]
    lines = [f"Run in {output_dir}: {args['model']} {args.get('model_kwargs') or ''}, curriculum "
             f"{args.get('curriculum', 'none')}, {run_status(args, records, output_dir)}",
             f"Top-1 on the held-out images: {last['test_acc1']:.2f} % in the last epoch (evaluated at "
             f"{last.get('resolution', args['input_size'])} px); best over the full-resolution epochs: "
             + (f"{max(full_res):.2f} %" if full_res else "none yet"),
             f"Training time: {total:.1f} s ({total / 60:.1f} min), evaluation excluded", "",
             "| epochs | crop px | patch tokens | kept after block 0 | median epoch (s) | measured speed | "
             "FLOP-predicted speed |", "|---|---|---|---|---|---|---|"]
    for (crop, patches, kept), group in phases:
        seconds = _median([r["epoch_seconds"] for r in group])
        if patches == full_patches and kept == full_patches:
            measured = "baseline"
        else:
            measured = f"{full_median / seconds:.2f}x" if full_median else "n/a (no full phase)"
        lines.append(f"| {group[0]['epoch']}-{group[-1]['epoch']} | {crop} | {patches} | {kept} | {seconds:.2f} | "
                     f"{measured} | {flops(full_patches, full_patches) / flops(patches, kept):.2f}x |")
    if full_median:
        predicted = flops(full_patches, full_patches) * len(records) / sum(
            flops(r.get("patch_tokens", full_patches), r["kept_tokens"]) for r in records)
        lines += ["", whole_run_line(full_median, records, total, predicted, "full-resolution full-token epochs",
                                     "the last phase")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the run's --output_dir")
    args = parser.parse_args()

    def run() -> None:
        if not os.path.isfile(os.path.join(args.output_dir, "log.txt")):
            raise UserError(f"no log.txt in {args.output_dir}: no epoch of a run has finished there. Pass the "
                            "--output_dir of an EfficientTrain run that trained at least one epoch")
        print(summarise(args.output_dir))

    run_main(run)


if __name__ == "__main__":
    main()
