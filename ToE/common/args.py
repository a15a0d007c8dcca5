"""The published ToE command-line flags, defined once for every trainer."""

from __future__ import annotations

import argparse
from typing import List

import token_select as operator_module
from token_select import TokenSelect

from .errors import UserError


# -- flags by role: every list of flag names lives here ------------------------------------------
# the flags that define the operator's schedule (stored with every checkpoint)
TOE_KEYS = ("expansion_step", "keep_rate", "initialization_keep_rate", "expansion_multiple_stage", "distance",
            "initialization", "expansion", "merging", "distance_rank", "reducer")
# Flags that do not change what a run computes: a resume may give other values. Every other flag
# is part of the run's identity and must match its checkpoint (the epoch count is checked apart:
# it may grow). Paths may move (data, teacher, labels, the init checkpoint only used at the start);
# the precision may change (a fresh loss scale); an EMA may be added to a run that had none.
NOT_IDENTITY = frozenset({
    "config", "output_dir", "resume", "auto_resume", "overwrite", "check_only", "eval", "epochs", "start_epoch",
    "stop_after_epochs", "time_limit", "log_interval", "device", "amp_dtype", "num_workers", "pin_mem", "dist_eval",
    "eval_batch_size", "results_json", "data_path", "teacher_path", "token_label_data", "init_checkpoint", "model_ema",
    "finetune", "data_backend",
    "global_batch",  # checked as the images per update the run resolved (_resume), not as the flag
    "best_of", "eval_amp",  # what is reported and how it is evaluated, not what trains
    "checkpoint_hist", "torchcompile",  # how the run computes, not what
})
# flags a config file does not set: where the configuration comes from, and what only the command
# line decides (a run's args.yaml holds them; read back as a config, they are left out)
COMMAND_LINE_ONLY = ("config", "check_only", "overwrite", "resume", "auto_resume", "eval")
# flags spelled with underscores, as DeiT's main.py spells them (every other flag: dashes)
UNDERSCORED = ("output_dir", "start_epoch", "num_workers")
# (which flags shape the weights, that --eval must share, is each task's weights_must_match)


# the switches of ToE's own operator (its ablations): flag -> the values that are ToE
TOE_SWITCHES = {"initialization": ("stride", "uniform"), "expansion": ("farthest",), "merging": ("mean",),
                "distance_rank": ("similarity",), "distance": ("cosine",)}


def toe_switches(args: argparse.Namespace) -> List[str]:
    """The switches of ToE's operator that ``args`` turns away from ToE, as flags (``--merging drop``):
    meaningless, and refused, when another reducer or PatchDropout chooses the tokens."""
    return [f"{flag_name(name)} {getattr(args, name)}" for name, toe in TOE_SWITCHES.items()
            if getattr(args, name, toe[0]) not in toe]


def flag_name(key: str) -> str:
    """``keep_rate`` -> ``--keep-rate`` (the names that keep DeiT's underscores stay as they are)."""
    return f"--{key}" if key in UNDERSCORED else f"--{key.replace('_', '-')}"


