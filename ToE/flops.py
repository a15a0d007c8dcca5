"""FLOP and ideal-speedup calculator for a ToE schedule on a timm ViT.

    python -m ToE.flops --model deit_small_patch16_224 --epochs 300 \
        --expansion-step 0 100 200 --keep-rate 0.5 0.75 1.0 \
        --initialization-keep-rate 0.25 --expansion-multiple-stage 2

For every stage of the schedule it prints the patch tokens kept after block 0 and the FLOPs of
one training step (forward + backward, per sample), counted by running the real timm model
(``pretrained=False``, nothing is downloaded) with the operator attached under
``torch.utils.flop_counter.FlopCounterMode``, next to the analytic figure of
``token_select.vit_step_flops``; then the whole run's FLOPs against full-token training and the
FLOP-ideal speedup, counted and analytic.

Counting notes (why counted and analytic differ by a fraction of a per cent):
- timm's fused attention (``F.scaled_dot_product_attention``) has no FLOP formula on the CPU, so
  it is switched off while counting: the attention products are then explicit matmuls and get
  counted (the published FLOP scripts miss them).
- The counter counts matmuls and convolutions only (not norms, softmax, GELU), as does the formula.
- The image needs no gradient, so the backward of the patch embedding is 1x its forward, where
  the formula's "training = 3x forward" assumes 2x; the counter also sees the operator's own
  similarity matmul (no gradient), which the formula leaves out.
- The optimizer step is not counted (a few FLOPs per parameter, independent of the tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import token_select
from ToE.common.args import ParseKwargs, add_toe_args, build_token_select
from ToE.common.errors import UserError

__all__ = ["ModelShape", "model_shape", "count_step_flops", "schedule_report", "format_report",
           "create_model", "build_parser", "main"]


class ModelShape(dict):
    """The numbers ``token_select.vit_step_flops`` needs, read off a timm VisionTransformer."""


def model_shape(model: nn.Module) -> ModelShape:
    """Patch count, width, depth, prefix tokens, MLP ratio, patch and head sizes of ``model``. VPT's
    prompt tokens (``ToE.common.vpt``) are prefix tokens here: in every block's sequence, never reduced."""
    from ToE.common.vpt import prompt_tokens

    embed = model.patch_embed
    proj = embed.proj
    patch_dim = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    prompts = prompt_tokens(model)  # VPT: every block sees the prompts, shallow or deep
    return ModelShape(
        num_patches=int(embed.num_patches),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_prefix_tokens=int(model.num_prefix_tokens) + prompts,
        prompt_tokens=prompts,
        mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim,
        patch_dim=int(patch_dim),
        num_classes=int(model.num_classes),
    )


def analytic_step_flops(shape: ModelShape, kept_patches: Optional[int] = None) -> float:
    """``token_select.vit_step_flops`` for one training sample of a model of this shape."""
    return token_select.vit_step_flops(shape["num_patches"], shape["embed_dim"], shape["depth"],
                                       kept_patches=kept_patches,
                                       num_prefix_tokens=shape["num_prefix_tokens"],
                                       mlp_ratio=shape["mlp_ratio"], patch_dim=shape["patch_dim"],
                                       num_classes=shape["num_classes"])


def count_step_flops(model: nn.Module, input_size: int, in_chans: int = 3) -> float:
    """FLOPs of one training step (forward + backward) of ``model`` on one image, counted.

    The model is used in training mode as it is (an attached operator acts in its current
    stage). Fused attention is switched off for the count so the attention products are seen,
    and restored afterwards; gradients are cleared again.
    """
    attentions = [blk.attn for blk in model.blocks if hasattr(blk.attn, "fused_attn")]
    fused = [attn.fused_attn for attn in attentions]
    was_training = model.training
    model.train()
    images = torch.randn(1, in_chans, input_size, input_size)
    try:
        for attn in attentions:
            attn.fused_attn = False
        with FlopCounterMode(display=False) as counter:
            outputs = model(images)  # LV-ViT trains on a tuple (class logits, dense logits, MixToken box)
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            sum(out.float().sum() for out in outputs if torch.is_tensor(out) and out.is_floating_point()).backward()
    finally:
        for attn, flag in zip(attentions, fused):
            attn.fused_attn = flag
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return float(counter.get_total_flops())


