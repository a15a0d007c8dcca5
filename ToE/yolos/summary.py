"""Summarise a YOLOS run: AP, time, kept tokens and measured vs FLOP-predicted speed per ToE stage.

    python -m ToE.yolos.summary runs/demo-yolos

Reads ``log.txt`` and ``args.yaml``. Multi-scale batches change the patch count every step, so
each epoch logs the mean patch tokens per step before and after the operator; the FLOP
prediction of a stage is ``token_select.vit_step_flops`` at those means, with the class token
and the detection tokens counted as tokens every block sees. The measured speed is the median
full-token epoch over the stage's median epoch (the first epoch, with its start-up costs, is
left out of the medians where the stage has more than two).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Dict, List

import token_select
from ToE.common.errors import run_main
from ToE.common.summary import read_args, read_log


RECORD_KEYS = ("epoch", "stage", "patch_tokens", "kept_tokens", "epoch_seconds", "test_AP", "test_AP50", "test_AP75")
ARGS_KEYS = ("backbone_name", "det_token_num", "embed_dim", "depth", "epochs")


def summarise(output_dir: str) -> str:
    """The summary text; a missing, empty or foreign run folder is one UserError line."""
    args = read_args(output_dir, ARGS_KEYS)
    records = read_log(output_dir, RECORD_KEYS)
    special = 1 + int(args["det_token_num"])

    def flops(patches: float, kept: float) -> float:
        return token_select.vit_step_flops(patches, args["embed_dim"], args["depth"], kept_patches=kept,
                                           num_prefix_tokens=special)

    def median(values):
        return statistics.median(values[1:] if len(values) > 2 else values)

    full = [r for r in records if r["kept_tokens"] >= r["patch_tokens"]]
    full_median = median([r["epoch_seconds"] for r in full]) if full else None
    last, total = records[-1], sum(r["epoch_seconds"] for r in records)
    lines = [f"Run in {output_dir}: YOLOS on {args['backbone_name']} {args.get('backbone_kwargs') or ''}, "
             f"{args['det_token_num']} detection tokens, {len(records)} of {args['epochs']} epochs",
             f"pycocotools bbox AP on the {last.get('test_images', '')} val images (all tokens): AP "
             f"{last['test_AP']:.4f}, AP50 {last['test_AP50']:.4f}, AP75 {last['test_AP75']:.4f} (best AP "
             f"{max(r['test_AP'] for r in records):.4f})",
             f"Training time: {total:.1f} s ({total / 60:.1f} min), evaluation excluded",
             "",
             "| stage | epochs | patch tokens per step (mean) | kept after block 0 | median epoch (s) | measured speed "
             "| FLOP-predicted speed |",
             "|---|---|---|---|---|---|---|"]
    by_stage: Dict[int, List[Dict]] = {}
    for record in records:
        by_stage.setdefault(record["stage"], []).append(record)
    for stage, group in sorted(by_stage.items()):
        patches = statistics.mean(r["patch_tokens"] for r in group)
        kept = statistics.mean(r["kept_tokens"] for r in group)
        seconds = median([r["epoch_seconds"] for r in group])
        if kept >= patches:
            measured = "baseline"
        else:
            measured = f"{full_median / seconds:.2f}x" if full_median else "n/a (no full-token stage)"
        lines.append(f"| {stage} | {group[0]['epoch']}-{group[-1]['epoch']} | {patches:.1f} | {kept:.1f} | "
                     f"{seconds:.2f} | {measured} | {flops(patches, patches) / flops(patches, kept):.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the run's --output_dir")
    args = parser.parse_args()
    run_main(lambda: print(summarise(args.output_dir)))


if __name__ == "__main__":
    main()