def add_toe_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the Token Expansion flags (published names and defaults) to ``parser``."""
    group = parser.add_argument_group("Token Expansion (ToE)")
    group.add_argument("--expansion-step", type=int, nargs="+", default=[0, 100, 200],
                       help="epoch at which each ToE stage starts (default: 0 100 200)")
    group.add_argument("--keep-rate", type=float, nargs="+", default=[0.5, 0.75, 1.0],
                       help="share of patch tokens kept in each stage; 1.0 in the last stage trains "
                            "on all tokens (default: 0.5 0.75 1.0)")
    group.add_argument("--initialization-keep-rate", type=float, default=0.25,
                       help="share of seed tokens spread before expansion (default: 0.25)")
    group.add_argument("--expansion-multiple-stage", type=int, default=2,
                       help="repetition steps of the expansion in each stage (default: 2)")
    group.add_argument("--distance", default="cosine", choices=["cosine", "manhattan", "euclidean"],
                       help="token similarity used to expand and merge (default: cosine)")
    group.add_argument("--initialization", default="stride", choices=list(operator_module.INITIALIZATIONS),
                       help="seed layout: 'stride' is the published rule, 'uniform' spreads seeds over "
                            "the whole patch grid, 'random' draws them per image (an ablation) (default: stride)")
    group.add_argument("--expansion", default="farthest", choices=list(operator_module.EXPANSIONS),
                       help="how each stage adds tokens: 'farthest' (ToE: the tokens least like anything kept), "
                            "'random' (random tokens), 'none' (no expansion: all kept tokens placed by "
                            "--initialization at the stage's keep rate) (default: farthest)")
    group.add_argument("--merging", default="mean", choices=list(operator_module.MERGINGS),
                       help="what happens to the tokens left out: 'mean' (ToE: averaged into the most similar kept "
                            "token) or 'drop' (an ablation) (default: mean)")
    group.add_argument("--distance-rank", default="similarity", choices=list(operator_module.DISTANCE_RANKS),
                       help="how manhattan/euclidean rank tokens: 'similarity' (nearest = most alike, as cosine) or "
                            "'published' (the published code's raw distance, which inverts that) (default: "
                            "similarity)")
    group.add_argument("--reducer", default="toe", choices=list(operator_module.REDUCERS),
                       help="which tokens the operator after block 0 keeps, on the same schedule and counts: 'toe' "
                            "(Token Expansion: initialization, expansion, merging), 'random' (uniformly random patch "
                            "tokens, PatchDropout's choice), 'topk' (the tokens most similar to the class token, a "
                            "stand-in for attention-score pruning), 'tome' (ToMe's bipartite soft matching merges "
                            "down to the kept count, size-weighted means, no proportional attention) (default: toe)")
    group.add_argument("--sparse-eval", action="store_true",
                       help="also reduce tokens during evaluation (off by default: evaluation uses all tokens)")
    return group


def build_token_select(args: argparse.Namespace) -> TokenSelect:
    """The operator described by the flags (``--reducer``: ToE's TokenSelect or a baseline reducer, a
    subclass of it); a bad schedule, or a switch of ToE's operator with another reducer, is a UserError."""
    reducer = getattr(args, "reducer", "toe")
    if reducer != "toe":
        # (checked here, not in check_training_flags: every trainer and ToE.flops build the operator first)
        switched = toe_switches(args)
        if switched:
            raise UserError(f"{' '.join(switched)} switches a part of ToE's operator, which --reducer {reducer} "
                            "replaces. Leave them out, or use --reducer toe")
    try:
        token_select = operator_module.make_reducer(
            reducer,
            expansion_step=args.expansion_step,
            keep_rate=args.keep_rate,
            initialization_keep_rate=args.initialization_keep_rate,
            expansion_multiple_stage=args.expansion_multiple_stage,
            distance=args.distance,
            initialization=args.initialization,
            expansion=args.expansion,
            merging=args.merging,
            distance_rank=args.distance_rank,
        )
    except ValueError as error:
        raise UserError(f"bad ToE schedule: {error}. Fix --expansion-step/--keep-rate/"
                        "--initialization-keep-rate/--expansion-multiple-stage") from None
    token_select.sparse_inference = bool(args.sparse_eval)
    return token_select


class ParseKwargs(argparse.Action):
    """``--model-kwargs embed_dim=96 depth=6`` -> {"embed_dim": 96, "depth": 6} (Python literals),
    merged into the mapping so far (a recipe file's ``model_kwargs``, an earlier ``--model-kwargs``):
    ``--model-kwargs depth=2`` changes the depth and keeps the recipe's other arguments."""

    takes_mapping = True  # a config file gives this flag a mapping (ToE.common.config.checked_value)

    def __call__(self, parser, namespace, values, option_string=None):
        import ast

        kwargs = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string} expects key=value pairs; got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


