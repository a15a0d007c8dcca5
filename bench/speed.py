"""Measured training-step speed and activation memory of ToE, per stage, against full tokens.

    python -m bench.speed --steps 7                # deit_tiny, deit_small (224 px, batch 32; 256 on CUDA), demo (64)
    python -m bench.speed --models demo --steps 25
    python -m bench.speed --render                 # measure nothing: rewrite speed.md from speed.json
    python -m bench.speed --quick                  # smoke run: the demo model, batch 16, 2 steps

For each model and each stage of the schedule (default: the DeiT one, 0.5 0.75 1.0 / 0.25 /
k = 2) one training step is forward + backward + AdamW on random images and labels, with
``token_select.TokenSelect`` attached after block 0 in that stage. The full-token step is the
plain timm model (operator detached).

Timing runs in rounds: a round times one step of every configuration, and round r starts at
configuration r mod n (full, stage 1, stage 2, ... rotated), so neither drift of the machine
nor the place in a round favours one configuration. Every step's time is kept in the JSON. A
stage's measured speedup is the median over rounds of the paired ratio (full-token step /
stage step, same round); the FLOP-ideal speedup is ``token_select.vit_step_flops``'s.

The last stage (keep rate 1.0, ToE off) does the same work as full tokens with the operator
attached: it is an A/A control, and its paired ratios to full tokens are the noise of the
measurement. Under every table: their median and the largest |1 - ratio| of one round; a
stage whose measured/ideal ratio lies closer to 1 than that cannot be told from noise.

Also per stage: the activation memory of a step, i.e. the bytes autograd saves for backward,
counted exactly with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once,
parameters left out), and the step's peak memory above what was allocated before it: on CUDA
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on the CPU (Linux) the
process's peak resident memory (VmHWM after resetting it through /proc/self/clear_refs), with
glibc told to map every allocation from 64 KiB up on its own (``mallopt``) and its free heap pages
handed back first (``malloc_trim``), so that freed tensors leave the resident set and the peak is
the step's own. Each configuration is measured after a
warm-up step of its own: the first training step also creates AdamW's state (2 x the parameters)
and the configuration's first-call work, which would otherwise be charged to whichever
configuration comes first (it used to be full tokens, which flattered ToE's memory ratio). Per
model the operator's own forward + backward time on the real block-0 output, as a share of a
stage-1 step. Results go to ``bench/results/speed.{md,json}``.

Precision as a GPU user trains: ``--amp-dtype`` (the trainers' flag; auto = bfloat16 on CUDA,
float32 on the CPU) runs forward and loss under ``torch.autocast`` (float16 with loss scaling),
and TF32 follows the trainers' one policy (``ToE.common.distributed.set_float32_policy``: off, float32 is
IEEE float32). Under autocast the saved-for-backward count
includes the low-precision copies of the weights that autocast saves.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import token_select
from bench.common import demo_config, describe_machine, git_commit, load_average, paired_ratios, recipe, rotated
from ToE.common.args import add_toe_args
from ToE.common.errors import UserError
from ToE.common.distributed import AMP_DTYPES, TF32, resolve_amp_dtype, set_float32_policy
from ToE.common.vpt import add_prompts, freeze_backbone
from ToE.flops import analytic_step_flops, create_model, model_shape

__all__ = ["MODELS", "model_spec", "SavedTensorBytes", "saved_activation_bytes", "median_time", "paired_ratios",
           "summarise", "format_markdown", "measure_model", "measure_memory", "step_peak_bytes",
           "amp_dtype_of", "main"]

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CUDA_BATCH = 256  # the default batch of 224-px models on CUDA (deit_small: not launch-bound)

DEMO = demo_config("deit")
# name -> (timm name, create_model kwargs, input size, default batch size); "demo" is the DeiT demo
# recipe's model (its file: model_spec)
MODELS: Dict[str, tuple] = {
    "deit_tiny": ("deit_tiny_patch16_224", {}, 224, 32),
    "deit_small": ("deit_small_patch16_224", {}, 224, 32),
    # LV-ViT-S (ToE/lvvit; conv stem, aux head on every token, MixToken): the FLOP ideal counts the
    # transformer and the stem's patch projection, not the stem's three 112 x 112 convolutions.
    "lvvit_s": ("lvvit_s", {}, 224, 32),
}


def model_spec(name: str, recipe_file: str = DEMO) -> tuple:
    """(timm name, create_model kwargs, input size, batch size) of ``name``: one of ``MODELS``, or
    "demo", the model and batch size of the recipe file (default: the DeiT demo; digits: 10 classes)."""
    if name != "demo":
        return MODELS[name]
    values = recipe("deit", recipe_file)
    kwargs = dict(values.get("model_kwargs") or {})
    if values.get("patch_size"):
        kwargs["patch_size"] = int(values["patch_size"])
    kwargs["num_classes"] = 10
    return values["model"], kwargs, int(values["input_size"]), int(values["batch_size"])


def _step_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a training forward; a tuple output (LV-ViT: class logits (B, C), token logits
    (B, N, C), box) adds the mean token cross-entropy against the image label, as token labelling does."""
    if not isinstance(outputs, tuple):
        return nn.functional.cross_entropy(outputs, labels)
    tokens = outputs[1]
    return nn.functional.cross_entropy(outputs[0], labels) + nn.functional.cross_entropy(
        tokens.flatten(0, 1), labels.repeat_interleave(tokens.shape[1]))


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


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return nullcontext() if amp_dtype is None else torch.autocast(device_type=device.type, dtype=amp_dtype)