def _in_chans(model: nn.Module) -> int:
    """Image channels: the first convolution of the patch embedding (a timm ViT's projection, or
    the first layer of LV-ViT's convolutional stem)."""
    return next(m for m in model.patch_embed.modules() if isinstance(m, nn.Conv2d)).in_channels


def create_model(name: str, input_size: Optional[int] = None, patch_size: Optional[int] = None,
                 **model_kwargs) -> nn.Module:
    """A randomly initialised timm ViT (never downloads weights), at the given image and patch size;
    ``lvvit_*`` names are this project's LV-ViT models (registered in timm on import). A patch
    that does not tile the image is refused, as the trainers refuse it."""
    import timm  # imported here so `--help` stays fast

    if name.startswith("lvvit"):
        import ToE.lvvit  # noqa: F401  (registers the LV-ViT models in timm)

    if input_size is not None:
        model_kwargs.setdefault("img_size", input_size)
    if patch_size is not None:
        model_kwargs.setdefault("patch_size", patch_size)
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}. Pick a timm ViT name, e.g. deit_small_patch16_224 (list them with: "
                         "python -c \"import timm; print(timm.list_models('deit*'))\")")
    extra = {key: value for key, value in model_kwargs.items() if key not in ("img_size", "patch_size")}
    try:
        model = timm.create_model(name, pretrained=False, **model_kwargs)
    except TypeError as err:  # a keyword the model does not take
        if "img_size" in str(err) or "patch_size" in str(err):
            raise ValueError(f"model {name!r} is not a timm VisionTransformer (it takes no image or patch size). Pick "
                             "a ViT, e.g. deit_small_patch16_224") from None
        raise ValueError(f"model {name!r} does not take --model-kwargs {_kwargs_text(extra)} ({err}). Fix "
                         "--model-kwargs") from None
    except Exception as err:  # noqa: BLE001 - timm and torch refuse impossible sizes with several types
        raise ValueError(f"timm cannot build {name!r} with --model-kwargs {_kwargs_text(extra)} "
                         f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}). Fix "
                         "--model-kwargs") from None
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ValueError(f"model {name!r} is not a timm VisionTransformer (no blocks / patch_embed). Pick a ViT, e.g. "
                         "deit_small_patch16_224")
    if len(model.blocks) == 0:
        raise ValueError(f"model {name!r} with --model-kwargs {_kwargs_text(extra)} has no transformer blocks, so "
                         "there is nothing to price. Give it a depth of at least 1")
    patch = model.patch_embed.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    size = input_size or int(model.patch_embed.img_size[0])
    if size < patch or size % patch:
        raise ValueError(f"--input-size {size} is not a multiple of the patch size {patch}: the patches do not tile "
                         "the image. Pass an --input-size that is, or another --patch-size")
    return model


def _kwargs_text(kwargs: Dict[str, object]) -> str:
    return " ".join(f"{key}={value}" for key, value in kwargs.items()) or "(none)"