# ---------------------------------------------------------------------------------------------
# Flag values: every bad one is one line ``error: ...`` with exit code 2, before any work
# ---------------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``error: <problem>. <fix>``, exit code 2.

    argparse's own error prints the usage block first; under torchrun every process would print
    it. Here rank 0 prints one line (the other processes met the same flags and stay quiet).
    """

    def __init__(self, *args, **kwargs):
        # no prefix matching: "--conf FILE" or "--lr-base" must not quietly become another flag
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # argparse reads "--lr -5e-4" as two options (an exponent defeats its negative-number
        # test), and would say "expected one argument". Joined as "--lr=-5e-4", the value
        # reaches the flag's check, which names it.
        import sys

        argv = list(sys.argv[1:] if args is None else args)
        joined = []
        for token in argv:
            if joined and joined[-1].startswith("--") and "=" not in joined[-1] and token.startswith("-") \
                    and _is_number(token):
                joined[-1] = f"{joined[-1]}={token}"
            else:
                joined.append(token)
        return super().parse_known_args(joined, namespace)

    def error(self, message: str):  # noqa: D102 - argparse's hook
        import os
        import sys

        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"error: {message}. See --help for the flags", file=sys.stderr)
        sys.exit(2)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(kind, test, requirement: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, not {text}")
        return value
    parse.__name__ = f"{kind.__name__} {requirement}"
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and v != float("inf"), "a positive number")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
probability = _number(float, lambda v: 0.0 <= v <= 1.0, "between 0 and 1")
unit_interval_open = _number(float, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
decay_rate = _number(float, lambda v: 0.0 < v < 1.0, "between 0 and 1 (exclusive)")

def duration(text: str) -> float:
    """``--time-limit`` values: seconds, 90m, 4h, HH:MM:SS or D-HH:MM:SS; positive."""
    from ToE.common.preemption import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive duration, not {text}")
    return seconds


def add_classification_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the shared classification loop, with DeiT's names and defaults (timm's recipe
    as DeiT uses it), group by group; every classification trainer adds its own groups beside them.
    A trainer may take a subset of the groups: the classification task reads an absent group as off
    (``ToE.common.classification.GROUP_DEFAULTS``), and args.yaml holds only the flags it has."""
    parser.add_argument("--batch-size", default=64, type=positive_int, help="batch size per process (default: 64)")
    parser.add_argument("--epochs", default=300, type=positive_int, help="training epochs (default: 300)")
    for add in (add_model_args, add_optimizer_args, add_augment_args, add_mixup_args, add_data_args, add_run_args):
        add(parser)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model: timm name and arguments, input, fine-tuning and VPT, dropout, EMA."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="deit_small_patch16_224",
                       help="timm model name (default: deit_small_patch16_224)")
    model.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                       help="extra timm.create_model arguments, e.g. embed_dim=96 depth=6 num_heads=3")
    model.add_argument("--input-size", default=224, type=positive_int, help="image side in pixels (default: 224)")
    model.add_argument("--patch-size", default=None, type=positive_int,
                       help="patch side in pixels (default: the model's)")
    model.add_argument("--finetune", default="", metavar="FILE",
                       help="start from these weights (this project's checkpoint.pth, a timm state dict or DeiT's "
                            ".pth, on disk): a head of another class count is dropped, the position table resampled "
                            "to the new grid (default: from scratch)")
    model.add_argument("--vpt", default=None, choices=["shallow", "deep"],
                       help="Visual Prompt Tuning of the --finetune backbone: it is frozen, prompt tokens (before "
                            "block 0, or at every block with deep) and the head train; ToE reduces only the patch "
                            "tokens (default: off)")
    model.add_argument("--prompt-tokens", type=positive_int, default=10,
                       help="prompt tokens per set with --vpt (default: 10)")
    model.add_argument("--drop", type=unit_interval_open, default=0.0, help="dropout rate (default: 0)")
    model.add_argument("--drop-path", type=unit_interval_open, default=0.1, help="drop path rate (default: 0.1)")
    model.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True,
                       help="keep an exponential moving average of the weights, "
                            "evaluated with all tokens (default: on)")
    model.add_argument("--model-ema-decay", type=decay_rate, default=0.99996, help="EMA decay (default: 0.99996)")
    model.add_argument("--best-of", default="model", choices=["model", "ema"],
                       help="whose evaluation makes best_checkpoint.pth and the best top-1 of the log and summary: "
                            "the online model (published DeiT) or the EMA (published LV-ViT; its recipes set it) "
                            "(default: model)")


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    """The optimizer and the lr schedule (timm's names)."""
    optim = parser.add_argument_group("optimizer and schedule")
    optim.add_argument("--opt", default="adamw", help="timm optimizer name (default: adamw)")
    optim.add_argument("--opt-eps", default=1e-8, type=positive_float, help="optimizer epsilon (default: 1e-8)")
    optim.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum (default: 0.9)")
    optim.add_argument("--weight-decay", type=non_negative_float, default=0.05, help="weight decay (default: 0.05)")
    optim.add_argument("--clip-grad", type=positive_float, default=None, help="clip gradient norm (default: off)")
    optim.add_argument("--sched", default="cosine", help="timm LR scheduler name (default: cosine)")
    optim.add_argument("--lr", type=positive_float, default=5e-4,
                       help="learning rate for a total batch of 512; scaled by total batch / 512 (default: 5e-4)")
    optim.add_argument("--unscale-lr", action="store_true", help="use --lr as given, without batch scaling")
    optim.add_argument("--warmup-lr", type=non_negative_float, default=1e-6,
                       help="warmup start learning rate (default: 1e-6)")
    optim.add_argument("--min-lr", type=non_negative_float, default=1e-5,
                       help="lowest learning rate of the cycle (default: 1e-5)")
    optim.add_argument("--warmup-epochs", type=non_negative_int, default=5, help="linear warmup epochs (default: 5)")


