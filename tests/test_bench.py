"""Tests of the results toolkit (bench.common, ToE.common.results, ToE.common.summary) and the bench scripts
(bench/): what each one measures, which recipe it runs and how it reports it. Reports are checked
by their numbers (the JSON, the cells of the rendered tables), not by their prose."""

import functools
import io
import json
import math
import pathlib
import re
import shutil
import subprocess
import tarfile

import pytest
import torch
import yaml
from torch import nn

import token_select
from bench import accuracy, efficienttrain, lvvit_accuracy, speed, yolos_accuracy, yolos_speed
from bench import common
from bench.common import rotated
from ToE import flops
from ToE.common import results
from ToE.common.config import config_path, load_config
from ToE.common.errors import UserError
from ToE.common.log import read_log
from ToE.trainers import TRAINERS

ROOT = pathlib.Path(__file__).resolve().parents[1]
STORED = ROOT / "bench" / "results"


def numbers(text):
    """Every number in ``text``, in order (signs kept)."""
    return [float(n) for n in re.findall(r"[-+]?\d+(?:\.\d+)?", text)]


def table_rows(text):
    """The body rows of every markdown table in ``text``, each a list of its cells."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return [row for row in rows if not any(cell in ("config", "stage", "epochs", "configuration") for cell in row[:1])]


def line_with(text, word):
    return next(line for line in text.splitlines() if word in line)

# A 2-block, 32-wide ViT on 32 px images with 8 px patches: 16 patch tokens, a step in milliseconds.
TINY_SPEC = ("vit_tiny_patch16_224", {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8,
                                      "num_classes": 10}, 32, 2)


# ------------------------------------------------------------------------------------------------
# bench.speed: memory
# ------------------------------------------------------------------------------------------------
def test_saved_tensor_counter_counts_each_storage_once():
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    with speed.SavedTensorBytes(exclude=list(layer.parameters())) as counter:
        hidden = torch.relu(layer(x))          # saves x (linear) and the relu output
        (hidden * hidden).sum()                # saves the relu output twice more: same storage
    assert counter.bytes == 5 * 4 * 4 + 5 * 3 * 4
    assert counter.parameter_bytes == 3 * 4 * 4  # the weight, saved for the input gradient
    assert counter.tensors >= 4


def test_stage1_activation_memory_follows_the_kept_tokens():
    """Bug caught: an operator (or a counter) that keeps the full sequence alive behind the reduced one.

    6 blocks, 64 patches, stage 1 keeps 32 (+1 class token): block 0 sees 65 tokens, blocks 1-5
    see 33, so the saved activations should be about (1 + 5 * 33 / 65) / 6 = 0.590 of full
    tokens. A saving of a few bytes, or of block 0 only, lands far above that.
    """
    torch.manual_seed(0)
    model = flops.create_model("vit_tiny_patch16_224", 32, 4, embed_dim=32, depth=6, num_heads=2, num_classes=10)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    full = speed.saved_activation_bytes(model, images, labels)["saved_bytes"]
    operator = token_select.attach(model, token_select.TokenSelect())
    try:
        operator.update_current_stage(0)
        assert operator.kept_patch_tokens(64) == 32
        stage1 = speed.saved_activation_bytes(model, images, labels)["saved_bytes"]
    finally:
        token_select.detach(model)
    expected = (1 + 5 * 33 / 65) / 6
    assert stage1 / full == pytest.approx(expected, abs=0.02)


def test_median_time_runs_warmup_then_repeats():
    calls = []
    result = speed.median_time(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(result["times_s"]) == 3


# A 2-block, 128-wide ViT: its AdamW state (2 x 1.6 MB) stands out of a step's peak memory.
MID_SPEC = ("vit_tiny_patch16_224", {"embed_dim": 128, "depth": 2, "num_heads": 2, "patch_size": 8,
                                     "num_classes": 10}, 32, 4)
SCHEDULE = {"expansion_step": [0, 1, 2], "keep_rate": [0.5, 0.75, 1.0], "initialization_keep_rate": 0.25,
            "expansion_multiple_stage": 2, "initialization": "stride", "distance": "cosine"}


def test_speed_memory_is_measured_after_each_configurations_warmup(monkeypatch):
    """Bug caught: the first configuration measured also paid for creating AdamW's state (and the
    gradients), which inflated full tokens' peak memory and flattered ToE's memory ratio. Measured
    in either order, each configuration now gets the same memory; the old order shows the inflation."""
    if not speed.CpuPeakMemory().available:
        pytest.skip("the CPU peak memory needs Linux /proc and glibc's mallopt")
    monkeypatch.setitem(speed.MODELS, "mid", MID_SPEC)
    original = speed.measure_memory

    def memory(order, warmup=True):
        monkeypatch.setattr(speed, "measure_memory", functools.partial(original, warmup=warmup))
        return speed.measure_model("mid", None, 1, 0, torch.device("cpu"), SCHEDULE, configs=order,
                                   memory_only=True)

    first, second = memory(["full", "stage1"]), memory(["stage1", "full"])
    state = 2 * first["parameter_bytes"]  # AdamW's exp_avg and exp_avg_sq
    for config in ("full", "stage1"):
        a, b = first["memory"][config], second["memory"][config]
        assert a["saved_bytes"] == b["saved_bytes"]
        assert abs(a["step_peak_bytes"] - b["step_peak_bytes"]) < 0.25 * state, (config, a, b)
    old = memory(["full", "stage1"], warmup=False)["memory"]
    assert old["full"]["step_peak_bytes"] - first["memory"]["full"]["step_peak_bytes"] > 0.75 * state
    assert old["full"]["saved_bytes"] == first["memory"]["full"]["saved_bytes"]  # the saved-bytes count never was


def test_speed_amp_dtype_flag(tmp_path, monkeypatch, capsys):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert speed.amp_dtype_of("auto", cpu) is None and speed.amp_dtype_of("auto", cuda) == torch.bfloat16
    assert speed.amp_dtype_of("float32", cuda) is None and speed.amp_dtype_of("bfloat16", cpu) == torch.bfloat16
    threads = str(torch.get_num_threads())  # the bench sets torch's threads: leave them as they are
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--amp-dtype", "float16", "--device", "cpu", "--threads", threads])
    assert exit_info.value.code == 2 and "float16 needs a GPU" in capsys.readouterr().err
    monkeypatch.setitem(speed.MODELS, "tiny", TINY_SPEC)
    results = speed.main(["--models", "tiny", "--steps", "1", "--warmup", "0", "--threads", threads,
                          "--device", "cpu", "--amp-dtype", "bfloat16", "--out", str(tmp_path)])
    assert results["amp_dtype"] == "bfloat16" and results["tf32"] is False
    table = (tmp_path / "speed.md").read_text()
    assert "Precision: bfloat16" in table
    if speed.CpuPeakMemory().available:  # the step peak and its ratio are columns of the table
        rows = {r["config"]: r for r in results["models"][0]["rows"]}
        cells = {row[0]: row for row in table_rows(table)}
        assert numbers(cells["stage 1"][9]) == [round(rows["stage1"]["peak_vs_full"], 3)]


# ------------------------------------------------------------------------------------------------
# bench.speed: rotation, paired ratios and the A/A control
# ------------------------------------------------------------------------------------------------
def test_speed_run_rotates_the_order_and_reports_the_aa_control(tmp_path, monkeypatch):
    """Bugs caught: configurations always timed in one order; steps not kept; no A/A line."""
    monkeypatch.setitem(speed.MODELS, "tiny", TINY_SPEC)
    threads = str(torch.get_num_threads())  # the bench sets torch's threads: leave them as they are
    results = speed.main(["--models", "tiny", "--steps", "5", "--warmup", "1", "--threads", threads,
                          "--device", "cpu", "--out", str(tmp_path)])
    configs = ["full", "stage1", "stage2", "stage3"]
    model = results["models"][0]
    assert [r["order"] for r in model["rounds"]] == [rotated(configs, i) for i in range(6)]
    assert [r["order"][0] for r in model["rounds"]] == ["full", "stage1", "stage2", "stage3", "full", "stage1"]
    assert [r["warmup"] for r in model["rounds"]] == [True] + [False] * 5
    for row in model["rows"]:  # every timed step is stored, round by round
        assert row["step_times_s"] == [r["seconds"][row["config"]] for r in model["rounds"][1:]]
    full, stage3 = model["rows"][0]["step_times_s"], model["rows"][3]["step_times_s"]
    ratios = [f / o for f, o in zip(full, stage3)]
    assert model["aa_control"]["config"] == "stage3"
    assert model["aa_control"]["max_deviation"] == pytest.approx(max(abs(1 - r) for r in ratios))
    stored = json.loads((tmp_path / "speed.json").read_text())
    assert stored["command"] == ("python -m bench.speed --models tiny --steps 5 --warmup 1 "
                                 f"--threads {threads} --device cpu --out {tmp_path}")
    table = (tmp_path / "speed.md").read_text()
    cells = {row[0]: row for row in table_rows(table)}
    for row in model["rows"]:  # the table shows the JSON's numbers
        label = "full tokens" if row["config"] == "full" else \
            next(k for k in cells if k.startswith(f"stage {row['stage']}"))
        assert numbers(cells[label][3]) == [round(row["measured_speedup"], 3)]
        assert numbers(cells[label][4]) == [round(row["ideal_speedup"], 3)]
    assert numbers(line_with(table, "A/A control"))[:2] == [3, round(model["aa_control"]["median"], 3)]


def _hand_made_speed_results():
    """Step times chosen so every derived figure can be worked out by hand (see the test)."""
    def row(config, stage, reducing, times, ideal, saved):
        return {"config": config, "stage": stage, "kept_patches": 0, "tokens_after_block0": 0,
                "reducing": reducing, "step_times_s": times, "ideal_speedup": ideal, "saved_bytes": saved}

    model = {"model": "m", "timm_model": "t", "model_kwargs": {}, "input_size": 32, "batch_size": 2,
             "num_patches": 16, "steps": 3, "warmup": 1, "device": "cpu",
             "operator": {"shape": [2, 17, 32], "median_s": 0.05, "times_s": [0.05]},
             "rows": [row("full", 0, False, [1.0, 2.0, 1.0], 1.0, 400),
                      row("stage1", 1, True, [0.5, 1.25, 0.4], 2.0, 200),
                      row("stage2", 2, True, [0.8, 1.0, 0.5], 1.25, 300),
                      row("stage3", 3, False, [1.1, 2.0, 0.95], 1.0, 400)]}
    machine = {"cpu_model": "cpu", "cpu_count": 2, "torch": "x", "torch_threads": 2}
    return {"machine": machine, "device": "cpu", "command": "python -m bench.speed --steps 3",
            "schedule": {"keep_rate": [0.5, 0.75, 1.0], "initialization_keep_rate": 0.25,
                         "expansion_multiple_stage": 2, "initialization": "stride"},
            "models": [model]}


def test_speed_render_pairs_steps_by_round(tmp_path):
    """Bug caught: speedups from medians of unpaired steps, or an A/A band that is not the data's."""
    (tmp_path / "speed.json").write_text(json.dumps(_hand_made_speed_results()))
    model = speed.main(["--render", "--out", str(tmp_path)])["models"][0]
    rows = {r["config"]: r for r in model["rows"]}
    # stage 1: per-round ratios 2.0, 1.6, 2.5 -> median 2.0 (the ratio of medians would be 1 / 0.5 = 2.0 too;
    # stage 2 tells them apart: ratios 1.25, 2.0, 2.0 -> 2.0, while medians give 1.0 / 0.8 = 1.25).
    assert rows["stage1"]["measured_speedup"] == pytest.approx(2.0)
    assert rows["stage2"]["measured_speedup"] == pytest.approx(2.0)
    assert rows["stage2"]["ratio"] == pytest.approx(1.6)
    assert rows["stage1"]["memory_vs_full"] == pytest.approx(0.5)
    # A/A: 1/1.1, 2/2, 1/0.95 -> median 1.0, largest deviation 1 - 1/1.1 = 0.0909
    assert model["aa_control"]["median"] == pytest.approx(1.0)
    assert model["aa_control"]["max_deviation"] == pytest.approx(1 - 1 / 1.1)
    # whole run: per round full / mean(stage steps) = 1/0.8, 2/1.41667, 1/0.61667 -> median 1.41176
    assert model["run"]["measured_speedup"] == pytest.approx(2.0 / (4.25 / 3))
    assert model["run"]["ideal_speedup"] == pytest.approx(1 / ((0.5 + 0.8 + 1.0) / 3))
    assert model["operator"]["share_of_stage1_step"] == pytest.approx(0.05 / 0.5)
    table = (tmp_path / "speed.md").read_text()
    cells = {row[0]: row for row in table_rows(table)}
    assert numbers(cells["stage 1"][3]) == [2.0] and numbers(cells["stage 2"][3]) == [2.0]
    assert numbers(cells["stage 2"][5]) == [1.6] and numbers(cells["stage 1"][7]) == [0.5]
    # A/A line: stage 3, median 1.000, rounds 0.909 to 1.053, largest deviation 0.091 (the noise band)
    assert numbers(line_with(table, "A/A control"))[:6] == [3, 1.0, 0.909, 1.053, 1, 0.091]
    whole = numbers(line_with(table, "Whole run"))
    assert [round(model["run"]["measured_speedup"], 3), round(model["run"]["ideal_speedup"], 3)] == whole[-3:-1]


