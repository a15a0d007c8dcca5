"""Measured training-step speed and activation memory of YOLOS with ToE, per stage, against full tokens.

    python -m bench.yolos_speed --steps 15                    # the demo detector (64 px digits canvases)
    python -m bench.yolos_speed --models yolos_ti --steps 5   # YOLOS-Ti at 512 x 672, batch 2
    python -m bench.yolos_speed --render                      # measure nothing: rewrite the .md from the .json

The demo detector is the model of ``ToE/yolos/configs/demo.yaml`` (or ``--config FILE``).

One training step = forward, Hungarian matching and set loss, backward and AdamW, on random
images and random targets (3 boxes per image), with the operator attached after block 0 in the
configuration's stage (the full-token step has no operator). The detection tokens are suffix
tokens: every block sees them, so the FLOP ideal counts them with the class token as tokens that
are never reduced (``token_select.vit_step_flops(num_prefix_tokens=1 + det_token_num)``).

Timing rotates the configurations per round (``bench.common.rotated``) and keeps every step; a
stage's speedup is the median of its per-round ratios to the full-token step. The last stage
(keep 1.0: ToE off, operator attached) is the A/A control: its ratios show the noise. Activation
memory is counted exactly (bytes autograd saves for backward, ``bench.speed.SavedTensorBytes``).
Results go to ``bench/results/yolos_speed.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch

import token_select
from bench.common import demo_config, describe_machine, git_commit, paired_ratios, recipe, rotated
from bench.speed import SavedTensorBytes
from ToE.yolos.loss import HungarianMatcher, SetCriterion
from ToE.yolos.model import YOLOS, create_backbone

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEMO = demo_config("yolos")


class Detector(NamedTuple):
    """One measured detector: its backbone, the image and batch of a timed step, and YOLOS's tokens."""
    backbone: str               # timm name
    kwargs: Dict[str, object]   # create_backbone kwargs
    image: Tuple[int, int]      # (H, W) of the random images
    batch: int
    det_tokens: int
    init_pe_size: Tuple[int, int]
    mid_pe_size: Optional[Tuple[int, int]]


# the published YOLOS sizes; "demo" is the model of the YOLOS demo recipe (detector())
MODELS: Dict[str, Detector] = {
    "yolos_ti": Detector("deit_tiny_patch16_224", {}, (512, 672), 2, 100, (800, 1333), None),
    "yolos_s": Detector("deit_small_patch16_224", {}, (512, 672), 1, 100, (512, 864), (512, 864)),
}
DEMO_BATCH = 16  # the timed batch of the demo model (its recipe trains with 8 per step)


def detector(name: str, recipe_file: str = DEMO) -> Detector:
    """``MODELS[name]``, or for "demo" the backbone, detection tokens and image size of the recipe file."""
    if name != "demo":
        return MODELS[name]
    values = recipe("yolos", recipe_file)
    init_pe = tuple(int(v) for v in values["init_pe_size"])
    image = tuple(int(v) for v in (values.get("crop_size") or init_pe))
    mid = values.get("mid_pe_size")
    return Detector(values["backbone_name"], dict(values.get("backbone_kwargs") or {}), image, DEMO_BATCH,
                    int(values["det_token_num"]), init_pe, tuple(mid) if mid else None)


SCHEDULE = dict(expansion_step=[1, 2, 3], keep_rate=[0.5, 0.75, 1.0], initialization_keep_rate=0.25,
                expansion_multiple_stage=2)
NUM_CLASSES = 11


def _targets(batch: int, gen: torch.Generator):
    return [{"labels": torch.randint(1, NUM_CLASSES, (3,), generator=gen),
             "boxes": torch.rand(3, 4, generator=gen) * 0.4 + 0.2} for _ in range(batch)]