def add_augment_args(parser: argparse.ArgumentParser) -> None:
    """timm's training augmentation and label smoothing (DeiT's recipe)."""
    aug = parser.add_argument_group("augmentation and regularisation")
    aug.add_argument("--color-jitter", type=non_negative_float, default=0.3,
                     help="colour jitter (default: 0.3; off with --aa)")
    aug.add_argument("--aa", default="rand-m9-mstd0.5-inc1",
                     help="timm AutoAugment policy, 'none' for off (default: rand-m9-mstd0.5-inc1)")
    aug.add_argument("--smoothing", type=unit_interval_open, default=0.1, help="label smoothing (default: 0.1)")
    aug.add_argument("--train-interpolation", default="bicubic",
                     help="training resize interpolation (default: bicubic)")
    aug.add_argument("--scale", type=probability, nargs=2, default=[0.08, 1.0],
                     help="random-resized-crop area range (default: 0.08 1.0)")
    aug.add_argument("--hflip", type=probability, default=0.5, help="horizontal flip probability (default: 0.5)")
    aug.add_argument("--crop-pct", type=probability, default=None,
                     help="evaluation centre-crop share (default: timm's 0.875)")
    aug.add_argument("--repeated-aug", action=argparse.BooleanOptionalAction, default=True,
                     help="repeated augmentation sampler, 3 repeats (default: on)")
    aug.add_argument("--reprob", type=probability, default=0.25, help="random erasing probability (default: 0.25)")
    aug.add_argument("--remode", default="pixel", help="random erasing mode (default: pixel)")
    aug.add_argument("--recount", type=positive_int, default=1, help="random erasing count (default: 1)")