def test_speed_needs_a_tokens_off_stage_for_the_aa_control(capsys):
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--keep-rate", "0.5", "0.75"])
    assert exit_info.value.code == 2 and "A/A control" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# bench.accuracy
# ------------------------------------------------------------------------------------------------
def test_accuracy_config_flags_put_stages_at_thirds():
    assert accuracy.config_args("deit-uniform", 30) == [
        "--expansion-step", "0", "10", "20", "--keep-rate", "0.5", "0.75", "1.0",
        "--initialization-keep-rate", "0.25", "--expansion-multiple-stage", "2", "--initialization", "uniform"]
    k3 = accuracy.config_args("deit-stride-k3", 30)
    assert k3[k3.index("--expansion-multiple-stage") + 1] == "3" and k3[-1] == "stride"
    full = accuracy.config_args("full", 30)
    stage = token_select.stage_of_epoch(5, [0])
    assert not token_select.is_reducing_stage(stage, [float(full[full.index("--keep-rate") + 1])])


def _write_run(folder, records, **args):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "args.yaml").write_text(yaml.safe_dump(args))
    return folder


def test_run_numbers_read_the_log(tmp_path):
    """One reader for every bench: last top-1 and EMA, best, training seconds by stage."""
    records = [{"epoch": e, "stage": 1 + e // 2, "kept_tokens": 8, "epoch_seconds": t, "test_acc1": a,
                "ema_acc1": a - 1} for e, (t, a) in enumerate([(2.0, 50.0), (9.0, 80.0), (3.0, 70.0), (3.0, 75.0)])]
    run = _write_run(tmp_path / "run", records, model="m", input_size=32)
    numbers_ = common.run_numbers(str(run))
    assert numbers_["acc1"] == 75.0 and numbers_["ema_acc1"] == 74.0 and numbers_["best_acc1"] == 80.0
    assert numbers_["train_seconds"] == 17.0 and numbers_["epoch_seconds"] == [2.0, 9.0, 3.0, 3.0]
    assert numbers_["robust_train_seconds"] == pytest.approx(2 * 5.5 + 2 * 3.0)
    assert common.run_numbers(str(run), epochs=5) is None  # unfinished for a 5-epoch bench
    assert common.run_numbers(str(tmp_path / "none")) is None
    (run / "log.txt").write_text((run / "log.txt").read_text() + '{"epoch": 4, "sta')
    with pytest.raises(UserError, match="line 5 is damaged"):
        common.run_numbers(str(run))


