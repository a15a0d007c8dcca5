"""Measured training-step speed and activation memory of ToE, per stage, against full tokens.

    python -m bench.speed                          # deit_tiny, deit_small (224 px, batch 32), demo
    python -m bench.speed --models deit_small --steps 7
    python -m bench.speed --quick                  # smoke run: the demo model, 2 steps

For each model and each stage of the schedule (default: the DeiT one, 0.5 0.75 1.0 / 0.25 /
k = 2) one training step is forward + backward + AdamW on random images and labels, with
``token_select.TokenSelect`` attached after block 0 in that stage. The full-token step is the
plain timm model (operator detached). Configurations are interleaved step by step (full, stage
1, stage 2, ..., full, stage 1, ...) so drift in the machine hits all of them alike; the figure
is the median over ``--steps`` timed steps after ``--warmup`` steps.

Reported per stage: median step time, measured speedup over full tokens, the FLOP-ideal
speedup (``token_select.vit_step_flops``: full-step FLOPs / stage-step FLOPs) and their ratio;
the activation memory of a step, i.e. the bytes autograd saves for backward, counted exactly
with ``torch.autograd.graph.saved_tensors_hooks`` (deduplicated by storage, parameters left
out), and on CUDA the peak allocated memory. Per model also the operator's own forward +
backward time on the block-0 output, as a share of a stage-1 step. Results go to
``bench/results/speed.{md,json}`` with the machine and the CPU other processes took meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import token_select
from bench.machine import CpuWatch, describe_machine, wait_until_quiet
from ToE.common.args import add_toe_args
from ToE.flops import analytic_step_flops, create_model, model_shape

__all__ = ["MODELS", "SavedTensorBytes", "saved_activation_bytes", "median_time", "format_markdown",
           "measure_model", "main"]

# name -> (timm name, create_model kwargs, input size, default batch size)
MODELS: Dict[str, tuple] = {
    "deit_tiny": ("deit_tiny_patch16_224", {}, 224, 32),
    "deit_small": ("deit_small_patch16_224", {}, 224, 32),
    # The demo model of run/demo.sh: a 6-block, 96-wide ViT on 32 px digits, 4 px patches (64 tokens).
    "demo": ("vit_tiny_patch16_224", {"embed_dim": 96, "depth": 6, "num_heads": 3, "patch_size": 4,
                                      "num_classes": 10}, 32, 64),
}


class SavedTensorBytes:
    """Context manager counting the bytes autograd saves for backward, each storage once.

    Parameters (and any storage in ``exclude``) are not activations and are left out; views of
    one storage count the whole storage once, because saving any view keeps all of it alive.
    After the block: ``bytes`` (activations), ``parameter_bytes`` (parameters saved as well),
    ``tensors`` (number of saved tensors, duplicates included).
    """

    def __init__(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        self._exclude = {self._key(t) for t in exclude}
        self._seen: Dict[tuple, int] = {}
        self.bytes = 0
        self.parameter_bytes = 0
        self.tensors = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple:
        storage = tensor.untyped_storage()
        return (storage.data_ptr(), str(tensor.device))

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors += 1
        try:
            key = self._key(tensor)
            size = tensor.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            key, size = (id(tensor), "opaque"), tensor.numel() * tensor.element_size()
        if key not in self._seen:
            self._seen[key] = size
            if key in self._exclude:
                self.parameter_bytes += size
            else:
                self.bytes += size
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def saved_activation_bytes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, int]:
    """Bytes saved for backward by one training forward of ``model`` (the backward is run too)."""
    with SavedTensorBytes(exclude=list(model.parameters())) as counter:
        loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return {"saved_bytes": counter.bytes, "saved_parameter_bytes": counter.parameter_bytes,
            "saved_tensors": counter.tensors}


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Dict[str, object]:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": times}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_model(name: str, batch_size: Optional[int], steps: int, warmup: int, device: torch.device,
                  schedule: Dict[str, object], log=print) -> Dict[str, object]:
    """Time and memory of a training step per stage for one model of ``MODELS`` (see module doc)."""
    timm_name, kwargs, input_size, default_batch = MODELS[name]
    batch = batch_size or default_batch
    torch.manual_seed(0)
    model = create_model(timm_name, input_size, **kwargs).to(device).train()
    shape = model_shape(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    images = torch.randn(batch, 3, input_size, input_size, device=device)
    labels = torch.randint(0, shape["num_classes"], (batch,), device=device)
    operator = token_select.TokenSelect(schedule["expansion_step"], schedule["keep_rate"],
                                        schedule["initialization_keep_rate"], schedule["expansion_multiple_stage"],
                                        distance=schedule.get("distance", "cosine"),
                                        initialization=schedule["initialization"])
    num_stages = len(schedule["keep_rate"])
    configs = ["full"] + [f"stage{s}" for s in range(1, num_stages + 1)]

    def configure(config: str) -> None:
        """Full tokens: the plain timm model. Stage s: the operator attached, in stage s."""
        if config == "full":
            token_select.detach(model)
        else:
            token_select.attach(model, operator)
            operator.current_stage = int(config[len("stage"):])

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        _sync(device)

    # Memory first (one untimed step each; it also warms every configuration up).
    memory: Dict[str, Dict[str, object]] = {}
    for config in configs:
        configure(config)
        memory[config] = saved_activation_bytes(model, images, labels)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            train_step()
            memory[config]["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base

    log(f"[bench] {name}: batch {batch}, {input_size} px, {shape['num_patches']} patches; "
        f"timing {configs} interleaved, {warmup} warm-up + {steps} steps each")
    watch = CpuWatch()
    times: Dict[str, List[float]] = {config: [] for config in configs}
    for step in range(warmup + steps):
        last: Dict[str, float] = {}
        for config in configs:
            configure(config)
            start = time.perf_counter()
            train_step()
            last[config] = time.perf_counter() - start
            if step >= warmup:
                times[config].append(last[config])
        log(f"[bench]   step {step + 1}/{warmup + steps}" + (" (warm-up)" if step < warmup else "") + ": " +
            ", ".join(f"{c} {t:.3f}s" for c, t in last.items()))

    # The operator alone: forward + backward on the real block-0 output (B, 1 + P, C), stage 1.
    # A hook catches that output from an ordinary forward, so no timm code is repeated here.
    token_select.detach(model)
    captured = []
    handle = model.blocks[0].register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        model(images)
    handle.remove()
    block0_out = captured[0].detach().requires_grad_(True)
    token_select.attach(model, operator)  # sets the prefix count and the grid from the model
    operator.train()
    operator.current_stage = 1
    upstream = torch.randn_like(operator(block0_out)[0])

    def operator_step() -> None:
        out, _ = operator(block0_out)
        out.backward(upstream)
        block0_out.grad = None
        _sync(device)

    operator_time = median_time(operator_step, repeats=max(5, 2 * steps), warmup=2)
    disturbance = watch.stop()
    token_select.detach(model)

    full_flops = analytic_step_flops(shape)
    full_median = statistics.median(times["full"])
    rows = []
    for config in configs:
        stage = 0 if config == "full" else int(config[len("stage"):])
        operator.current_stage = stage
        kept = shape["num_patches"] if config == "full" else operator.kept_patch_tokens(shape["num_patches"])
        median = statistics.median(times[config])
        ideal = full_flops / analytic_step_flops(shape, kept)
        measured = full_median / median
        rows.append({"config": config, "stage": stage, "kept_patches": kept,
                     "tokens_after_block0": kept + shape["num_prefix_tokens"],
                     "reducing": config != "full" and token_select.is_reducing_stage(stage, operator.keep_rate),
                     "step_median_s": median, "step_times_s": times[config],
                     "measured_speedup": measured, "ideal_speedup": ideal, "ratio": measured / ideal,
                     **memory[config],
                     "memory_vs_full": memory[config]["saved_bytes"] / memory["full"]["saved_bytes"]})
    stage1 = next(r for r in rows if r["config"] == "stage1")
    return {"model": name, "timm_model": timm_name, "model_kwargs": kwargs, "input_size": input_size,
            "batch_size": batch, "num_patches": shape["num_patches"], "steps": steps, "warmup": warmup,
            "device": str(device), "rows": rows, "run": run_speedup(rows),
            "operator": {"shape": list(block0_out.shape), "median_s": operator_time["median_s"],
                         "times_s": operator_time["times_s"],
                         "share_of_stage1_step": operator_time["median_s"] / stage1["step_median_s"]},
            "other_processes": disturbance}


def run_speedup(rows: Sequence[Dict[str, object]]) -> Dict[str, float]:
    """Whole-run speedup of a schedule whose stages are equally long (the default: thirds).

    Measured: full step time / mean stage step time. Ideal: the same with FLOPs, which is what
    ``python -m ToE.flops`` prints for such a schedule.
    """
    full = next(r for r in rows if r["config"] == "full")
    stages = [r for r in rows if r["config"] != "full"]
    measured = full["step_median_s"] / statistics.fmean(r["step_median_s"] for r in stages)
    ideal = 1.0 / statistics.fmean(1.0 / r["ideal_speedup"] for r in stages)
    return {"measured_speedup": measured, "ideal_speedup": ideal, "ratio": measured / ideal}


def format_markdown(results: Dict[str, object]) -> str:
    """The speed/memory tables of a ``bench.speed`` JSON result, one table per model."""
    machine = results["machine"]
    sched = results["schedule"]
    lines = [f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, torch {machine['torch']} "
             f"({machine['torch_threads']} threads), timm {machine.get('timm', '?')}, device {results['device']}. "
             f"Schedule: keep rates {sched['keep_rate']}, seeds {sched['initialization_keep_rate']}, "
             f"{sched['expansion_multiple_stage']} repetition steps, {sched['initialization']} seeds.", ""]
    for model in results["models"]:
        mib = 2 ** 20
        other = model["other_processes"]
        kwargs = " ".join(f"{k}={v}" for k, v in model["model_kwargs"].items())
        lines.append(f"**{model['model']}** ({model['timm_model']}{' ' + kwargs if kwargs else ''}, "
                     f"{model['input_size']} px, {model['num_patches']} patches, batch {model['batch_size']}; "
                     f"median of {model['steps']} steps after {model['warmup']} warm-up; other processes used "
                     f"{other['other_cpu_cores']:.2f} cores meanwhile; load average {other['load_average'][0]}, "
                     f"the bench's own 2 threads included)")
        lines.append("")
        cuda = any("cuda_peak_bytes" in r for r in model["rows"])
        header = ("| config | tokens after block 0 | step time (s) | measured speedup | FLOP-ideal speedup | "
                  "ratio | saved for backward (MiB) | memory vs full |")
        rule = "|---|---|---|---|---|---|---|---|"
        if cuda:
            header += " CUDA peak (MiB) |"
            rule += "---|"
        lines += [header, rule]
        for row in model["rows"]:
            label = "full tokens" if row["config"] == "full" else (
                f"stage {row['stage']}" + ("" if row["reducing"] else " (ToE off)"))
            line = (f"| {label} | {row['tokens_after_block0']} | {row['step_median_s']:.3f} | "
                    f"{row['measured_speedup']:.3f}x | {row['ideal_speedup']:.3f}x | {row['ratio']:.3f} | "
                    f"{row['saved_bytes'] / mib:.0f} | {row['memory_vs_full']:.3f} |")
            if cuda:
                line += f" {row.get('cuda_peak_bytes', 0) / mib:.0f} |"
            lines.append(line)
        op = model["operator"]
        run = model.get("run") or run_speedup(model["rows"])
        lines += ["", f"Whole run with stages of equal length (thirds): measured {run['measured_speedup']:.3f}x, "
                      f"FLOP-ideal {run['ideal_speedup']:.3f}x, ratio {run['ratio']:.3f}."]
        lines += ["", f"Operator alone (forward + backward, stage 1, input {tuple(op['shape'])}): "
                      f"{op['median_s'] * 1e3:.1f} ms = {op['share_of_stage1_step'] * 100:.2f} % "
                      "of a stage-1 step.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small", "demo"], choices=sorted(MODELS),
                        help="models to measure")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size for every model (default: 32 at 224 px, 64 for the demo)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    # The trainers' ToE flags (one definition in ToE/common). Every stage is measured, so
    # --expansion-step plays no part here; --sparse-eval neither (training steps only).
    add_toe_args(parser)
    parser.add_argument("--no-wait", action="store_true",
                        help="measure at once instead of waiting for other processes to go quiet")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite speed.md from the speed.json already in --out")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the demo model, batch 16, 1 warm-up + 2 steps, "
                             "results in --out with a _quick suffix")
    parser.add_argument("--out", default=None,
                        help="folder for speed.md and speed.json "
                             "(default: bench/results; with --quick: a temporary folder)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.steps, args.warmup = ["demo"], args.batch_size or 16, 2, 1
    if args.render:
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        with open(os.path.join(out, "speed.json")) as handle:
            results = json.load(handle)
        with open(os.path.join(out, "speed.md"), "w") as handle:
            handle.write(format_markdown(results) + "\n")
        return results
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    schedule = {"expansion_step": list(range(len(args.keep_rate))), "keep_rate": args.keep_rate,
                "initialization_keep_rate": args.initialization_keep_rate,
                "expansion_multiple_stage": args.expansion_multiple_stage, "initialization": args.initialization,
                "distance": args.distance}
    token_select.validate_schedule(schedule["expansion_step"], args.keep_rate, args.initialization_keep_rate,
                                   args.expansion_multiple_stage)
    results = {"machine": describe_machine(), "device": str(device), "schedule": schedule,
               "command": "python -m bench.speed " + " ".join(argv if argv is not None else os.sys.argv[1:]),
               "models": []}
    for name in args.models:
        if not args.no_wait and device.type == "cpu":
            results.setdefault("quiet_probes", {})[name] = wait_until_quiet()
        results["models"].append(measure_model(name, args.batch_size, args.steps, args.warmup, device, schedule))
    args.out = args.out or (os.path.join(tempfile.gettempdir(), "toe_bench") if args.quick
                            else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "speed_quick" if args.quick else "speed")
    with open(stem + ".json", "w") as handle:
        json.dump(results, handle, indent=2)
    table = format_markdown(results)
    with open(stem + ".md", "w") as handle:
        handle.write(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
