"""Summarise a run of any ToE trainer: accuracy (or AP), time, kept tokens and measured vs FLOP-predicted speed.

    python -m ToE.common.summary runs/demo        # DeiT, LV-ViT, EfficientTrain or YOLOS output folder

Reads ``log.txt`` (one JSON line per epoch, ``ToE.common.log.read_log``) and ``args.yaml`` from the
output folder (``ToE.common.results.read_args``). The table has one row per ToE stage or, for an
EfficientTrain run with a curriculum, per phase (a run of epochs with the same crop and kept tokens). A row's measured
speed is the full-token (full-resolution) median epoch over its own median epoch (the first epoch
of a group, with its start-up costs, is left out where the group has 3 or more); the prediction is
the FLOP ratio of one training step (``token_select.vit_step_flops`` via ``ToE.flops``). Without a
full-token row there is no measured baseline and only the prediction is printed. The whole-run
line sets the run's time against as many full-token epochs.

YOLOS runs (``det_token_num`` in args.yaml) print pycocotools bbox AP; multi-scale batches change
the patch count every step, so each epoch logs the mean patch tokens per step before and after the
operator, and the prediction counts the class and detection tokens as tokens every block sees.
The FFT crop of EfficientTrain and data loading are in the measured time, not in the prediction.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ToE.common.errors import UserError, run_main
from ToE.common.log import read_log
from ToE.common.results import RECORD_KEYS, median_steady, read_args

YOLOS_RECORD_KEYS = ("epoch", "stage", "patch_tokens", "kept_tokens", "epoch_seconds", "test_AP", "test_AP50",
                     "test_AP75")
YOLOS_ARGS_KEYS = ("backbone_name", "det_token_num", "embed_dim", "depth", "epochs")


def model_dims(args: Dict, output_dir: str) -> Dict:
    """The run's model shape (``ToE.flops.model_shape``), built on the meta device from args.yaml, with
    VPT's prompt tokens where the run had them; a trainer's own model module (args.yaml
    ``model_module``) is imported first."""
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
            if args.get("vpt"):  # the prompts are in every block's sequence: model_shape counts them
                from ToE.common.vpt import add_prompts

                add_prompts(model, int(args.get("prompt_tokens") or 10), deep=args["vpt"] == "deep")
    except Exception as error:  # unknown name or arguments of another timm version
        raise UserError(f"cannot build model {args['model']} of {output_dir}/args.yaml "
                        f"({error.__class__.__name__}). Summarise it with the timm version it was trained with") \
            from None
    return model_shape(model)


def run_status(args: Dict, records: List[Dict], output_dir: str, training: Optional[str] = None) -> str:
    """"N epochs"; IN PROGRESS while ``training`` names the process that still trains the run (the
    holder of the folder's lock, ``ToE.common.lock.holder``: resuming now would make a second writer);
    else UNFINISHED with how to continue."""
    # run_epochs: what the run trains (e.g. --epochs + --cooldown-epochs); older runs wrote it as epochs
    planned = int(args.get("run_epochs", args.get("epochs", len(records))))
    done = int(records[-1]["epoch"]) + 1
    if done >= planned:
        return f"{len(records)} epochs"
    if training:
        return (f"IN PROGRESS: {done} of {planned} epochs so far, still training ({training}). Summarise it again "
                "when it has finished")
    checkpoint = os.path.join(output_dir, "checkpoint.pth")
    if not os.path.isfile(checkpoint):
        return f"UNFINISHED: {done} of {planned} epochs (no checkpoint.pth to continue from)"
    return (f"UNFINISHED: {done} of {planned} epochs (continue with the same command and --auto-resume, or "
            f"--resume {checkpoint})")


def whole_run_line(full_median: float, records: List[Dict], total: float, predicted: float,
                   reference: str = "full-token epochs", basis: str = "the full-token stage") -> str:
    """The run-level speed: ``len(records)`` epochs at the full-token median over the time taken."""
    return (f"Whole run: {full_median * len(records) / total:.2f}x faster than {len(records)} {reference} would "
            f"take (estimated from {basis}), FLOP-predicted {predicted:.2f}x")


class _Plan:
    """What differs between the trainers' tables: how epochs group into rows, a row's first cells,
    whether a row is the full-token baseline, and the FLOPs of one step of an epoch."""

    columns: Sequence[str]
    no_baseline = "n/a (no full-token stage)"
    reference, basis = "full-token epochs", "the full-token stage"

    def groups(self, records: List[Dict]) -> List[Tuple[object, List[Dict]]]:
        by_stage: Dict[int, List[Dict]] = {}
        for record in records:
            by_stage.setdefault(record["stage"], []).append(record)
        return sorted(by_stage.items(), key=lambda item: item[0])

    cells: Callable[[object, List[Dict]], List[str]]
    is_full: Callable[[object, List[Dict]], bool]
    predicted: Callable[[object, List[Dict]], float]  # full-token step FLOPs / the row's
    full_flops: Callable[[Dict], float]
    step_flops: Callable[[Dict], float]


def _classification_plan(args: Dict, output_dir: str) -> _Plan:
    from ToE.flops import analytic_step_flops

    dims = model_dims(args, output_dir)
    full = dims["num_patches"]
    plan = _Plan()
    plan.columns = ("stage", "epochs", "patch tokens kept")
    plan.cells = lambda stage, group: [str(stage), f"{group[0]['epoch']}-{group[-1]['epoch']}",
                                       f"{group[0]['kept_tokens']} of {full}"]
    plan.is_full = lambda stage, group: group[0]["kept_tokens"] == full
    plan.full_flops = lambda record: analytic_step_flops(dims, full)
    plan.step_flops = lambda record: analytic_step_flops(dims, record["kept_tokens"])
    plan.predicted = lambda stage, group: plan.full_flops(group[0]) / plan.step_flops(group[0])
    plan.header = f"{args['model']} {args.get('model_kwargs') or ''}, {full} patch tokens" + (
        f" and {dims['prompt_tokens']} {args['vpt']} VPT prompt tokens" if dims.get("prompt_tokens") else "")
    return plan


def _curriculum_plan(args: Dict, output_dir: str) -> _Plan:
    from ToE.flops import analytic_step_flops

    dims = model_dims(args, output_dir)
    full = dims["num_patches"]

    def key(record: Dict) -> Tuple[int, int, int]:  # (crop, patch tokens, kept tokens)
        return (record.get("resolution", args["input_size"]), record.get("patch_tokens", full), record["kept_tokens"])

    def flops(patches: int, kept: int) -> float:
        return analytic_step_flops(type(dims)(dims, num_patches=patches), kept)

    plan = _Plan()
    plan.columns = ("epochs", "crop px", "patch tokens", "kept after block 0")
    plan.no_baseline = "n/a (no full phase)"
    plan.reference, plan.basis = "full-resolution full-token epochs", "the last phase"

    def groups(records):  # consecutive epochs of one phase
        phases: List[Tuple[Tuple[int, int, int], List[Dict]]] = []
        for record in records:
            if phases and phases[-1][0] == key(record):
                phases[-1][1].append(record)
            else:
                phases.append((key(record), [record]))
        return phases

    plan.groups = groups
    plan.cells = lambda phase, group: [f"{group[0]['epoch']}-{group[-1]['epoch']}", *map(str, phase)]
    plan.is_full = lambda phase, group: phase[1] == full and phase[2] == full
    plan.full_flops = lambda record: flops(full, full)
    plan.step_flops = lambda record: flops(*key(record)[1:])
    plan.predicted = lambda phase, group: flops(full, full) / flops(*phase[1:])
    plan.header = f"{args['model']} {args.get('model_kwargs') or ''}, curriculum {args.get('curriculum', 'none')}"
    return plan


def _detection_plan(args: Dict) -> _Plan:
    import token_select

    special = 1 + int(args["det_token_num"])  # the class and detection tokens: every block sees them

    def flops(patches: float, kept: float) -> float:
        return token_select.vit_step_flops(patches, args["embed_dim"], args["depth"], kept_patches=kept,
                                           num_prefix_tokens=special)

    def means(group):
        return (statistics.mean(r["patch_tokens"] for r in group), statistics.mean(r["kept_tokens"] for r in group))

    plan = _Plan()
    plan.columns = ("stage", "epochs", "patch tokens per step (mean)", "kept after block 0")
    plan.cells = lambda stage, group: [str(stage), f"{group[0]['epoch']}-{group[-1]['epoch']}",
                                       *(f"{value:.1f}" for value in means(group))]
    plan.is_full = lambda stage, group: means(group)[1] >= means(group)[0]
    plan.full_flops = lambda record: flops(record["patch_tokens"], record["patch_tokens"])
    plan.step_flops = lambda record: flops(record["patch_tokens"], record["kept_tokens"])
    plan.predicted = lambda stage, group: flops(means(group)[0], means(group)[0]) / flops(*means(group))
    plan.header = (f"YOLOS on {args['backbone_name']} {args.get('backbone_kwargs') or ''}, "
                   f"{args['det_token_num']} detection tokens")
    return plan


def _metric_lines(args: Dict, records: List[Dict]) -> List[str]:
    """The accuracy (classification) or AP (detection) lines of the summary."""
    last = records[-1]
    if "test_AP" in last:
        return [f"pycocotools bbox AP on the {last.get('test_images', '')} val images (all tokens): AP "
                f"{last['test_AP']:.4f}, AP50 {last['test_AP50']:.4f}, AP75 {last['test_AP75']:.4f} (best AP "
                f"{max(r['test_AP'] for r in records):.4f})"]
    if args.get("curriculum", "none") != "none":  # early epochs evaluate at a smaller crop
        full_res = [r["test_acc1"] for r in records if r.get("resolution", args["input_size"]) == args["input_size"]]
        return [f"Top-1 on the held-out images: {last['test_acc1']:.2f} % in the last epoch (evaluated at "
                f"{last.get('resolution', args['input_size'])} px); best over the full-resolution epochs: "
                + (f"{max(full_res):.2f} %" if full_res else "none yet")]
    best = max(r["test_acc1"] for r in records)
    return [f"Top-1 on the held-out images: {last['test_acc1']:.2f} % (best {best:.2f} %)"
            + (f", EMA {last['ema_acc1']:.2f} %" if "ema_acc1" in last else "")]


def summarise(output_dir: str) -> str:
    """The summary text of the run in ``output_dir`` (any trainer); a missing, empty or foreign
    folder is one UserError line."""
    from ToE.common.lock import holder

    # asked before the log is read: a run that holds the lock now has not finished the epochs read below
    training = holder(output_dir)
    args = read_args(output_dir, keys=())
    if "det_token_num" in args:
        args = read_args(output_dir, YOLOS_ARGS_KEYS)
        records = read_log(output_dir, YOLOS_RECORD_KEYS)
        plan = _detection_plan(args)
    else:
        args = read_args(output_dir)
        records = read_log(output_dir, RECORD_KEYS)
        plan = (_curriculum_plan if args.get("curriculum", "none") != "none" else _classification_plan)(
            args, output_dir)

    groups = plan.groups(records)
    full_seconds = [r["epoch_seconds"] for key, group in groups if plan.is_full(key, group) for r in group]
    full_median = median_steady(full_seconds) if full_seconds else None
    total = sum(r["epoch_seconds"] for r in records)
    lines = [f"Run in {output_dir}: {plan.header}, {run_status(args, records, output_dir, training)}",
             *_metric_lines(args, records),
             f"Training time: {total:.1f} s ({total / 60:.1f} min), evaluation excluded", "",
             "| " + " | ".join([*plan.columns, "median epoch (s)", "measured speed", "FLOP-predicted speed"]) + " |",
             "|" + "---|" * (len(plan.columns) + 3)]
    for key, group in groups:
        seconds = median_steady([r["epoch_seconds"] for r in group])
        if plan.is_full(key, group):
            measured = "baseline"  # the full-token row is what the others are measured against
        else:
            measured = f"{full_median / seconds:.2f}x" if full_median else plan.no_baseline
        lines.append("| " + " | ".join([*plan.cells(key, group), f"{seconds:.2f}", measured,
                                        f"{plan.predicted(key, group):.2f}x"]) + " |")
    if full_median:
        predicted = sum(plan.full_flops(r) for r in records) / sum(plan.step_flops(r) for r in records)
        lines += ["", whole_run_line(full_median, records, total, predicted, plan.reference, plan.basis)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the run's --output_dir (DeiT, LV-ViT, EfficientTrain or YOLOS)")
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