def test_robust_seconds_count_every_epoch_at_its_stage_median():
    # stage 1: three 2 s epochs, one slowed to 9 s; stage 2: 4 s epochs
    seconds = [2.0, 9.0, 2.0, 2.0, 4.0, 4.0]
    assert common.robust_seconds(seconds, [1, 1, 1, 1, 2, 2]) == pytest.approx(4 * 2.0 + 2 * 4.0)
    assert common.slow_epochs(seconds, [1, 1, 1, 1, 2, 2]) == 1


def test_paired_statistics():
    runs = [{"config": "a", "seed": 1, "v": 3.0}, {"config": "b", "seed": 0, "v": 2.0},
            {"config": "a", "seed": 0, "v": 5.0}, {"config": "b", "seed": 1, "v": 1.0},
            {"config": "a", "seed": 2, "v": 9}]
    assert common.paired_by_seed(runs, "a", "b", lambda x, y: x["v"] - y["v"]) == [(0, 3.0), (1, 2.0)]
    assert common.paired_by_seed(runs, "a", "b", lambda x, y: x["v"] / y["v"]) == [(0, 2.5), (1, 3.0)]
    assert common.mean_se([1.0, 2.0, 3.0]) == (2.0, pytest.approx(1 / math.sqrt(3)))
    assert common.mean_se([4.0]) == (4.0, None) and common.mean_std([4.0]) == (4.0, 0.0)
    assert common.paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    assert results.median_steady([9.0, 1.0, 2.0]) == 1.5 and results.median_steady([9.0, 1.0]) == 5.0


