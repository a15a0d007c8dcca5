"""Fast tests of the FLOP calculator (ToE/flops.py) and of the bench scripts' pure pieces."""

import json
import re

import pytest
import torch
from torch import nn

import token_select
from bench import accuracy, speed
from bench.machine import CpuWatch, describe_machine, own_process_tree, cpu_ticks
from ToE import flops

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=10)  # 16 patches at 32 px / 8 px


@pytest.fixture(scope="module")
def tiny_model():
    return flops.create_model("vit_tiny_patch16_224", 32, 8, **TINY)


def test_counted_flops_match_the_formula(tiny_model):
    report = flops.schedule_report(tiny_model, 32, 30, [0, 10, 20], [0.5, 0.75, 1.0], 0.25, 2)
    kept = [row["kept_patches"] for row in report["stages"]]
    assert kept == token_select.kept_tokens_per_stage(16, [0.5, 0.75, 1.0], 0.25, 2) == [8, 12, 16]
    patches, width, patch_dim = 16, TINY["embed_dim"], 3 * 8 * 8
    for row in report["stages"]:
        # Exactly the formula, except: the image needs no gradient, so the patch embedding's
        # backward is 1x its forward (the formula's "3x forward" assumes 2x), and the counter
        # also sees the operator's (B, P, C) @ (B, C, P) similarity product when it reduces.
        patch_embed_backward = 2 * patches * patch_dim * width
        similarity = 2 * patches * patches * width if row["reducing"] else 0
        assert row["step_flops_counted"] == row["step_flops_analytic"] - patch_embed_backward + similarity
    run = report["run"]
    assert run["ideal_speedup_analytic"] == pytest.approx(run["ideal_speedup_token_select"], rel=1e-12)
    assert run["ideal_speedup_counted"] == pytest.approx(run["ideal_speedup_analytic"], rel=0.01)
    assert not hasattr(tiny_model, "token_select")  # the report detaches its operator again


def test_count_restores_fused_attention(tiny_model):
    flags = [blk.attn.fused_attn for blk in tiny_model.blocks]
    flops.count_step_flops(tiny_model, 32)
    assert [blk.attn.fused_attn for blk in tiny_model.blocks] == flags
    assert all(p.grad is None for p in tiny_model.parameters())


def test_stage_zero_row_when_the_schedule_starts_late(tiny_model):
    report = flops.schedule_report(tiny_model, 32, 10, [2, 5], [0.5, 1.0], 0.25, 1, count=False)
    assert [(r["stage"], r["epochs"]) for r in report["stages"]] == [(0, 2), (1, 3), (2, 5)]
    assert report["stages"][0]["kept_patches"] == 16 and not report["stages"][0]["reducing"]


def test_deit_small_default_is_about_1_31x(capsys):
    report = flops.main(["--analytic-only"])
    assert report["run"]["ideal_speedup_analytic"] == pytest.approx(1.31, abs=0.01)
    assert "ideal speedup 1.308x" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--keep-rate", "0.5", "0.4", "1.0"], ["--model", "no_such_model"],
                                  ["--bogus"], ["--epochs", "0"], ["--model-kwargs", "depth"]])
