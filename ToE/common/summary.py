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
from typing import Dict, List

import yaml

from ToE.common.errors import UserError, run_main


RECORD_KEYS = ("epoch", "stage", "kept_tokens", "epoch_seconds", "test_acc1")


def read_log(output_dir: str, keys=RECORD_KEYS) -> List[Dict]:
    """The epoch records of ``log.txt`` (each with ``keys``); a missing, empty or damaged file is a
    UserError naming the file or the line."""
    path = os.path.join(output_dir, "log.txt")
    if not os.path.isdir(output_dir):
        raise UserError(f"{output_dir} does not exist. Pass the --output_dir of a run")
    if not os.path.isfile(path):
        raise UserError(f"no log.txt in {output_dir}: no epoch has finished there. Pass the --output_dir of a run, "
                        "or run the summary once an epoch has finished")
    records = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {number} is damaged (not JSON). Delete that line, or resume the run "
                                "so it rewrites its log") from None
            missing = [key for key in keys if not isinstance(record, dict) or key not in record]
            if missing:
                raise UserError(f"{path} line {number} lacks {', '.join(missing)}: not a log written by a ToE "
                                "trainer. Pass the --output_dir of a ToE run")
            records.append(record)
    if not records:
        raise UserError(f"{path} holds no finished epoch yet. Run the summary once an epoch has finished")
    return records


def read_args(output_dir: str, keys=("model", "input_size")) -> Dict:
    """The run's resolved arguments (``args.yaml``, holding ``keys``); otherwise one UserError line."""
    if not os.path.isdir(output_dir):
        raise UserError(f"{output_dir} does not exist. Pass the --output_dir of a run")
    path = os.path.join(output_dir, "args.yaml")
    if not os.path.isfile(path):
        raise UserError(f"no args.yaml in {output_dir}: not the output folder of a ToE run. Pass a run's --output_dir")
    try:
        with open(path) as handle:
            args = yaml.safe_load(handle)
    except yaml.YAMLError:
        raise UserError(f"{path} is damaged (not YAML). Restore it from the checkpoint's 'args'") from None
    if not isinstance(args, dict) or any(key not in args for key in keys):
        raise UserError(f"{path} does not hold this kind of run's arguments (no {' or '.join(keys)}). Pass the "
                        "--output_dir of a run of this trainer")
    return args


def model_dims(args: Dict, output_dir: str) -> Dict:
    """The run's model shape (``ToE.flops.model_shape``), built on the meta device from args.yaml;
    a trainer's own model module (args.yaml ``model_module``) is imported first."""
    import torch

    from ToE.flops import create_model, model_shape

    if args.get("model_module"):  # registers a trainer's own models in timm (e.g. ToE.lvvit.model)
        import importlib

        try:
            importlib.import_module(args["model_module"])
        except ImportError:
            raise UserError(f"cannot import {args['model_module']}, which defines the run's model. Run the "
                            "summary from the repository that trained it") from None
    import timm

    if not timm.is_model(args["model"]):
        raise UserError(f"model {args['model']} of {output_dir}/args.yaml is not registered in timm: it is a trainer's "
                        "own model and args.yaml names no model_module (runs before the trainers recorded it). Add "
                        "the line 'model_module: <its module>' (LV-ViT: ToE.lvvit.model) to args.yaml")
    try:
        with torch.device("meta"):  # only the shape is needed: no memory, no initialisation
            kwargs = dict(args.get("model_kwargs") or {})
            if args.get("num_classes"):  # written by the trainers since they store it; else timm's default
                kwargs.setdefault("num_classes", int(args["num_classes"]))
            model = create_model(args["model"], args["input_size"], args.get("patch_size"), **kwargs)
    except Exception as error:  # unknown name or arguments of another timm version
        raise UserError(f"cannot build model {args['model']} of {output_dir}/args.yaml "
                        f"({error.__class__.__name__}). Summarise it with the timm version it was trained with") \
            from None
    return model_shape(model)


def run_status(args: Dict, records: List[Dict], output_dir: str) -> str:
    """"N epochs", or UNFINISHED with how to continue."""
    planned = int(args.get("epochs", len(records)))
    done = int(records[-1]["epoch"]) + 1
    return f"{len(records)} epochs" if done >= planned else \
        f"UNFINISHED: {done} of {planned} epochs (continue with --resume {output_dir}/checkpoint.pth)"


def whole_run_line(full_median: float, records: List[Dict], total: float, predicted: float,
                   reference: str = "full-token epochs", basis: str = "the full-token stage") -> str:
    """The run-level speed: ``len(records)`` epochs at the full-token median over the time taken."""
    return (f"Whole run: {full_median * len(records) / total:.2f}x faster than {len(records)} {reference} would "
            f"take (estimated from {basis}), FLOP-predicted {predicted:.2f}x")


def summarise(output_dir: str) -> str:
    args = read_args(output_dir)
    records = read_log(output_dir)
    from ToE.flops import analytic_step_flops

    dims = model_dims(args, output_dir)
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
    status = run_status(args, records, output_dir)
    lines = [f"Run in {output_dir}: {args['model']} {args.get('model_kwargs') or ''}, "
             f"{dims['num_patches']} patch tokens, {status}",
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
        if kept == dims["num_patches"]:
            measured = "baseline"  # the full-token stage is what the others are measured against
        else:
            measured = f"{full_median / seconds:.2f}x" if full_median else "n/a (no full-token stage)"
        predicted = flops(dims["num_patches"]) / flops(kept)
        lines.append(f"| {stage} | {group[0]['epoch']}-{group[-1]['epoch']} | {kept} of {dims['num_patches']} | "
                     f"{seconds:.2f} | {measured} | {predicted:.2f}x |")
    if full_median:
        predicted_run = flops(dims["num_patches"]) * len(records) / sum(flops(r["kept_tokens"]) for r in records)
        lines += ["", whole_run_line(full_median, records, total, predicted_run)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the run's --output_dir")
    args = parser.parse_args()

    def run() -> None:
        if not os.path.isdir(args.output_dir):
            raise UserError(f"{args.output_dir} does not exist. Pass the --output_dir of a run")
        if not os.path.isfile(os.path.join(args.output_dir, "log.txt")):
            raise UserError(f"no log.txt in {args.output_dir}: no epoch of a run has finished there. Pass the "
                            "--output_dir of a run that trained at least one epoch")
        print(summarise(args.output_dir))

    run_main(run)


if __name__ == "__main__":
    main()
