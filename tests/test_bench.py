"""Fast tests of the bench scripts (bench/): what each one measures and how it reports it."""

import json
import math
import pathlib

import pytest
import torch
from torch import nn

import token_select
from bench import accuracy, speed
from bench.common import rotated
from ToE import flops

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
    assert "5 timed rounds after 1 warm-up" in table and "the order rotated each round" in table
    assert (f"A/A control: stage 3 (ToE off: the same work as full tokens) against full tokens, paired by round: "
            f"median {model['aa_control']['median']:.3f}x") in table


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
    assert "the order fixed (full, stage1, stage2, stage3) in every round" in table  # no rounds stored
    assert ("median 1.000x, rounds 0.909x to 1.053x, largest |1 - ratio| 0.091. Measured/ideal ratios within "
            "1 ± 0.091 are noise: stage 1 1.000, within noise; stage 2 1.600, beyond noise.") in table


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


def test_accuracy_reads_log(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("\n".join(json.dumps({"epoch": e, "test_acc1": 50.0 + 10 * e, "train_time": 2.0})
                             for e in range(3)) + "\nnot json\n")
    parsed = accuracy.read_log(str(log))
    assert parsed["acc1"] == 70.0 and parsed["train_seconds"] == 6.0 and parsed["time_key"] == "train_time"


def test_robust_seconds_count_every_epoch_at_its_stage_median():
    # stage 1: three 2 s epochs, one slowed to 9 s; stage 2: 4 s epochs
    seconds = [2.0, 9.0, 2.0, 2.0, 4.0, 4.0]
    assert accuracy.robust_seconds(seconds, [1, 1, 1, 1, 2, 2]) == pytest.approx(4 * 2.0 + 2 * 4.0)
    assert accuracy.slow_epochs(seconds, [1, 1, 1, 1, 2, 2]) == 1


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
    assert "| ToE 0.5/0.75/1.0, r0 0.25, stride seeds | 4 | 80.75 ± 20.55 | -1.00 ± 0.58 | yes |" in table
    assert "| 1.15x ± 0.08 |" in table
    assert "+2.00 (seed 0), +1.00 (seed 1), +3.00 (seed 2); mean +2.00 ± 0.58 points (± SE, n = 3)" in table
    assert ("Order they ran in: seed 2: full, deit-stride, deit-uniform; seed 0: full, deit-stride, deit-uniform; "
            "seed 1: full, deit-stride, deit-uniform; seed 3: deit-stride.") in table
    with pytest.raises(SystemExit):
        accuracy.main(["--render", "--out", str(tmp_path / "empty")])


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
# README
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stored", ["bench/results/speed.md", "bench/results/accuracy.md",
                                    "bench/results/yolos_accuracy.md", "bench/results/yolos_speed.md",
                                    "bench/results/accuracy_lvvit.md", "bench/results/speed_lvvit/speed.md",
                                    "bench/results/efficienttrain_e30.md"])
def test_readme_tables_are_the_stored_outputs(stored):
    """Bug caught: a README table edited by hand, or left behind when its command was run again."""
    root = pathlib.Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    begin, end = f"<!-- begin {stored} -->\n", f"<!-- end {stored} -->"
    assert begin in readme and end in readme
    pasted = readme[readme.index(begin) + len(begin):readme.index(end)]
    assert pasted.strip() == (root / stored).read_text().strip()