def test_launcher_interleaves_rotates_keeps_every_run_and_resumes(tmp_path):
    """Bugs caught: configurations in one fixed order; a run lost when a later one fails; an
    interrupted bench that trains everything again."""
    path = tmp_path / "runs.jsonl"
    trained, killed = [], []

    def run(config, seed):
        if (config, seed) == ("b", 1) and not killed:
            killed.append(True)
            raise RuntimeError("killed")
        trained.append((config, seed))
        return {"config": config, "seed": seed, "epochs": 3, "value": len(trained)}

    with pytest.raises(RuntimeError):
        common.run_repeated(["a", "b", "c"], [0, 1, 2], run, str(path), log=lambda line: None)
    assert trained == [("a", 0), ("b", 0), ("c", 0)]  # seed 1 starts at b (rotated), which failed
    assert [(r["config"], r["seed"]) for r in common.read_runs(str(path))] == trained  # each kept on finishing
    runs = common.run_repeated(["a", "b", "c"], [0, 1, 2], run, str(path), log=lambda line: None)
    assert trained[3:] == [("b", 1), ("c", 1), ("a", 1), ("c", 2), ("a", 2), ("b", 2)]  # only what was missing
    assert len(runs) == 9 and [r["value"] for r in common.read_runs(str(path))] == list(range(1, 10))
    # runs of another length are not this bench's: keep() leaves them out and they train again
    again = common.run_repeated(["a"], [0], run, str(path), keep=lambda r: r["epochs"] == 4, log=lambda line: None)
    assert trained[-1] == ("a", 0) and len(again) == 1


def _write_runs(path, runs):
    path.write_text("".join(json.dumps({"epochs": 4, "time_key": "epoch_seconds", **r}) + "\n" for r in runs))