def schedule_report(model: nn.Module, input_size: int, epochs: int, expansion_step: Sequence[int],
                    keep_rate: Sequence[float], initialization_keep_rate: float,
                    expansion_multiple_stage: int = 2, count: bool = True) -> Dict[str, object]:
    """Per-stage tokens and step FLOPs (counted and analytic) and the whole run's FLOPs.

    Attaches a ``TokenSelect`` with this schedule to ``model`` for the count and detaches it
    again. Returns a JSON-ready dict: ``stages`` (one row per stage 0..S, stage 0 being the
    epochs before the first expansion step, if any), ``run`` (totals per training sample and
    the ideal speedups), ``shape`` (the model numbers used by the formula).
    """
    shape = model_shape(model)
    num_patches = shape["num_patches"]
    operator = token_select.TokenSelect(expansion_step, keep_rate, initialization_keep_rate,
                                        expansion_multiple_stage)
    token_select.attach(model, operator)
    operator.num_prefix_tokens = shape["num_prefix_tokens"]  # VPT's prompts pass the operator as prefix tokens
    try:
        rows: List[Dict[str, object]] = []
        for stage in range(len(keep_rate) + 1):
            start = 0 if stage == 0 else expansion_step[stage - 1]
            stop = expansion_step[stage] if stage < len(expansion_step) else epochs
            stage_epochs = max(0, min(stop, epochs) - min(start, epochs))
            if stage == 0 and stage_epochs == 0:
                continue  # the schedule starts reducing at epoch 0: there is no stage 0
            operator.current_stage = stage
            kept = operator.kept_patch_tokens(num_patches)
            analytic = analytic_step_flops(shape, kept)
            counted = count_step_flops(model, input_size, _in_chans(model)) if count else None
            rows.append({"stage": stage, "epochs": stage_epochs, "first_epoch": start,
                         "kept_patches": kept, "tokens_after_block0": kept + shape["num_prefix_tokens"],
                         "reducing": operator.reducing, "step_flops_counted": counted,
                         "step_flops_analytic": analytic})
    finally:
        token_select.detach(model)
    full_analytic = analytic_step_flops(shape)
    # The full-token step is the last stage when it keeps everything; count it otherwise.
    full_counted = None
    if count:
        full_rows = [r for r in rows if not r["reducing"]]
        full_counted = full_rows[-1]["step_flops_counted"] if full_rows else count_step_flops(
            model, input_size, _in_chans(model))
    run = {"epochs": epochs,
           "toe_flops_analytic": sum(r["step_flops_analytic"] * r["epochs"] for r in rows),
           "full_flops_analytic": full_analytic * epochs}
    run["ideal_speedup_analytic"] = run["full_flops_analytic"] / run["toe_flops_analytic"]
    # Cross-check against the operator module's own helper (the same numbers the trainers use).
    run["ideal_speedup_token_select"] = token_select.ideal_speedup(
        epochs, num_patches, shape["embed_dim"], shape["depth"], expansion_step, keep_rate,
        initialization_keep_rate, expansion_multiple_stage, num_prefix_tokens=shape["num_prefix_tokens"],
        mlp_ratio=shape["mlp_ratio"], patch_dim=shape["patch_dim"], num_classes=shape["num_classes"])
    if count:
        run["toe_flops_counted"] = sum(r["step_flops_counted"] * r["epochs"] for r in rows)
        run["full_flops_counted"] = full_counted * epochs
        run["ideal_speedup_counted"] = run["full_flops_counted"] / run["toe_flops_counted"]
    for row in rows:
        row["step_speedup_analytic"] = full_analytic / row["step_flops_analytic"]
        if count:
            row["step_speedup_counted"] = full_counted / row["step_flops_counted"]
    return {"shape": dict(shape), "stages": rows, "run": run}


def _flops_text(value: float) -> str:
    """FLOPs with a unit that keeps three significant digits readable (PFLOPs .. MFLOPs)."""
    for unit, scale in (("PFLOPs", 1e15), ("TFLOPs", 1e12), ("GFLOPs", 1e9)):
        if value >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value / 1e6:.3f} MFLOPs"


