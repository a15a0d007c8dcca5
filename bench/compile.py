"""Compiled against eager training steps, per ToE stage (``--torchcompile``, issue 32).

    python -m bench.compile                          # demo and deit_small on this machine's device
    python -m bench.compile --models demo --steps 9 --backend inductor
    python -m bench.compile --render                 # rewrite compile.md from compile.json

For each model and each configuration (full tokens; each ToE stage of the DeiT schedule) one
training step (forward, loss, backward, AdamW) runs eagerly and through ``torch.compile`` (the
trainers' ``--torchcompile``: the whole model, ``dynamic=False``, one graph per stage). The operator
stays attached throughout, as in the trainers (full tokens: stage 0, the sequence passed on as it is;
stage 3 keeps every token too): dynamo does not guard on hooks added or removed after compiling. Every
configuration and mode is timed once per round, the order rotated each round; a configuration's
compiled/eager ratio is the median over rounds of the paired ratio (same round). The A/A control
is a second eager step of full tokens in every round: its paired ratios to the first are the noise
of the measurement, and a compiled/eager ratio within that band cannot be told from 1. The first
compiled call of each configuration (the compile) is timed apart and not counted as a step.
Results go to ``bench/results/compile.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, Optional, Sequence

import torch
import torch._dynamo
import torch.nn.functional as F

import token_select
from bench.common import describe_machine, git_commit, load_average, paired_ratios, rotated
from bench.speed import CUDA_BATCH, RESULTS, model_spec
from ToE.flops import create_model

SCHEDULE = {"keep_rate": [0.5, 0.75, 1.0], "initialization_keep_rate": 0.25, "expansion_multiple_stage": 2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, batch: Optional[int], steps: int, warmup: int, device: torch.device, backend: str,
            log=print) -> Dict[str, object]:
    timm_name, kwargs, input_size, default_batch = model_spec(name)
    batch = batch or (CUDA_BATCH if device.type == "cuda" and input_size >= 224 else default_batch)
    torch.manual_seed(0)
    model = create_model(timm_name, input_size, **kwargs).to(device).train()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    images = torch.randn(batch, 3, input_size, input_size, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    keep = SCHEDULE["keep_rate"]
    operator = token_select.TokenSelect(list(range(len(keep))), keep, SCHEDULE["initialization_keep_rate"],
                                        SCHEDULE["expansion_multiple_stage"])
    token_select.attach(model, operator)
    num_patches = model.patch_embed.num_patches
    configs = ["full"] + [f"stage{s}" for s in range(1, len(keep) + 1)]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(configs))

    def configure(config: str) -> None:
        # The operator stays attached, as in the trainers: dynamo does not guard on forward hooks added or
        # removed after compiling (torch's default), so detaching it for full tokens would silently reuse
        # a graph with ToE. Full tokens is stage 0, where the operator passes the sequence on unchanged.
        operator.current_stage = 0 if config == "full" else int(config[len("stage"):])
        operator.prepare(num_patches, device)  # as the trainers do: one graph per stage

    def step(forward) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(images), labels).backward()
        optimizer.step()
        _sync(device)

    compile_seconds: Dict[str, float] = {}
    for config in configs:  # the compiles, timed apart
        configure(config)
        start = time.perf_counter()
        step(compiled)
        compile_seconds[config] = time.perf_counter() - start
        log(f"[compile] {name} {config}: first compiled step {compile_seconds[config]:.1f} s")
    timed = [f"{config}/{mode}" for config in configs for mode in ("eager", "compiled")] + ["full/eager#2"]
    rounds = []
    for index in range(warmup + steps):
        seconds: Dict[str, float] = {}
        for label in rotated(timed, index):
            config, mode = label.split("/")
            configure(config)
            start = time.perf_counter()
            step(compiled if mode == "compiled" else model)
            seconds[label] = time.perf_counter() - start
        rounds.append({"warmup": index < warmup, "seconds": seconds})
        log(f"[compile] {name} round {index + 1}/{warmup + steps}: "
            + ", ".join(f"{k} {v:.3f}s" for k, v in seconds.items()))
    return summarise({"model": name, "timm_model": timm_name, "input_size": input_size, "batch_size": batch,
                      "num_patches": num_patches, "backend": backend, "device": str(device), "steps": steps,
                      "warmup": warmup, "configs": configs, "compile_seconds": compile_seconds, "rounds": rounds})


def summarise(model: Dict[str, object]) -> Dict[str, object]:
    times = {label: [r["seconds"][label] for r in model["rounds"] if not r["warmup"]]
             for label in model["rounds"][0]["seconds"]}
    control = paired_ratios(times["full/eager"], times["full/eager#2"])
    model["aa_control"] = {"ratios": control, "median": statistics.median(control),
                           "max_deviation": max(abs(1.0 - r) for r in control)}
    model["rows"] = []
    for config in model["configs"]:
        eager, compiled = times[f"{config}/eager"], times[f"{config}/compiled"]
        ratios = paired_ratios(eager, compiled)  # eager step / compiled step: > 1 when compile is faster
        model["rows"].append({"config": config, "eager_median_s": statistics.median(eager),
                              "compiled_median_s": statistics.median(compiled),
                              "speedup": statistics.median(ratios), "ratios": ratios})
    return model


def format_markdown(results: Dict[str, object]) -> str:
    machine = results["machine"]
    lines = [f"Command: `{results['command']}` (commit {results.get('commit') or 'not recorded'}). Machine: "
             f"{machine['cpu_model']}, {machine['cpu_count']} cores, torch {machine['torch']} "
             f"({machine['torch_threads']} threads), device {results['device']}. Load average (1, 5, 15 min) "
             f"{results.get('load_before')} before and {results.get('load_after')} after.", ""]
    for model in results["models"]:
        aa = model["aa_control"]
        lines += [f"**{model['model']}** ({model['timm_model']}, {model['input_size']} px, {model['num_patches']} "
                  f"patches, batch {model['batch_size']}, backend {model['backend']}; {model['steps']} timed rounds "
                  f"after {model['warmup']} warm-up, the order rotated each round)", "",
                  "| config | eager step (s) | compiled step (s) | compiled speedup (paired median) | first compiled "
                  "step (s) |", "|---|---|---|---|---|"]
        for row in model["rows"]:
            label = "full tokens" if row["config"] == "full" else f"ToE {row['config'].replace('stage', 'stage ')}"
            lines.append(f"| {label} | {row['eager_median_s']:.3f} | {row['compiled_median_s']:.3f} | "
                         f"{row['speedup']:.3f}x | {model['compile_seconds'][row['config']]:.1f} |")
        verdicts = "; ".join(f"{row['config']} " + ("within noise" if abs(1 - row["speedup"]) <= aa["max_deviation"]
                                                     else "beyond noise") for row in model["rows"])
        lines += ["", f"A/A control (a second eager full-token step each round): median {aa['median']:.3f}x, "
                      f"largest |1 - ratio| {aa['max_deviation']:.3f}: {verdicts}.", ""]
    lines += [f"{note}\n" for note in results.get("notes", [])]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo", "deit_small"])
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"(default: the demo's 64; 224-px models 32 on the CPU, {CUDA_BATCH} on CUDA)")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--render", action="store_true", help="measure nothing: rewrite compile.md from compile.json")
    args = parser.parse_args(argv)
    stem = os.path.join(args.out, "compile")
    if args.render:
        with open(stem + ".json") as handle:
            results = json.load(handle)
        results["models"] = [summarise(model) for model in results["models"]]
    else:
        torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        results = {"machine": describe_machine(), "commit": git_commit(), "device": str(device),
                   "command": " ".join(["python -m bench.compile", *(sys.argv[1:] if argv is None else argv)]),
                   "load_before": load_average()}
        results["models"] = [measure(name, args.batch_size, args.steps, args.warmup, device, args.backend)
                             for name in args.models]
        results["load_after"] = load_average()
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as handle:
        json.dump(results, handle, indent=1)
    table = format_markdown(results)
    with open(stem + ".md", "w") as handle:
        handle.write(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