def test_accuracy_render_pairs_runs_by_seed(tmp_path):
    """Bug caught: runs pooled as independent, or paired by position instead of by seed.

    The full-token runs are stored out of seed order, and deit-stride has a seed 3 without a
    full-token partner: it counts in its own mean but in no paired figure.
    """
    run = lambda config, seed, acc1, time_s: {"config": config, "seed": seed, "acc1": acc1, "time_s": time_s}  # noqa: E731
    _write_runs(tmp_path / "accuracy_runs.jsonl", [
        run("full", 2, 94.0, 9.0), run("full", 0, 90.0, 10.0), run("full", 1, 92.0, 12.0),
        run("deit-stride", 0, 89.0, 8.0), run("deit-stride", 1, 92.0, 10.0), run("deit-stride", 2, 92.0, 9.0),
        run("deit-stride", 3, 50.0, 1.0),
        run("deit-uniform", 2, 95.0, 9.0), run("deit-uniform", 0, 91.0, 10.0), run("deit-uniform", 1, 93.0, 12.0)])
    results = accuracy.main(["--render", "--out", str(tmp_path), "--work-dir", str(tmp_path / "absent")])
    rows = {r["config"]: r for r in results["summary"]}
    stride = rows["deit-stride"]
    # top-1 differences by seed: 89-90, 92-92, 92-94 = -1, 0, -2: mean -1, std 1, SE 1/sqrt(3)
    assert stride["acc1_delta_per_seed"] == [(0, -1.0), (1, 0.0), (2, -2.0)]
    assert stride["acc1_delta"] == pytest.approx(-1.0)
    assert stride["acc1_delta_se"] == pytest.approx(1 / math.sqrt(3))
    # within one spread: -1.00 >= -(std of 90, 92, 94 = 2)
    # speedups by seed: 10/8, 12/10, 9/9 = 1.25, 1.2, 1.0: mean 1.15, std sqrt(0.0175), SE sqrt(0.0175/3)
    assert stride["speedup"] == pytest.approx(1.15)
    assert stride["speedup_se"] == pytest.approx(math.sqrt(0.0175 / 3))
    assert len(stride["seeds"]) == 4 and stride["acc1_mean"] == pytest.approx((89 + 92 + 92 + 50) / 4)
    assert rows["deit-uniform"]["acc1_delta"] == pytest.approx(1.0) and rows["deit-uniform"]["acc1_delta_se"] == 0
    # uniform - stride by seed: 91-89, 93-92, 95-92 = 2, 1, 3: mean 2, SE 1/sqrt(3)
    (rule,) = results["seed_rule"]
    assert rule["per_seed"] == [(0, 2.0), (1, 1.0), (2, 3.0)]
    assert rule["mean"] == pytest.approx(2.0) and rule["se"] == pytest.approx(1 / math.sqrt(3))
    table = (tmp_path / "accuracy.md").read_text()
    row = {r[0]: r for r in table_rows(table)}["ToE 0.5/0.75/1.0, r0 0.25, stride seeds"]
    assert numbers(row[1]) == [4] and numbers(row[2]) == [80.75, 20.55] and numbers(row[3]) == [-1.0, 0.58]
    assert row[4] == "yes" and numbers(row[6]) == [1.15, 0.08]
    # uniform − stride by seed: +2.00 (seed 0), +1.00 (seed 1), +3.00 (seed 2); mean +2.00 ± 0.58, n = 3
    assert numbers(line_with(table, "uniform − stride"))[-9:] == [2.0, 0, 1.0, 1, 3.0, 2, 2.0, 0.58, 3]
    # every run is listed with its seed, in the order they ran
    assert [(r["seed"], r["config"]) for r in results["runs"]] == [
        (2, "full"), (0, "full"), (1, "full"), (0, "deit-stride"), (1, "deit-stride"), (2, "deit-stride"),
        (3, "deit-stride"), (2, "deit-uniform"), (0, "deit-uniform"), (1, "deit-uniform")]
    with pytest.raises(SystemExit):
        accuracy.main(["--render", "--out", str(tmp_path / "empty")])


def test_finetune_runs_each_method_from_the_pretrained_checkpoint(tmp_path, monkeypatch):
    from bench import finetune

    calls = []
    monkeypatch.setattr(finetune, "pretrain", lambda work, epochs: str(tmp_path / "pretrain" / "checkpoint.pth"))
    monkeypatch.setattr(finetune, "build_digits", lambda *a, **k: None)
    monkeypatch.setattr(accuracy, "main", calls.append)
    finetune.main(["--methods", "vpt", "--threads", "1", "--seeds", "0", "1", "--out", str(tmp_path)])
    assert len(calls) == 1
    argv = calls[0]
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert flag("--lr") == "0.005" and flag("--threads") == "1" and flag("--out") == str(tmp_path / "finetune_vpt")
    assert argv[argv.index("--configs") + 1:argv.index("--epochs")] == ["full", "deit-uniform"]
    trainer = argv[argv.index("--trainer-args") + 1:]
    assert trainer == ["--finetune", str(tmp_path / "pretrain" / "checkpoint.pth"), "--vpt", "deep",
                       "--prompt-tokens", "10"]
    calls.clear()
    finetune.main(["--out", str(tmp_path)])
    assert [c[c.index("--out") + 1] for c in calls] == [str(tmp_path / "finetune_full"), str(tmp_path / "finetune_vpt")]
    assert calls[0][calls[0].index("--trainer-args") + 1:][2:] == []  # full fine-tuning: no --vpt