def amp_dtype_of(name: str, device: torch.device) -> Optional[torch.dtype]:
    """``--amp-dtype`` on ``device``: auto is bfloat16 on CUDA (what a GPU user trains with on a
    current GPU) and float32 (no autocast) on the CPU; the other values as the trainers take them."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return resolve_amp_dtype(name, device)


def saved_activation_bytes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           amp_dtype: Optional[torch.dtype] = None) -> Dict[str, int]:
    """Bytes saved for backward by one training forward of ``model`` (the backward is run too)."""
    with SavedTensorBytes(exclude=list(model.parameters())) as counter, _autocast(images.device, amp_dtype):
        loss = _step_loss(model(images), labels)
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(parameter: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(parameter, value))
    except (OSError, AttributeError):
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))
    except (OSError, StopIteration, ValueError):
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets the peak resident set size (VmHWM) to the current one
        return True
    except OSError:
        return False


class CpuPeakMemory:
    """Peak resident memory of this process while ``with`` block runs (Linux, glibc): on entry glibc
    maps every allocation from 64 KiB up on its own (so a freed tensor leaves the resident set); on
    exit the mmap threshold is left at 32 MiB, where glibc's own dynamic threshold settles for
    tensors this size (setting it once turns the dynamic adjustment off). ``available`` is False
    where /proc or mallopt is missing."""

    def __init__(self) -> None:
        self.available = (_proc_status_bytes("VmHWM") is not None and _mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
                          and _mallopt(_M_TRIM_THRESHOLD, 128 * 1024))

    def __enter__(self) -> "CpuPeakMemory":
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            _mallopt(_M_MMAP_THRESHOLD, 32 * 2 ** 20)
            _mallopt(_M_TRIM_THRESHOLD, 64 * 2 ** 20)

    def peak_of(self, step: Callable[[], None]) -> Optional[int]:
        """Peak resident bytes above the resident bytes before ``step()``, while it ran."""
        # freed heap memory left resident by earlier work would be reused without growing the
        # resident set: hand it back to the kernel first (malloc_trim releases free pages of every arena)
        _malloc_trim()
        if not self.available or not _reset_peak_rss():
            step()
            return None
        base = _proc_status_bytes("VmRSS")
        step()
        peak = _proc_status_bytes("VmHWM")
        return None if base is None or peak is None else peak - base


def step_peak_bytes(step: Callable[[], None], device: torch.device, cpu: Optional[CpuPeakMemory] = None
                    ) -> Optional[int]:
    """Peak memory of ``step()`` above what was allocated when it started: on CUDA from
    ``max_memory_allocated`` after a reset; on the CPU ``cpu.peak_of`` (None without it)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        return torch.cuda.max_memory_allocated(device) - base
    if cpu is None:
        step()
        return None
    return cpu.peak_of(step)


def measure_memory(configs: Sequence[str], configure: Callable[[str], None], train_step: Callable[[], None],
                   count_saved: Callable[[], Dict[str, int]], device: torch.device,
                   warmup: bool = True, cpu: Optional[CpuPeakMemory] = None) -> Dict[str, Dict[str, object]]:
    """Per configuration: the bytes saved for backward (``count_saved()``) and the peak memory of one
    training step (``step_peak_bytes``), each measured after a warm-up step of that configuration
    (``warmup``; False is the old order, in which the first configuration measured also pays for
    creating the optimizer state). ``cpu``: a meter already entered (``main`` measures every model's
    memory in one, before any timing); by default one for this call."""
    memory: Dict[str, Dict[str, object]] = {}
    own = cpu is None and device.type == "cpu"
    with CpuPeakMemory() if own else nullcontext(cpu) as cpu:
        for config in configs:
            configure(config)
            if warmup:
                train_step()
            memory[config] = dict(count_saved())
            peak = step_peak_bytes(train_step, device, cpu)
            if peak is not None:
                memory[config]["step_peak_bytes"] = peak
    return memory