def measure_model(name: str, steps: int, warmup: int, recipe_file: str = DEMO) -> Dict[str, object]:
    backbone_name, kwargs, (height, width), batch, det, init_pe, mid_pe = detector(name, recipe_file)
    torch.manual_seed(0)
    model = YOLOS(create_backbone(backbone_name, kwargs), NUM_CLASSES, det, init_pe, mid_pe).train()
    toe = token_select.TokenSelect(**SCHEDULE)
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=gen)
    targets = _targets(batch, gen)
    patch = model.patch_size
    patches = (height // patch) * (width // patch)
    dim, depth = model.backbone.embed_dim, len(model.backbone.blocks)
    configs = ["full", "stage1", "stage2", "stage3"]

    def set_config(config: str) -> None:
        if config == "full":
            token_select.detach(model.backbone)
        else:
            model.attach_toe(toe)
            toe.update_current_stage(int(config[-1]))
        model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), targets)["loss"]
        loss.backward()
        optimizer.step()

    rows = {}
    for config in configs:
        set_config(config)
        kept = toe.kept_patch_tokens(patches) if config != "full" else patches
        with SavedTensorBytes(exclude=list(model.parameters())) as counter:
            loss = criterion(model(images), targets)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
        ideal = token_select.vit_step_flops(patches, dim, depth, num_prefix_tokens=1 + det) / \
            token_select.vit_step_flops(patches, dim, depth, kept_patches=kept, num_prefix_tokens=1 + det)
        rows[config] = {"config": config, "kept_patches": kept, "ideal_speedup": ideal, "saved_bytes": counter.bytes,
                        "reducing": config != "full" and toe.reducing, "step_times_s": []}
        for _ in range(warmup):
            step()
    for round_index in range(steps):
        for config in rotated(configs, round_index):
            set_config(config)
            start = time.perf_counter()
            step()
            rows[config]["step_times_s"].append(time.perf_counter() - start)
    full = rows["full"]
    for row in rows.values():
        row["step_median_s"] = statistics.median(row["step_times_s"])
        row["measured_speedup"] = statistics.median(paired_ratios(full["step_times_s"], row["step_times_s"]))
        row["ratio"] = row["measured_speedup"] / row["ideal_speedup"]
        row["memory_vs_full"] = row["saved_bytes"] / full["saved_bytes"]
    control = paired_ratios(full["step_times_s"], rows["stage3"]["step_times_s"])
    return {"model": name, "backbone": backbone_name, "kwargs": kwargs, "image": [height, width], "batch": batch,
            "det_token_num": det, "patch_tokens": patches, "rows": list(rows.values()),
            "aa_control": {"median": statistics.median(control), "max_deviation": max(abs(1 - r) for r in control)}}


def format_markdown(results: Dict[str, object]) -> str:
    machine = results["machine"]
    lines = [f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, torch {machine['torch']} "
             f"({machine['torch_threads']} threads); commit {results['commit']}; load average before/after "
             f"{results['load_before']} / {results['load_after']}",
             f"Command: `{results['command']}`", ""]
    for model in results["models"]:
        lines += [f"**{model['model']}** ({model['backbone']} {model['kwargs'] or ''}, {model['image'][0]}x"
                  f"{model['image'][1]} px, batch {model['batch']}, {model['patch_tokens']} patch + 1 class + "
                  f"{model['det_token_num']} detection tokens; {len(model['rows'][0]['step_times_s'])} rounds)", "",
                  "| config | patch tokens after block 0 | median step (ms) | measured speedup | FLOP-ideal speedup "
                  "| measured / ideal | activation memory (MiB) | memory vs full |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in model["rows"]:
            lines.append(f"| {row['config']} | {row['kept_patches']} | {1000 * row['step_median_s']:.1f} | "
                         f"{row['measured_speedup']:.2f}x | {row['ideal_speedup']:.2f}x | {row['ratio']:.2f} | "
                         f"{row['saved_bytes'] / 2 ** 20:.1f} | {row['memory_vs_full']:.2f} |")
        control = model["aa_control"]
        lines += ["", f"A/A control (stage3: keep 1.0, operator attached, same work as full): median paired ratio "
                      f"{control['median']:.2f}, largest one-round deviation {control['max_deviation']:.2f}", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo"], choices=sorted([*MODELS, "demo"]),
                        help="detectors to measure (demo: the model of --config)")
    parser.add_argument("--config", default=DEMO, help="the recipe file of the demo model (default: the YOLOS demo's)")
    parser.add_argument("--render", action="store_true", help="measure nothing: rewrite the .md from the .json")
    parser.add_argument("--steps", type=int, default=15, help="timed rounds (default: 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (default: 2)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "yolos_speed"), help="output stem (.md, .json)")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.out + ".json") as handle:
            results = json.load(handle)
        text = format_markdown(results)
        with open(args.out + ".md", "w") as handle:
            handle.write(text + "\n")
        print(text)
        return results
    load_before = os.getloadavg()[0]
    models = [measure_model(name, args.steps, args.warmup, args.config) for name in args.models]
    results = {"machine": describe_machine(), "commit": git_commit(), "models": models,
               "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
               "command": "python -m bench.yolos_speed " + " ".join(argv if argv is not None else
                                                                     __import__("sys").argv[1:])}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as handle:
        json.dump(results, handle, indent=1)
    text = format_markdown(results)
    with open(args.out + ".md", "w") as handle:
        handle.write(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