def test_finetune_pretraining_continues_an_interrupted_run(tmp_path, monkeypatch):
    """Bug caught: a checkpoint.pth left by a stopped pretraining was fine-tuned from as if finished."""
    from bench import finetune

    commands = []
    monkeypatch.setattr(finetune, "build_digits", lambda *a, **k: None)
    monkeypatch.setattr(finetune, "run_trainer", lambda command, out, *a: commands.append(list(map(str, command))))
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "checkpoint.pth").write_bytes(b"epoch 31 of 48")
    assert finetune.pretrain(str(tmp_path), None) == str(tmp_path / "pretrain" / "checkpoint.pth")
    assert len(commands) == 1 and "--auto-resume" in commands[0] and "--overwrite" not in commands[0]


def test_accuracy_rotates_the_config_order_per_seed(tmp_path, monkeypatch):
    """Bug caught: full tokens always trained first (and k=3 always last) within a seed."""
    trained = []

    def fake_run(name, seed, args, data_path, log=print):
        trained.append((seed, name))
        return {"config": name, "seed": seed, "epochs": args.epochs, "acc1": 90.0, "time_s": 10.0,
                "time_key": "epoch_seconds"}

    monkeypatch.setattr(accuracy, "run_one", fake_run)
    monkeypatch.setattr(accuracy, "build_digits", lambda *a, **k: None)
    accuracy.main(["--configs", "full", "deit-stride", "deit-uniform", "--seeds", "0", "1", "2", "--epochs", "4",
                   "--out", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    assert [name for _, name in trained] == ["full", "deit-stride", "deit-uniform",
                                             "deit-stride", "deit-uniform", "full",
                                             "deit-uniform", "full", "deit-stride"]
    stored = [json.loads(line)["config"] for line in (tmp_path / "accuracy_runs.jsonl").read_text().splitlines()]
    assert stored == [name for _, name in trained]


# ------------------------------------------------------------------------------------------------
# the stored results: every render mode rewrites them from their run records, unchanged
# ------------------------------------------------------------------------------------------------
def _copy(tmp_path, *names):
    for name in names:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(STORED / name, target)


def test_render_modes_reproduce_the_stored_tables(tmp_path):
    """Bug caught: a refactor of the statistics or the renderers that moves a stored number."""
    _copy(tmp_path, "accuracy_runs.jsonl", "accuracy.json", "speed.json", "speed_lvvit/speed.json",
          "speed_demo_aggressive/speed.json", "yolos_accuracy.jsonl", "yolos_speed.json", "accuracy_lvvit.json")
    accuracy.main(["--render", "--out", str(tmp_path)])
    for folder in ("", "speed_lvvit", "speed_demo_aggressive"):
        speed.main(["--render", "--out", str(tmp_path / folder)])
    yolos_accuracy.main(["--render", "--out", str(tmp_path / "yolos_accuracy")])
    yolos_speed.main(["--render", "--out", str(tmp_path / "yolos_speed")])
    lvvit_accuracy.main(["--render", "--out", str(tmp_path / "accuracy_lvvit")])
    efficienttrain.render(str(STORED / "efficienttrain_runs.jsonl"), str(STORED / "efficienttrain_speed.json"),
                          str(tmp_path / "efficienttrain_e30.md"), None, 30)
    for name in ("accuracy.md", "speed.md", "speed_lvvit/speed.md", "speed_demo_aggressive/speed.md",
                 "yolos_accuracy.md", "yolos_speed.md", "accuracy_lvvit.md", "efficienttrain_e30.md"):
        assert (tmp_path / name).read_text() == (STORED / name).read_text(), name


# ------------------------------------------------------------------------------------------------
# recipes as data: every bench that trains a demo runs the demo's YAML file plus its own flags
# ------------------------------------------------------------------------------------------------
def _recipe_copy(tmp_path, trainer, **changes):
    values = {**load_config(config_path(trainer, "demo")), **changes}
    path = tmp_path / f"{trainer}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _bench_commands(trainer, recipe_file, tmp_path):
    """(command, what the bench's own flags must have set) of each bench that trains ``trainer``'s demo."""
    out = str(tmp_path / "out")
    if trainer == "deit":
        return [(accuracy.run_command("deit-uniform", 1, 30, out, "data/digits", recipe_file),
                 {"epochs": 30, "seed": 1, "expansion_step": [0, 10, 20], "initialization": "uniform"})]
    if trainer == "et":
        return [(efficienttrain.run_command("et_toe", 1, 30, "data/digits", out, recipe_file),
                 {"epochs": 30, "seed": 1, "curriculum": "et", "expansion_step": [0, 10, 20]})]
    if trainer == "yolos":
        return [(yolos_accuracy.run_command("full", 1, 10, out, recipe_file),
                 {"epochs": 10, "seed": 1, "expansion_step": [0], "keep_rate": [1.0]})]
    return [(lvvit_accuracy.run_command(name, 1, 30, "labels", str(tmp_path / name), recipe_file),
             {"epochs": 30, "seed": 1, "token_label": name != "toe_no_tl"}) for name in lvvit_accuracy.CONFIGS]


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_bench_runs_take_the_recipe_from_the_yaml_file(trainer, tmp_path):
    """The demo's learning rate is written once, in its YAML file: a bench run of a modified copy
    carries the copy's lr, and the bench's own flags (length, seed, schedule) on top of it."""
    import importlib

    parse_args = importlib.import_module(TRAINERS[trainer].module).parse_args
    demo_lr = float(load_config(config_path(trainer, "demo"))["lr"])
    for command, _ in _bench_commands(trainer, None, tmp_path):
        assert parse_args(command[2:]).lr == pytest.approx(demo_lr)
    other = _recipe_copy(tmp_path, trainer, lr=demo_lr * 3)
    for command, expected in _bench_commands(trainer, other, tmp_path):
        assert command[1].endswith("main.py") and "--lr" not in command
        args = parse_args(command[2:])
        assert args.lr == pytest.approx(demo_lr * 3)
        assert {key: getattr(args, key) for key in expected} == expected


def test_bench_models_are_the_demo_recipes(tmp_path):
    """The speed benches' demo models and the EfficientTrain bench's schedule are the YAML's."""
    deit = load_config(config_path("deit", "demo"))
    name, kwargs, size, batch = speed.model_spec("demo")
    assert (name, size, batch) == (deit["model"], deit["input_size"], deit["batch_size"])
    assert kwargs == {**deit["model_kwargs"], "patch_size": deit["patch_size"], "num_classes": 10}
    wide = _recipe_copy(tmp_path, "deit", model_kwargs={**deit["model_kwargs"], "embed_dim": 48})
    assert speed.model_spec("demo", wide)[1]["embed_dim"] == 48
    det = load_config(config_path("yolos", "demo"))
    demo = yolos_speed.detector("demo")
    assert (demo.backbone, demo.kwargs, demo.det_tokens) == (det["backbone_name"], det["backbone_kwargs"],
                                                             det["det_token_num"])
    et = load_config(config_path("et", "demo"))
    spec = efficienttrain.demo()
    assert (spec.keep, spec.init, spec.steps) == (et["keep_rate"], et["initialization_keep_rate"], et["expansion_step"])
    fewer = _recipe_copy(tmp_path, "et", keep_rate=[0.5, 0.75, 1.0])  # the demo keeps 0.6, 0.8, 1.0
    demo_kept = sorted({kept for _, kept, _ in efficienttrain.phases("toe", 45)})
    fewer_kept = sorted({kept for _, kept, _ in efficienttrain.phases("toe", 45, fewer)})
    assert fewer_kept[-1] == demo_kept[-1] == 64 and fewer_kept[0] < demo_kept[0] and fewer_kept[1] < demo_kept[1]


# ------------------------------------------------------------------------------------------------
# the one summary: every trainer's output folder
# ------------------------------------------------------------------------------------------------
TINY_VIT = {"model": "vit_tiny_patch16_224", "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
            "input_size": 32, "patch_size": 8, "num_classes": 10}


def _record(epoch, stage, kept, seconds, **extra):
    return {"epoch": epoch, "stage": stage, "kept_tokens": kept, "epoch_seconds": seconds, "test_acc1": 50.0 + epoch,
            **extra}


def _analytic(kept, patches=16):
    shape = flops.model_shape(flops.create_model("vit_tiny_patch16_224", 32, 8, embed_dim=32, depth=2,
                                                 num_heads=2, num_classes=10))
    return flops.analytic_step_flops(type(shape)(shape, num_patches=patches), kept)


def test_summary_of_a_classification_run(tmp_path):
    from ToE.common.summary import summarise

    seconds = [9.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 4.0]  # stage 1: 8 of 16 tokens, 2: 12, 3: all 16
    stages = [1, 1, 1, 2, 2, 3, 3, 3]
    kept = {1: 8, 2: 12, 3: 16}
    run = _write_run(tmp_path / "deit", [_record(e, s, kept[s], t) for e, (s, t) in enumerate(zip(stages, seconds))],
                     epochs=8, **TINY_VIT)
    text = summarise(str(run))
    rows = {row[0]: row for row in table_rows(text)}
    assert numbers(rows["1"][3]) == [2.0] and numbers(rows["1"][4]) == [2.0]  # 4 s full / 2 s (epoch 0 left out)
    assert numbers(rows["2"][4]) == [round(4 / 3, 2)] and rows["3"][4] == "baseline"
    assert numbers(rows["1"][5]) == [round(_analytic(16) / _analytic(8), 2)]
    assert numbers(line_with(text, "Top-1").split(":")[1]) == [57.0, 57.0]
    whole = numbers(line_with(text, "Whole run"))
    assert whole[0] == round(4.0 * 8 / sum(seconds), 2) and whole[1] == 8
    (run / "args.yaml").write_text(yaml.safe_dump({**TINY_VIT, "epochs": 20}))
    assert "UNFINISHED: 8 of 20 epochs" in summarise(str(run))


def test_summary_of_an_efficienttrain_run_has_its_phases(tmp_path):
    from ToE.common.summary import summarise

    # crop 24 px (9 patch tokens): 2 epochs keeping 5, 2 keeping 9; then 32 px, all 16 tokens
    plan = [(24, 9, 5, 1.0), (24, 9, 5, 1.0), (24, 9, 9, 1.5), (24, 9, 9, 1.5), (32, 16, 16, 3.0), (32, 16, 16, 3.0)]
    records = [_record(e, 1 if kept < patches else 2, kept, t, resolution=crop, patch_tokens=patches)
               for e, (crop, patches, kept, t) in enumerate(plan)]
    run = _write_run(tmp_path / "et", records, epochs=6, curriculum="et", **TINY_VIT)
    rows = table_rows(summarise(str(run)))
    assert [numbers(" ".join(row[:4])) for row in rows] == [[0, -1, 24, 9, 5], [2, -3, 24, 9, 9], [4, -5, 32, 16, 16]]
    assert [row[5] for row in rows] == ["3.00x", "2.00x", "baseline"]
    assert numbers(rows[0][6]) == [round(_analytic(16) / _analytic(5, patches=9), 2)]


def test_summary_of_a_yolos_run_has_its_ap(tmp_path):
    from ToE.common.summary import summarise

    args = {"backbone_name": "vit_tiny_patch16_224", "backbone_kwargs": {}, "det_token_num": 4, "embed_dim": 32,
            "depth": 2, "epochs": 3}
    records = [{"epoch": e, "stage": e + 1, "patch_tokens": 16, "kept_tokens": kept, "epoch_seconds": t,
                "test_AP": ap, "test_AP50": ap + 0.1, "test_AP75": ap + 0.05, "test_images": 300}
               for e, (kept, t, ap) in enumerate([(8, 2.0, 0.1), (12, 3.0, 0.3), (16, 4.0, 0.2)])]
    text = summarise(str(_write_run(tmp_path / "yolos", records, **args)))
    assert numbers(line_with(text, "AP50")) == [300, 0.2, 50, 0.3, 75, 0.25, 0.3]
    rows = {row[0]: row for row in table_rows(text)}
    assert rows["1"][5] == "2.00x" and rows["3"][5] == "baseline"
    special = dict(num_prefix_tokens=5)
    assert numbers(rows["1"][6]) == [round(token_select.vit_step_flops(16, 32, 2, **special)
                                           / token_select.vit_step_flops(16, 32, 2, kept_patches=8, **special), 2)]


# ------------------------------------------------------------------------------------------------
# end to end: the benches train through the real trainers
# ------------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_accuracy_bench_trains_the_demo_recipe_and_resumes(tmp_path):
    """Two configurations, one seed, 3 epochs each through ToE/deit/main.py --config demo.yaml."""
    common = ["--configs", "full", "deit-uniform", "--seeds", "0", "--epochs", "3", "--threads", "1",
              "--out", str(tmp_path), "--work-dir", str(tmp_path / "work")]
    first = accuracy.main(common)
    assert [(r["config"], r["seed"], r["epochs"]) for r in first["runs"]] == [("full", 0, 3), ("deit-uniform", 0, 3)]
    for run in first["runs"]:
        log = read_log(str(tmp_path / "work" / f"{run['config']}_seed0"))
        assert run["acc1"] == log[-1]["test_acc1"] and run["time_s"] == pytest.approx(sum(
            r["epoch_seconds"] for r in log))
    assert first["lr"] == load_config(config_path("deit", "demo"))["lr"]
    stored = (tmp_path / "accuracy_runs.jsonl").read_text()
    again = accuracy.main([*common, "--resume"])  # nothing left to train: the same runs
    assert (tmp_path / "accuracy_runs.jsonl").read_text() == stored and again["runs"] == first["runs"]


def test_archive_commit_reads_what_git_archive_wrote(tmp_path):
    stamp = tmp_path / "ARCHIVE_COMMIT"
    assert common.archive_commit(str(stamp)) is None  # missing
    stamp.write_text("$Format:%h$\n")  # a checkout: the placeholder
    assert common.archive_commit(str(stamp)) is None
    stamp.write_text("1e94e31\n")
    assert common.archive_commit(str(stamp)) == "1e94e31 (git archive)"


def test_git_archive_substitutes_the_commit_stamp(tmp_path):
    """The export-subst attribute is what fills bench/ARCHIVE_COMMIT: an exported tree names HEAD."""
    root = pathlib.Path(common.ROOT)
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-tree", "--name-only", "HEAD", "bench/ARCHIVE_COMMIT"], cwd=root,
                            capture_output=True, text=True)
    if "ARCHIVE_COMMIT" not in listed.stdout:
        pytest.skip("bench/ARCHIVE_COMMIT is not committed yet")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()
    exported = subprocess.run(["git", "archive", "HEAD", "bench/ARCHIVE_COMMIT"], cwd=root, capture_output=True,
                              check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(exported)) as tar:
        stamp = tar.extractfile("bench/ARCHIVE_COMMIT").read().decode().strip()
    assert stamp and head.startswith(stamp), (stamp, head)