def measure_model(name: str, batch_size: Optional[int], steps: int, warmup: int, device: torch.device,
                  schedule: Dict[str, object], log=print, recipe_file: str = DEMO,
                  amp_dtype: Optional[torch.dtype] = None, configs: Optional[List[str]] = None,
                  memory_only: bool = False, memory: Optional[Dict[str, Dict[str, object]]] = None,
                  cpu_meter: Optional[CpuPeakMemory] = None) -> Dict[str, object]:
    """Step times (every round), memory and operator time of one model (``model_spec``; see module doc)."""
    timm_name, kwargs, input_size, default_batch = model_spec(name, recipe_file)
    if timm_name.startswith("lvvit"):
        import ToE.lvvit  # noqa: F401  (registers the LV-ViT models in timm; only when measured)
    # on a GPU, 224-px models at a batch that keeps it busy (batch 32 is launch-bound on an H100 and would
    # understate every speedup); the CPU keeps the small default
    batch = batch_size or (CUDA_BATCH if device.type == "cuda" and input_size >= 224 else default_batch)
    torch.manual_seed(0)
    model = create_model(timm_name, input_size, **kwargs).to(device).train()
    shape = model_shape(model)
    prompts = 0
    if schedule.get("vpt"):  # Visual Prompt Tuning: prompts (prefix tokens for the operator) and head train
        prompts = int(schedule["prompt_tokens"])
        add_prompts(model, prompts, deep=schedule["vpt"] == "deep")
        freeze_backbone(model)
        model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.05)
    images = torch.randn(batch, 3, input_size, input_size, device=device)
    labels = torch.randint(0, shape["num_classes"], (batch,), device=device)
    operator = token_select.TokenSelect(schedule["expansion_step"], schedule["keep_rate"],
                                        schedule["initialization_keep_rate"], schedule["expansion_multiple_stage"],
                                        distance=schedule.get("distance", "cosine"),
                                        initialization=schedule["initialization"])
    configs = configs or ["full"] + [f"stage{s}" for s in range(1, len(schedule["keep_rate"]) + 1)]
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def configure(config: str) -> None:
        """Full tokens: the plain timm model. Stage s: the operator attached, in stage s."""
        if config == "full":
            token_select.detach(model)
        else:
            token_select.attach(model, operator)
            operator.num_prefix_tokens += prompts
            operator.current_stage = int(config[len("stage"):])

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp_dtype):
            loss = _step_loss(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _sync(device)

    # Memory first: each configuration after a warm-up step of its own (measure_memory).
    if memory is None:  # (``memory``: measured before, by a memory_only call)
        memory = measure_memory(configs, configure, train_step,
                                lambda: saved_activation_bytes(model, images, labels, amp_dtype), device,
                                cpu=cpu_meter)
    if memory_only:
        return {"model": name, "configs": configs, "memory": memory,
                "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}

    log(f"[bench] {name}: batch {batch}, {input_size} px, {shape['num_patches']} patches; "
        f"{warmup} warm-up + {steps} timed rounds of {configs}, the order rotated each round")
    rounds = []
    for index in range(warmup + steps):
        seconds: Dict[str, float] = {}
        for config in rotated(configs, index):
            configure(config)
            start = time.perf_counter()
            train_step()
            seconds[config] = time.perf_counter() - start
        rounds.append({"warmup": index < warmup, "order": list(seconds), "seconds": seconds})
        log(f"[bench]   round {index + 1}/{warmup + steps}" + (" (warm-up)" if index < warmup else "") + ": " +
            ", ".join(f"{c} {t:.3f}s" for c, t in seconds.items()))

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
    operator.num_prefix_tokens += prompts
    operator.train()
    operator.current_stage = 1
    with _autocast(device, amp_dtype):
        upstream = torch.randn_like(operator(block0_out)[0])

    def operator_step() -> None:
        with _autocast(device, amp_dtype):
            out, _ = operator(block0_out)
        out.backward(upstream)
        block0_out.grad = None
        _sync(device)

    operator_time = median_time(operator_step, repeats=max(5, 2 * steps), warmup=2)
    token_select.detach(model)

    full_flops = analytic_step_flops(shape)
    rows = []
    for config in configs:
        stage = 0 if config == "full" else int(config[len("stage"):])
        operator.current_stage = stage
        kept = shape["num_patches"] if config == "full" else operator.kept_patch_tokens(shape["num_patches"])
        rows.append({"config": config, "stage": stage, "kept_patches": kept,
                     "tokens_after_block0": kept + shape["num_prefix_tokens"] + prompts,
                     "reducing": config != "full" and token_select.is_reducing_stage(stage, operator.keep_rate),
                     "step_times_s": [r["seconds"][config] for r in rounds if not r["warmup"]],
                     "ideal_speedup": full_flops / analytic_step_flops(shape, kept), **memory[config]})
    return summarise({"model": name, "timm_model": timm_name, "model_kwargs": kwargs, "input_size": input_size,
                      "batch_size": batch, "num_patches": shape["num_patches"], "steps": steps, "warmup": warmup,
                      "device": str(device), "rounds": rounds, "rows": rows,
                      "operator": {"shape": list(block0_out.shape), "median_s": operator_time["median_s"],
                                   "times_s": operator_time["times_s"]}})


def summarise(model: Dict[str, object]) -> Dict[str, object]:
    """Fill in the figures derived from a model's step times (``measure_model`` and ``--render``).

    Per row: median step time, measured speedup (median of paired per-round ratios), its ratio
    to the FLOP ideal, memory against full tokens. Per model: the whole run with stages of equal
    length, the A/A control (the last ToE-off stage against full tokens) and the operator's share.
    """
    rows = model["rows"]
    full = next(r for r in rows if r["config"] == "full")
    for row in rows:
        row["step_median_s"] = statistics.median(row["step_times_s"])
        row["measured_speedup"] = statistics.median(paired_ratios(full["step_times_s"], row["step_times_s"]))
        row["ratio"] = row["measured_speedup"] / row["ideal_speedup"]
        row["memory_vs_full"] = row["saved_bytes"] / full["saved_bytes"]
        if row.get("step_peak_bytes") and full.get("step_peak_bytes"):
            row["peak_vs_full"] = row["step_peak_bytes"] / full["step_peak_bytes"]
    stages = [r for r in rows if r["config"] != "full"]
    # Whole run, stages of equal length: per round, full step / mean stage step; median over rounds.
    mean_stage = [statistics.fmean(times) for times in zip(*(r["step_times_s"] for r in stages))]
    measured = statistics.median(paired_ratios(full["step_times_s"], mean_stage))
    ideal = 1.0 / statistics.fmean(1.0 / r["ideal_speedup"] for r in stages)
    model["run"] = {"measured_speedup": measured, "ideal_speedup": ideal, "ratio": measured / ideal}
    control = [r for r in stages if not r["reducing"]][-1]
    ratios = paired_ratios(full["step_times_s"], control["step_times_s"])
    model["aa_control"] = {"config": control["config"], "ratios": ratios, "median": statistics.median(ratios),
                           "max_deviation": max(abs(1.0 - r) for r in ratios)}
    stage1 = next(r for r in rows if r["config"] == "stage1")
    model["operator"]["share_of_stage1_step"] = model["operator"]["median_s"] / stage1["step_median_s"]
    return model


def format_markdown(results: Dict[str, object]) -> str:
    """The speed/memory tables of a ``bench.speed`` JSON result, one table per model."""
    machine = results["machine"]
    sched = results["schedule"]
    lines = [f"Command: `{results['command']}` (commit {results.get('commit') or 'not recorded'}). "
             f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, torch {machine['torch']} "
             f"({machine['torch_threads']} threads), timm {machine.get('timm', '?')}, device {results['device']}. "
             f"Schedule: keep rates {sched['keep_rate']}, seeds {sched['initialization_keep_rate']}, "
             f"{sched['expansion_multiple_stage']} repetition steps, {sched['initialization']} seeds. "
             + (f"Visual Prompt Tuning, {sched['vpt']}, {sched['prompt_tokens']} prompt tokens (the backbone frozen; "
                "the FLOP ideal counts a step that trains every weight). " if sched.get("vpt") else "")
             +
             f"Precision: {results.get('amp_dtype', 'float32 (not recorded)')}"
             + (", TF32 on" if results.get("tf32") else "") + ". "
             + (results["memory_note"] if results.get("memory_note") else "")
             + (f" Load average (1, 5, 15 min) {results['load_before']} before and {results.get('load_after')} after: "
                "other jobs may have shared the machine." if results.get("load_before") else ""), ""]
    mib = 2 ** 20
    for model in results["models"]:
        kwargs = " ".join(f"{k}={v}" for k, v in model["model_kwargs"].items())
        order = ("the order rotated each round" if "rounds" in model
                 else "the order fixed (" + ", ".join(r["config"] for r in model["rows"]) + ") in every round")
        lines += [f"**{model['model']}** ({model['timm_model']}{' ' + kwargs if kwargs else ''}, "
                  f"{model['input_size']} px, {model['num_patches']} patches, batch {model['batch_size']}; "
                  f"{model['steps']} timed rounds after {model['warmup']} warm-up, a round = one step of each "
                  f"configuration, {order}; speedups are medians of per-round paired ratios)", ""]
        old_cuda = any("cuda_peak_bytes" in r for r in model["rows"])  # results from before step_peak_bytes
        peak = any("step_peak_bytes" in r for r in model["rows"])
        lines += ["| config | tokens after block 0 | median step (s) | measured speedup | FLOP-ideal speedup | "
                  "ratio | saved for backward (MiB) | memory vs full |" + (" CUDA peak (MiB) |" if old_cuda else "")
                  + (" step peak (MiB) | peak vs full |" if peak else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if old_cuda else "") + ("---|---|" if peak else "")]
        for row in model["rows"]:
            label = "full tokens" if row["config"] == "full" else (
                f"stage {row['stage']}" + ("" if row["reducing"] else " (ToE off)"))
            line = (f"| {label} | {row['tokens_after_block0']} | {row['step_median_s']:.3f} | "
                    f"{row['measured_speedup']:.3f}x | {row['ideal_speedup']:.3f}x | {row['ratio']:.3f} | "
                    f"{row['saved_bytes'] / mib:.0f} | {row['memory_vs_full']:.3f} |")
            line += f" {row.get('cuda_peak_bytes', 0) / mib:.0f} |" if old_cuda else ""
            if peak:
                line += (f" {row['step_peak_bytes'] / mib:.0f} | {row['peak_vs_full']:.3f} |"
                         if row.get("peak_vs_full") is not None else " n/a | n/a |")
            lines.append(line)
        aa, run, op = model["aa_control"], model["run"], model["operator"]
        control = next(r for r in model["rows"] if r["config"] == aa["config"])
        verdicts = "; ".join(f"stage {r['stage']} {r['ratio']:.3f}, "
                             + ("within noise" if abs(1.0 - r["ratio"]) <= aa["max_deviation"] else "beyond noise")
                             for r in model["rows"] if r["reducing"])
        lines += ["", f"A/A control: stage {control['stage']} (ToE off: the same work as full tokens) against full "
                      f"tokens, paired by round: median {aa['median']:.3f}x, rounds {min(aa['ratios']):.3f}x to "
                      f"{max(aa['ratios']):.3f}x, largest |1 - ratio| {aa['max_deviation']:.3f}. Measured/ideal "
                      f"ratios within 1 ± {aa['max_deviation']:.3f} are noise: {verdicts}.",
                  "", f"Whole run with stages of equal length (thirds): measured {run['measured_speedup']:.3f}x, "
                      f"FLOP-ideal {run['ideal_speedup']:.3f}x, ratio {run['ratio']:.3f}.",
                  "", f"Operator alone (forward + backward, stage 1, input {tuple(op['shape'])}, median of "
                      f"{len(op['times_s'])}): {op['median_s'] * 1e3:.1f} ms = "
                      f"{op['share_of_stage1_step'] * 100:.2f} % of a stage-1 step.", ""]
    lines += [f"{note}\n" for note in results.get("notes", [])]
    return "\n".join(lines)


MEMORY_NOTE = {
    "cpu": "Memory: each configuration measured after a warm-up step of its own; step peak = the process's peak "
           "resident memory during one step above its resident memory before it (Linux VmHWM, glibc mapping "
           "allocations from 64 KiB on their own, free heap pages released first).",
    "cuda": "Memory: each configuration measured after a warm-up step of its own; step peak = "
            "torch.cuda.max_memory_allocated during one step above memory_allocated before it.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small", "demo"],
                        choices=sorted([*MODELS, "demo"]), help="models to measure (demo: the model of --config)")
    parser.add_argument("--config", default=DEMO, help="the recipe file of the demo model (default: the DeiT demo's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"batch size for every model (default: 32 at 224 px on the CPU, {CUDA_BATCH} on CUDA; "
                             "64 for the demo)")
    parser.add_argument("--steps", type=int, default=7, help="timed rounds (one step of each configuration each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--amp-dtype", default="auto", choices=["auto", *AMP_DTYPES],
                        help="autocast precision, the trainers' flag (auto: bfloat16 on CUDA, float32 on the CPU; "
                             "float16 with loss scaling, CUDA only); TF32 as the trainers (off)")
    # The trainers' ToE flags (one definition in ToE/common). Every stage is measured, so
    # --expansion-step plays no part here; --sparse-eval neither (training steps only).
    add_toe_args(parser)
    parser.add_argument("--vpt", default=None, choices=["shallow", "deep"],
                        help="measure Visual Prompt Tuning: prompt tokens, frozen backbone (default: off)")
    parser.add_argument("--prompt-tokens", type=int, default=10, help="prompt tokens per set with --vpt (default: 10)")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: recompute the figures and speed.md from the step times in "
                             "--out/speed.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the demo model, batch 16, 1 warm-up + 2 timed rounds, "
                             "written as speed_quick.{md,json}")
    parser.add_argument("--out", default=None,
                        help="folder for speed.md and speed.json "
                             "(default: bench/results; with --quick: a temporary folder)")
    return parser


def _write(results: Dict[str, object], stem: str) -> str:
    with open(stem + ".json", "w") as handle:
        json.dump(results, handle, indent=2)
    table = format_markdown(results)
    with open(stem + ".md", "w") as handle:
        handle.write(table + "\n")
    return table


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.render:
        with open(os.path.join(args.out or RESULTS, "speed.json")) as handle:
            results = json.load(handle)
        results["models"] = [summarise(model) for model in results["models"]]
        print(_write(results, os.path.join(args.out or RESULTS, "speed")))
        return results
    if args.quick:
        args.models, args.batch_size, args.steps, args.warmup = ["demo"], args.batch_size or 16, 2, 1
    if args.keep_rate[-1] != 1.0:
        parser.error(f"--keep-rate {args.keep_rate}: the last stage must be 1.0 (ToE off); it is the A/A control")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        amp_dtype = amp_dtype_of(args.amp_dtype, device)
    except UserError as error:
        parser.error(str(error))
    if device.type == "cuda":  # as the trainers run: the project's one TF32 policy (float32 is IEEE float32)
        set_float32_policy()
    schedule = {"expansion_step": list(range(len(args.keep_rate))), "keep_rate": args.keep_rate,
                "initialization_keep_rate": args.initialization_keep_rate,
                "expansion_multiple_stage": args.expansion_multiple_stage, "initialization": args.initialization,
                "distance": args.distance}
    if args.vpt:
        schedule.update(vpt=args.vpt, prompt_tokens=args.prompt_tokens)
    try:
        token_select.validate_schedule(schedule["expansion_step"], args.keep_rate, args.initialization_keep_rate,
                                       args.expansion_multiple_stage)
    except ValueError as error:
        parser.error(str(error))
    results = {"machine": describe_machine(), "commit": git_commit(), "device": str(device), "schedule": schedule,
               "command": " ".join(["python -m bench.speed", *(sys.argv[1:] if argv is None else argv)]),
               "amp_dtype": str(amp_dtype or torch.float32).replace("torch.", ""),
               "tf32": device.type == "cuda" and TF32,
               "memory_note": MEMORY_NOTE.get(device.type, ""),
               "load_before": load_average()}
    # Every model's memory first, in one meter: the timed steps grow the heap (glibc's usual mmap
    # threshold), and memory reused from there would not show in the resident set.
    with CpuPeakMemory() if device.type == "cpu" else nullcontext() as meter:
        memory = {name: measure_model(name, args.batch_size, args.steps, args.warmup, device, schedule,
                                      recipe_file=args.config, amp_dtype=amp_dtype, memory_only=True,
                                      cpu_meter=meter)["memory"] for name in args.models}
    results["models"] = [measure_model(name, args.batch_size, args.steps, args.warmup, device, schedule,
                                       recipe_file=args.config, amp_dtype=amp_dtype, memory=memory[name])
                         for name in args.models]
    results["load_after"] = load_average()
    out = args.out or (os.path.join(tempfile.gettempdir(), "toe_bench") if args.quick else RESULTS)
    os.makedirs(out, exist_ok=True)
    print(_write(results, os.path.join(out, "speed_quick" if args.quick else "speed")))
    return results


if __name__ == "__main__":
    main()