def format_report(report: Dict[str, object], title: str = "") -> str:
    """The report as the text ``python -m ToE.flops`` prints (markdown tables)."""
    run = report["run"]
    counted = "ideal_speedup_counted" in run
    giga = 1e9
    lines = []
    if title:
        lines += [title, ""]
    shape = report["shape"]
    prompts = f" ({shape['prompt_tokens']} of them VPT prompts)" if shape.get("prompt_tokens") else ""
    lines.append(f"{shape['num_patches']} patch tokens + {shape['num_prefix_tokens']} prefix{prompts}, width "
                 f"{shape['embed_dim']}, depth {shape['depth']}; GFLOPs of one training step "
                 f"(forward + backward) per sample, attention included")
    lines.append("")
    header = "| stage | epochs | kept patch tokens | tokens after block 0 |"
    rule = "|---|---|---|---|"
    if counted:
        header += " GFLOPs counted | GFLOPs analytic | diff | step speedup counted |"
        rule += "---|---|---|---|"
    else:
        header += " GFLOPs analytic | step speedup analytic |"
        rule += "---|---|"
    lines += [header, rule]
    for row in report["stages"]:
        span = f"{row['first_epoch']}-{row['first_epoch'] + row['epochs'] - 1}" if row["epochs"] else "-"
        kept = f"{row['kept_patches']}" + ("" if row["reducing"] else " (ToE off)")
        line = f"| {row['stage']} | {span} | {kept} | {row['tokens_after_block0']} |"
        if counted:
            diff = row["step_flops_counted"] / row["step_flops_analytic"] - 1.0
            line += (f" {row['step_flops_counted'] / giga:.3f} | {row['step_flops_analytic'] / giga:.3f} |"
                     f" {diff * 100:+.2f} % | {row['step_speedup_counted']:.3f}x |")
        else:
            line += f" {row['step_flops_analytic'] / giga:.3f} | {row['step_speedup_analytic']:.3f}x |"
        lines.append(line)
    lines.append("")
    lines.append(f"Whole run, {run['epochs']} epochs, per training sample:")
    if counted:
        lines.append(f"  counted : ToE {_flops_text(run['toe_flops_counted'])} vs full "
                     f"{_flops_text(run['full_flops_counted'])} = "
                     f"{run['toe_flops_counted'] / run['full_flops_counted']:.4f} of full, "
                     f"ideal speedup {run['ideal_speedup_counted']:.3f}x")
    lines.append(f"  analytic: ToE {_flops_text(run['toe_flops_analytic'])} vs full "
                 f"{_flops_text(run['full_flops_analytic'])} = "
                 f"{run['toe_flops_analytic'] / run['full_flops_analytic']:.4f} of full, "
                 f"ideal speedup {run['ideal_speedup_analytic']:.3f}x "
                 f"(token_select.ideal_speedup: {run['ideal_speedup_token_select']:.3f}x)")
    if counted:
        agree = run["ideal_speedup_counted"] / run["ideal_speedup_analytic"] - 1.0
        lines.append(f"  counted vs analytic ideal speedup: {agree * 100:+.2f} %")
    return "\n".join(lines)