def add_mixup_args(parser: argparse.ArgumentParser) -> None:
    """Mixup and CutMix (timm Mixup)."""
    aug = parser.add_argument_group("mixup and cutmix")
    aug.add_argument("--mixup", type=non_negative_float, default=0.8, help="mixup alpha, 0 for off (default: 0.8)")
    aug.add_argument("--cutmix", type=non_negative_float, default=1.0, help="cutmix alpha, 0 for off (default: 1.0)")
    aug.add_argument("--mixup-prob", type=probability, default=1.0,
                     help="probability of mixup or cutmix (default: 1.0)")
    aug.add_argument("--mixup-switch-prob", type=probability, default=0.5,
                     help="probability of cutmix over mixup (default: 0.5)")
    aug.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"],
                     help="mixup mode: batch, pair or elem (default: batch)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The data folders, the input pipeline, evaluation sharding and the token-reduction baseline."""
    run = parser.add_argument_group("data and run")
    run.add_argument("--data-path", default="data/digits",
                     help="folder with train/<class>/ and val/<class>/ (default: data/digits)")
    run.add_argument("--data-backend", default="torch", choices=["torch", "dali"],
                     help="torch: PIL decoding and timm's transforms in DataLoader workers; dali: NVIDIA DALI "
                          "decodes and augments (on the GPU when there is one; optional extra nvidia-dali-cuda120) "
                          "(default: torch)")
    run.add_argument("--dist-eval", action=argparse.BooleanOptionalAction, default=True,
                     help="split evaluation over the processes, each image exactly once (default: on)")
    run.add_argument("--num_workers", "--num-workers", default=8, type=non_negative_int,
                     help="data loading workers per process (default: 8)")
    run.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=True,
                     help="pin host memory (default: on)")
    token = parser.add_argument_group("token reduction")
    token.add_argument("--token-drop", default="toe", choices=["toe", "random"],
                       help="toe: Token Expansion after block 0; random: the baseline, timm's PatchDropout keeping a "
                            "random subset of as many patch tokens before block 0, on the same schedule (default: toe)")
    token.add_argument("--cooldown-epochs", type=non_negative_int, default=0,
                       help="epochs at the minimum lr after the --epochs of the schedule (timm's convention: the run "
                            "trains --epochs + --cooldown-epochs) (default: 0)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the run lifecycle (``ToE.common.lifecycle.Run``), the same in every trainer."""
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", "--output-dir", default="",
                     help="where to write checkpoints and logs (default: nothing written)")
    run.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                     help="auto: the GPUs when torch can use them, the CPU when there is none (the start line says "
                          "why), an error when nvidia-smi lists a GPU this torch build cannot use; cuda: the GPUs or "
                          "an error that says why not (no GPU visible, or torch's and the driver's CUDA versions); "
                          "cpu: the CPU. Nothing falls back to the CPU unasked (default: auto)")
    run.add_argument("--amp-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                     help="mixed precision via torch.amp: auto is bfloat16 on GPUs that compute it natively, "
                          "float16 with loss scaling on older GPUs, float32 (off) on the CPU; bfloat16 also runs on "
                          "the CPU, float16 on GPUs only (default: auto)")
    run.add_argument("--seed", default=0, type=non_negative_int, help="random seed, + rank per process (default: 0)")
    run.add_argument("--eval-amp", action=argparse.BooleanOptionalAction, default=True,
                     help="evaluate under the training's mixed precision (--amp-dtype); --no-eval-amp evaluates in "
                          "float32, as the published LV-ViT and YOLOS do (their defaults) (default: on)")
    run.add_argument("--global-batch", type=positive_int, default=None,
                     help="images per optimizer update over all processes, reached on any number of processes with "
                          "the per-process batch and gradient accumulation; the trainer's lr rule applies to it. The "
                          "published recipe files set their published value (default: the per-process batch x "
                          "processes)")
    run.add_argument("--resume", default="", help="checkpoint to continue from (or to evaluate with --eval)")
    run.add_argument("--auto-resume", action="store_true",
                     help="continue from OUTPUT/checkpoint.pth when it exists, start afresh when it does not "
                          "(re-submitting the same command continues the run)")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in an --output_dir that holds another run: its checkpoints, log and "
                          "TensorBoard events are deleted first (without it such a folder is refused)")
    run.add_argument("--check-only", action="store_true",
                     help="check the flags, the data folders, the output folder and the resume file, then exit "
                          "(the run scripts do this once before starting torchrun)")
    run.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    run.add_argument("--log-interval", default=50, type=positive_int,
                     help="steps between reads of the loss (progress bar, log_steps.txt and TensorBoard: loss, lr, "
                          "gradient norm, images/s; non-finite check, stop check); reading it waits for the GPU, so "
                          "not every step (default: 50)")
    run.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                     help="compile the training forward with torch.compile (timm's name; BACKEND: inductor when "
                          "given alone): one graph per ToE stage, compiled on the stage's first step; the compile "
                          "time is logged apart (compile_seconds), not as training time; checkpoints, the EMA and "
                          "evaluation stay plain (default: off)")
    run.add_argument("--checkpoint-hist", default=0, type=non_negative_int,
                     help="also keep checkpoint-EPOCH.pth of the last N epochs (timm's name; default: 0, only "
                          "checkpoint.pth and best_checkpoint.pth)")
    run.add_argument("--start_epoch", default=0, type=non_negative_int,
                     help="first epoch when not resuming (default: 0)")
    run.add_argument("--stop-after-epochs", default=None, type=positive_int,
                     help="train at most this many epochs in this run, then exit; continue later with --auto-resume "
                          "(for time-limited jobs)")
    run.add_argument("--time-limit", default=None, type=duration,
                     help="stop cleanly with a checkpoint before this wall time (seconds, 90m, 4h, 3:50:00 or "
                          "1-00:00:00), for schedulers without a pre-kill signal; SIGTERM/SIGUSR1 stop the same way")