def test_bad_flags_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flops.main(argv + ["--analytic-only"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


def test_model_kwargs_reach_the_model(capsys):
    report = flops.main(["--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=96", "depth=6",
                         "num_heads=3", "--input-size", "32", "--patch-size", "4", "--analytic-only"])
    assert report["shape"]["embed_dim"] == 96 and report["shape"]["depth"] == 6
    assert report["shape"]["num_patches"] == 64


def test_saved_tensor_counter_counts_each_storage_once():
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    with speed.SavedTensorBytes(exclude=list(layer.parameters())) as counter:
        hidden = torch.relu(layer(x))          # saves x (linear) and the relu output
        (hidden * hidden).sum()                # saves the relu output twice more: same storage
    assert counter.bytes == 5 * 4 * 4 + 5 * 3 * 4
    assert counter.parameter_bytes == 3 * 4 * 4  # the weight, saved for the input gradient
    assert counter.tensors >= 4


def test_saved_activation_bytes_shrink_with_toe(tiny_model):
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    full = speed.saved_activation_bytes(tiny_model, images, labels)["saved_bytes"]
    operator = token_select.attach(tiny_model, token_select.TokenSelect())
    try:
        operator.update_current_stage(0)
        reduced = speed.saved_activation_bytes(tiny_model, images, labels)["saved_bytes"]
    finally:
        token_select.detach(tiny_model)
    assert 0 < reduced < full


def test_median_time_runs_warmup_then_repeats():
    calls = []
    result = speed.median_time(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(result["times_s"]) == 3


def test_machine_description_and_cpu_watch():
    info = describe_machine()
    assert info["cpu_count"] >= 1 and info["torch"] == torch.__version__
    probe = CpuWatch().stop()
    assert probe["other_cpu_cores"] >= 0
    snapshot = cpu_ticks()
    assert own_process_tree(snapshot) >= {__import__("os").getpid()}


def test_accuracy_config_flags_put_stages_at_thirds():
    assert accuracy.config_args("deit-uniform", 30) == [
        "--expansion-step", "0", "10", "20", "--keep-rate", "0.5", "0.75", "1.0",
        "--initialization-keep-rate", "0.25", "--expansion-multiple-stage", "2", "--initialization", "uniform"]
    k3 = accuracy.config_args("deit-stride-k3", 30)
    assert k3[k3.index("--expansion-multiple-stage") + 1] == "3" and k3[-1] == "stride"
    full = accuracy.config_args("full", 30)
    stage = token_select.stage_of_epoch(5, [0])
    assert not token_select.is_reducing_stage(stage, [float(full[full.index("--keep-rate") + 1])])


def test_accuracy_reads_log_and_summarises(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("\n".join(json.dumps({"epoch": e, "test_acc1": 50.0 + 10 * e, "train_time": 2.0})
                             for e in range(3)) + "\nnot json\n")
    parsed = accuracy.read_log(str(log))
    assert parsed["acc1"] == 70.0 and parsed["train_seconds"] == 6.0 and parsed["time_key"] == "train_time"
    runs = [{"config": "full", "seed": s, "acc1": a, "time_s": 10.0} for s, a in enumerate([90.0, 92.0])]
    runs += [{"config": "deit-stride", "seed": s, "acc1": a, "time_s": 8.0} for s, a in enumerate([90.0, 91.0])]
    rows = accuracy.summarise(runs, ["full", "deit-stride"])
    toe = rows[1]
    assert toe["speedup"] == pytest.approx(1.25) and toe["acc1_delta"] == pytest.approx(-0.5)
    assert toe["within_one_spread"]


def test_accuracy_render_needs_only_the_runs_file(tmp_path):
    runs = [{"config": c, "seed": s, "epochs": 4, "acc1": 90.0 + s, "time_s": t, "wall_s": t + 1,
             "time_key": "epoch_seconds"}
            for c, t in [("full", 10.0), ("aggressive-uniform", 8.0)] for s in (0, 1)]
    (tmp_path / "accuracy_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    results = accuracy.main(["--render", "--out", str(tmp_path), "--work-dir", str(tmp_path / "absent")])
    assert [row["config"] for row in results["summary"]] == ["full", "aggressive-uniform"]
    assert results["summary"][1]["speedup"] == pytest.approx(1.25)
    assert "| ToE 0.4/0.7/1.0, r0 0.2, uniform seeds | 2 |" in (tmp_path / "accuracy.md").read_text()
    with pytest.raises(SystemExit):
        accuracy.main(["--render", "--out", str(tmp_path / "empty")])


def test_run_speedup_of_equal_stages():
    rows = [{"config": "full", "step_median_s": 6.0, "ideal_speedup": 1.0},
            {"config": "stage1", "step_median_s": 3.0, "ideal_speedup": 2.0},
            {"config": "stage2", "step_median_s": 6.0, "ideal_speedup": 1.0}]
    run = speed.run_speedup(rows)
    assert run["measured_speedup"] == pytest.approx(6.0 / 4.5)
    assert run["ideal_speedup"] == pytest.approx(1 / 0.75) and run["ratio"] == pytest.approx(1.0)


def test_robust_seconds_ignore_disturbed_epochs():
    # stage 1: three 2 s epochs, one slowed to 9 s; stage 2: 4 s epochs
    seconds = [2.0, 9.0, 2.0, 2.0, 4.0, 4.0]
    assert accuracy.robust_seconds(seconds, [1, 1, 1, 1, 2, 2]) == pytest.approx(4 * 2.0 + 2 * 4.0)
    assert accuracy.slow_epochs(seconds, [1, 1, 1, 1, 2, 2]) == 1


def test_operator_bench_times_the_operator(capsys):
    from bench import operator as operator_bench

    assert operator_bench.time_operator((2, 17, 8), loops=1, repeats=1) > 0
    operator_bench.main(["--shapes", "demo", "--loops", "1", "--repeats", "1", "--threads", "1"])
    assert re.match(r"demo \(64, 65, 96\): [\d.]+ ms forward \+ backward \(stage 1\)", capsys.readouterr().out)