def curriculum_report(model_name: str, model_kwargs: Dict[str, object], input_size: int, patch_size: Optional[int],
                      epochs: int, crops: Sequence[int], expansion_step: Sequence[int], keep_rate: Sequence[float],
                      initialization_keep_rate: float, expansion_multiple_stage: int = 2,
                      count: bool = True) -> Dict[str, object]:
    """FLOP-ideal speedups of a resolution curriculum (EfficientTrain), of ToE, and of both.

    ``crops[e]`` is the input side of global epoch e. Every distinct (crop, ToE stage) of the run
    is counted once on a model with a full-resolution position table interpolated to the crop's
    grid (what the EfficientTrain trainer trains), with ToE's counts on that grid; the low-pass
    FFT itself is not counted. Returns ``phases`` (one row per run of epochs with the same crop
    and stage) and ``run`` (whole-run FLOPs per sample and the speedups of ET, ToE and ET + ToE
    over full-token training at ``input_size``, analytic and counted).
    """
    model = create_model(model_name, input_size, patch_size, dynamic_img_size=True, **model_kwargs)
    shape = model_shape(model)
    patch = model.patch_embed.proj.kernel_size[0]
    operator = token_select.TokenSelect(expansion_step, keep_rate, initialization_keep_rate,
                                        expansion_multiple_stage)
    token_select.attach(model, operator)
    cache: Dict[tuple, tuple] = {}

    def step(crop: int, stage: int) -> tuple:
        """(kept patches, analytic FLOPs, counted FLOPs) of one step at ``crop`` in ``stage``."""
        if (crop, stage) not in cache:
            operator.current_stage = stage
            patches = (crop // patch) ** 2
            kept = operator.kept_patch_tokens(patches)
            analytic = analytic_step_flops(ModelShape(shape, num_patches=patches), kept)
            counted = count_step_flops(model, crop, _in_chans(model)) if count else None
            cache[(crop, stage)] = (kept, analytic, counted)
        return cache[(crop, stage)]

    try:
        totals = {name: [0.0, 0.0] for name in ("full", "et", "toe", "et_toe")}
        phases: List[Dict[str, object]] = []
        for epoch in range(epochs):
            crop, stage = crops[epoch], token_select.stage_of_epoch(epoch, expansion_step)
            final_stage = len(keep_rate)
            for name, (c, s) in (("full", (input_size, final_stage)), ("et", (crop, final_stage)),
                                 ("toe", (input_size, stage)), ("et_toe", (crop, stage))):
                _, analytic, counted = step(c, s if operator_reduces(s, keep_rate) else final_stage)
                totals[name][0] += analytic
                totals[name][1] += counted or 0.0
            if phases and phases[-1]["crop"] == crop and phases[-1]["stage"] == stage:
                phases[-1]["epochs"] += 1
                continue
            kept, analytic, counted = step(crop, stage)
            phases.append({"first_epoch": epoch, "epochs": 1, "crop": crop, "stage": stage,
                           "patches": (crop // patch) ** 2, "kept_patches": kept,
                           "step_flops_analytic": analytic, "step_flops_counted": counted})
    finally:
        token_select.detach(model)
    run = {"epochs": epochs}
    for name in ("et", "toe", "et_toe"):
        run[f"{name}_speedup_analytic"] = totals["full"][0] / totals[name][0]
        if count:
            run[f"{name}_speedup_counted"] = totals["full"][1] / totals[name][1]
    return {"phases": phases, "run": run}


def operator_reduces(stage: int, keep_rate: Sequence[float]) -> bool:
    return token_select.is_reducing_stage(stage, keep_rate)


def format_curriculum(report: Dict[str, object], title: str = "") -> str:
    """The curriculum report as markdown (printed by ``python -m ToE.flops --curriculum ...``)."""
    run = report["run"]
    counted = "et_speedup_counted" in run
    lines = [title, ""] if title else []
    lines += ["| epochs | crop px | patch tokens | ToE stage | kept patch tokens | GFLOPs analytic |"
              + (" GFLOPs counted |" if counted else ""),
              "|---|---|---|---|---|---|" + ("---|" if counted else "")]
    for row in report["phases"]:
        line = (f"| {row['first_epoch']}-{row['first_epoch'] + row['epochs'] - 1} | {row['crop']} | {row['patches']}"
                f" | {row['stage']} | {row['kept_patches']} | {row['step_flops_analytic'] / 1e9:.3f} |")
        if counted:
            line += f" {row['step_flops_counted'] / 1e9:.3f} |"
        lines.append(line)
    lines.append("")
    for name, label in (("et", "ET alone"), ("toe", "ToE alone"), ("et_toe", "ET + ToE")):
        text = f"  {label:9s}: ideal speedup {run[f'{name}_speedup_analytic']:.2f}x analytic"
        if counted:
            text += f", {run[f'{name}_speedup_counted']:.2f}x counted"
        lines.append(text)
    return "\n".join(lines)


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block) and exits with status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The calculator's flags: the trainers' model and ToE schedule names, plus ``--epochs``."""
    parser = _OneLineErrorParser(prog="python -m ToE.flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224",
                        help="timm model name, a VisionTransformer (default: deit_small_patch16_224)")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                        help="extra timm.create_model arguments, e.g. embed_dim=96 depth=6 num_heads=3")
    parser.add_argument("--input-size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="patch side in pixels (default: the model's own)")
    parser.add_argument("--epochs", type=int, default=300, help="length of the run in epochs (default: 300)")
    # The trainers' own ToE flags (one definition in ToE/common); --distance, --initialization
    # and --sparse-eval are accepted so a trainer command line can be pasted, and change no FLOPs.
    add_toe_args(parser)
    parser.add_argument("--vpt", default=None, choices=["shallow", "deep"],
                        help="Visual Prompt Tuning, as the trainers' --vpt: --prompt-tokens more tokens in every "
                             "block's sequence, passed through by ToE (default: off)")
    parser.add_argument("--prompt-tokens", type=int, default=10, help="prompt tokens per set with --vpt (default: 10)")
    parser.add_argument("--analytic-only", action="store_true",
                        help="skip the counted FLOPs (no model forward; instant)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")
    parser.add_argument("--curriculum", default=None, choices=["et", "etpp", "table"],
                        help="also report a resolution curriculum (EfficientTrain's presets scaled to --epochs and "
                             "--input-size, or --segments): the ideal speedup of ET, ToE and ET + ToE")
    parser.add_argument("--segments", nargs="+", default=None, metavar="END:CROP:MAGNITUDE",
                        help="--curriculum table: the segments, as the EfficientTrain trainer takes them")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1; got {args.epochs}")
        if args.input_size < 1 or (args.patch_size is not None and args.patch_size < 1):
            raise ValueError("--input-size and --patch-size must be positive")
        build_token_select(args)  # the trainers' schedule check and message (it names the flags)
        if args.json:
            check_writable(args.json, "--json")  # before minutes of counting, not after
        model = create_model(args.model, args.input_size, args.patch_size, **args.model_kwargs)
        if args.vpt:
            if args.prompt_tokens < 1:
                raise ValueError(f"--prompt-tokens must be >= 1 with --vpt; got {args.prompt_tokens}")
            from ToE.common.vpt import add_prompts

            add_prompts(model, args.prompt_tokens, deep=args.vpt == "deep")
        segments = None
        if args.curriculum:
            from ToE.EfficientTrain.curriculum import plan_curriculum

            # batches do not change FLOPs per sample: any that the planner accepts
            segments = plan_curriculum(args.curriculum, args.epochs, args.input_size,
                                       model.patch_embed.proj.kernel_size[0], 1, 1 << 20, table=args.segments)
    except (ValueError, TypeError, UserError) as err:
        parser.error(str(err).splitlines()[0] if str(err) else repr(err))
    unreached = [step for step in args.expansion_step if step >= args.epochs]
    if unreached:  # as the trainers warn: the report prices the stages the run reaches
        print(f"warning: ToE stages starting at epochs {unreached} are never reached in {args.epochs} epochs "
              f"(--expansion-step {' '.join(map(str, args.expansion_step))}): the run ends in an earlier stage",
              file=sys.stderr)
    report = schedule_report(model, args.input_size, args.epochs, args.expansion_step, args.keep_rate,
                             args.initialization_keep_rate, args.expansion_multiple_stage,
                             count=not args.analytic_only)
    report["args"] = vars(args)
    title = (f"{args.model} at {args.input_size} px, schedule {args.expansion_step} / {args.keep_rate} / "
             f"r0 {args.initialization_keep_rate} / k {args.expansion_multiple_stage}"
             + (f", {args.vpt} VPT with {args.prompt_tokens} prompt tokens" if args.vpt else ""))
    print(format_report(report, title))
    if type(model).__name__ not in ("VisionTransformer", "VisionTransformerDistilled"):
        print(f"note: {type(model).__name__} is not timm's VisionTransformer: the analytic formula knows a plain "
              "patch projection and class head only (LV-ViT's convolutional stem and dense head are not in it); "
              "trust the counted figures")
    if segments is not None:
        from ToE.EfficientTrain.curriculum import segment_at

        crops = [segment_at(segments, epoch).crop for epoch in range(segments[-1].end)]
        report["curriculum"] = curriculum_report(
            args.model, args.model_kwargs, args.input_size, args.patch_size, len(crops), crops, args.expansion_step,
            args.keep_rate, args.initialization_keep_rate, args.expansion_multiple_stage,
            count=not args.analytic_only)
        print()
        crop_list = [segment.crop for segment in segments]
        print(format_curriculum(report["curriculum"], f"Curriculum {args.curriculum}, {len(crops)} epochs, crops "
                                f"{crop_list} px, against full-token training at {args.input_size} px"))
    if args.json:
        try:
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=2)
        except OSError as err:  # e.g. the disk filled up while counting
            parser.error(f"cannot write --json {args.json} ({err.strerror or err.__class__.__name__}); the report "
                         "above is complete")
    return report


def check_writable(path: str, flag: str) -> None:
    """A ValueError naming ``flag`` when a file cannot be written at ``path`` (a folder, a missing or read-only
    folder above it), so that a calculation does not end in a traceback after its work."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder. Pass a file name, e.g. {os.path.join(path, 'report.json')}")
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: the folder {parent} does not exist. Create it first, or pass another path")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path} cannot be written (no write permission). Pass a path you can write")


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    main()
