"""EfficientTrain + ToE: the low-pass crop, the curriculum planner, ToE on the current grid, the
position table across resolutions, the per-update lr, exact resume across a resolution change,
and the user errors. Synthetic tensors and a 24-image folder; CPU only."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import helpers
import token_select
from helpers import ROOT, ok, read_log
from ToE.EfficientTrain.curriculum import (Segment, aa_policy, check_crop, freq_crop, plan_curriculum, scaled_crop,
                                           segment_at)
from ToE.common.errors import UserError

MAIN = ROOT / "ToE" / "EfficientTrain" / "main.py"
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2",
        "--input-size", "32", "--patch-size", "4"]
FAST = ["--device", "cpu", "--num_workers", "0", "--batch-size", "4", "--global-batch", "8", "--no-pin-mem",
        "--warmup-epochs", "1", "--lr", "1e-3", "--unscale-lr", "--no-repeated-aug"]
# the published augmentation (RandAugment with the segment's magnitude, erasing, mixup/cutmix) and an EMA
RECIPE = ["--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
          "--model-ema", "--model-ema-decay", "0.9"]
# 5 epochs, one per segment of the et preset (24, 24, 24, 28, 32 px); ToE 0.6/0.8/1.0 from 0.3
TOE = ["--epochs", "5", "--expansion-step", "0", "2", "4", "--keep-rate", "0.6", "0.8", "1.0",
       "--initialization-keep-rate", "0.3", "--initialization", "uniform"]


def run_main(*args):
    return helpers.run_main(*args, cmd=[sys.executable, str(MAIN)])


# The ``data`` fixture (conftest.py): 3 classes x 8 train images, 7 val images, 32 px; class c is brighter by c.


# ---------------------------------------------------------------------------------------------
# The low-pass crop
# ---------------------------------------------------------------------------------------------
def _cosine(size: int, k: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64)
    return torch.cos(2 * math.pi * k * x / size)[None, :].expand(size, size).reshape(1, 1, size, size)


def test_freq_crop_shape_constant_means_and_identity():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = freq_crop(x, 24)
    assert y.shape == (2, 3, 24, 24) and y.dtype == x.dtype and not y.is_complex()
    assert torch.allclose(freq_crop(torch.full((1, 3, 32, 32), 0.7), 24), torch.full((1, 3, 24, 24), 0.7), atol=1e-6)
    assert torch.allclose(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(freq_crop(x, 32), x, atol=1e-5)


def test_freq_crop_keeps_low_and_removes_high_frequencies():
    low, high = freq_crop(_cosine(32, 3), 24), freq_crop(_cosine(32, 13), 24)
    assert torch.allclose(low, _cosine(24, 3), atol=1e-9)  # same cycles per image, amplitude 1
    assert high.abs().max() < 1e-9


def test_freq_crop_equals_centred_crop_of_shifted_spectrum_and_commutes_with_normalize():
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    shifted = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))[..., 4:28, 4:28]
    reference = torch.fft.ifft2(torch.fft.ifftshift(shifted, dim=(-2, -1))).real * (24 * 24) / (32 * 32)
    assert torch.allclose(freq_crop(x, 24), reference, atol=1e-10)
    mean, std = torch.tensor([0.5, 0.4, 0.3])[:, None, None], torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    assert torch.allclose(freq_crop((x - mean) / std, 24), (freq_crop(x, 24) - mean) / std, atol=1e-10)


@pytest.mark.parametrize("crop, problem", [(23, "odd"), (40, "larger"), (26, "multiple of the patch")])
def test_bad_crop_sizes_are_user_errors(crop, problem):
    with pytest.raises(UserError, match=problem):
        check_crop(crop, 32, 4)


# ---------------------------------------------------------------------------------------------
# The curriculum as data
# ---------------------------------------------------------------------------------------------
def test_et_preset_reproduces_the_published_table():
    segments = plan_curriculum("et", 300, 224, 16, batch_size=256, global_batch=4096, world_size=8)
    assert [(s.start, s.end, s.crop, s.magnitude, s.batch, s.accum) for s in segments] == [
        (0, 60, 160, 1, 512, 1), (60, 120, 160, 3, 512, 1), (120, 180, 160, 5, 512, 1),
        (180, 240, 192, 7, 512, 1), (240, 300, 224, 9, 256, 2)]
    assert all(s.batch * s.accum * 8 == 4096 for s in segments)
    assert aa_policy("rand-m9-mstd0.5-inc1", 3) == "rand-m3-mstd0.5-inc1"


def test_et_preset_scales_to_digits_and_etpp_to_its_budget():
    digits = plan_curriculum("et", 45, 32, 4, batch_size=64, global_batch=64)
    assert [(s.end, s.crop) for s in digits] == [(9, 24), (18, 24), (27, 24), (36, 28), (45, 32)]
    assert [scaled_crop(c, 32, 4) for c in (160, 192, 224)] == [24, 28, 32]
    etpp = plan_curriculum("etpp", 200, 224, 16, batch_size=256, global_batch=4096, world_size=8)
    assert [s.crop for s in etpp] == [96, 96, 160, 160, 160, 160, 192, 192, 224, 224]
    assert [s.end - s.start for s in etpp] == [108, 109, 39, 39, 40, 39, 27, 27, 21, 20]
    assert [s.magnitude for s in etpp] == list(range(10))
    table = plan_curriculum("table", 6, 32, 4, 4, 8, table=["2:16:1", "6:32:9:8"])
    assert table == [Segment(0, 2, 16, 1, 4, 2), Segment(2, 6, 32, 9, 8, 1)]
    assert segment_at(table, 1).crop == 16 and segment_at(table, 2).crop == 32


@pytest.mark.parametrize("kwargs, problem", [
    (dict(preset="table", table=["3:24:1", "5:32:9"], epochs=6), "last must be --epochs 6"),
    (dict(preset="table", table=["3:24:1", "6:28:9"], epochs=6), "never see full resolution"),
    (dict(preset="table", table=["3:25:1", "6:32:9"], epochs=6), "odd"),
    (dict(preset="et", epochs=5, global_batch=12), "micro-batches of --batch-size 8 do not divide"),
])
def test_bad_curricula_are_user_errors(kwargs, problem):
    args = dict(base_size=32, patch_size=4, batch_size=8, global_batch=16, world_size=1)
    args.update(kwargs)
    with pytest.raises(UserError, match=problem):
        plan_curriculum(args.pop("preset"), args.pop("epochs"), **args)


# ---------------------------------------------------------------------------------------------
# ToE on the current grid
# ---------------------------------------------------------------------------------------------
def test_toe_stage_and_kept_tokens_follow_global_epoch_and_grid():
    toe = token_select.TokenSelect([0, 100, 200], [0.6, 0.8, 1.0], 0.3, 2)
    segments = plan_curriculum("et", 300, 224, 16, 256, 4096, 8)
    seen = []
    for epoch in (0, 60, 100, 179, 180, 199, 200, 240):
        stage = toe.update_current_stage(epoch)
        grid = segment_at(segments, epoch).crop // 16
        seen.append((stage, toe.kept_patch_tokens(grid * grid)))
    assert seen == [(1, 60), (1, 60), (2, 80), (2, 80), (2, 114), (2, 114), (3, 144), (3, 196)]
    assert [token_select.kept_tokens_per_stage(p, [0.6, 0.8, 1.0], 0.3)[:2] for p in (36, 49, 64)] == \
        [[20, 27], [28, 37], [38, 50]]


# ---------------------------------------------------------------------------------------------
# The trainer in-process: hooks at each epoch, position table, lr per update
# ---------------------------------------------------------------------------------------------
def _run(data, *extra):
    from ToE.common.lifecycle import Run
    from ToE.EfficientTrain.main import parse_args
    from ToE.EfficientTrain.trainer import EfficientTrainTask

    return Run(parse_args([*TINY, *FAST, *RECIPE, *TOE, "--data-path", str(data), *map(str, extra)]),
               EfficientTrainTask)


def _trainer(data, *extra):
    return _run(data, *extra).task


def _enter(task, epoch):
    """What the lifecycle does before training ``epoch``: ask the plan, build the epoch's loader."""
    plan = task.plan[epoch]
    return plan, task.train_loader(epoch, plan, 0)


def test_segments_set_grid_view_batch_and_best_epochs(data):
    trainer = _trainer(data)
    pos_embed = trainer.model.pos_embed
    rows = []
    for epoch in range(5):
        plan, loader = _enter(trainer, epoch)
        view = trainer.view
        rows.append((trainer.num_patches, trainer.toe.grid_size, view.size if view else None,
                     loader.batch_size, plan.accum, plan.counts_for_best))
        if view is not None:  # evaluation sees the crop too: the view is the step's device-side transform
            assert view(torch.zeros(2, 3, 32, 32)).shape == (2, 3, view.size, view.size)
    assert rows == [(36, (6, 6), 24, 8, 1, False)] * 3 + [(49, (7, 7), 28, 8, 1, False), (64, (8, 8), None, 4, 2, True)]
    # one full-resolution table throughout, and the optimizer holds that very parameter
    assert trainer.model.pos_embed is pos_embed and pos_embed.shape == (1, 65, 32)
    assert any(p is pos_embed for group in trainer.optimizer.param_groups for p in group["params"])
    assert trainer.train_set.transform is not None and trainer.updates_per_epoch == 3


def test_position_table_is_interpolated_per_forward_and_checkpoint_is_plain_timm(data):
    trainer = _trainer(data)
    model = trainer.model.eval()
    tokens = model.patch_embed(torch.randn(1, 3, 24, 24))  # (1, 6, 6, C): the grid is kept
    expected = tokens.reshape(1, 36, -1) + resample_abs_pos_embed(model.pos_embed, (6, 6), num_prefix_tokens=1)[:, 1:]
    got = model._pos_embed(tokens)[:, 1:]
    assert torch.allclose(got, expected, atol=1e-6)
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                              num_classes=3)
    plain.load_state_dict(trainer.model.state_dict(), strict=True)
    image = torch.randn(2, 3, 32, 32)
    assert torch.allclose(plain.eval()(image), model(image), atol=1e-6)


def test_uniform_seeds_follow_the_current_grid(data):
    trainer = _trainer(data)
    _enter(trainer, 0)
    trainer.toe.update_current_stage(0)
    x = torch.randn(2, 37, 32)
    trainer.toe.train()
    trainer.toe.token_select(x)
    seeds, _ = trainer.toe._seeds(36, x.device)
    assert seeds.tolist() == token_select.seed_positions(36, 0.3, "uniform", (6, 6))
    assert trainer.toe.last_index.shape == (2, 1 + 20)


def published_lr(update: int, total: int, warmup: int, base: float, warmup_lr: float, min_lr: float) -> float:
    """The published EfficientTrain curve, written from its formula: warmup ``linspace(warmup_lr,
    base, warmup)`` (both ends included), then ``min + (base - min)/2 (1 + cos(pi i / (total - warmup)))``
    with i counted from the end of the warmup."""
    if update < warmup:
        return float(np.linspace(warmup_lr, base, warmup)[update])
    i = update - warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * i / (total - warmup)))


@pytest.mark.parametrize("epochs", [100, 300])
def test_lr_per_update_equals_the_published_curve(data, epochs):
    """At 100 and 300 epochs (20 warmup), every update's lr is the published one; the cosine starts
    after the warmup (timm's cosine over all updates differs by up to 12.7 % at 300 epochs)."""
    trainer = _trainer(data, "--epochs", epochs, "--warmup-epochs", 20, "--lr", "4e-3", "--warmup-lr", 0,
                       "--min-lr", "1e-6", "--no-model-ema")
    per_epoch, scheduler = trainer.updates_per_epoch, trainer.lr_scheduler
    total, warmup = epochs * per_epoch, 20 * per_epoch
    for update in sorted({0, 1, warmup - 1, warmup, warmup + 1, total // 2, total - 1, *range(0, total, 7)}):
        scheduler.step_update(update)
        expected = published_lr(update, total, warmup, 4e-3, 0.0, 1e-6)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), update


def test_published_lr_at_imagenet_scale():
    """The published run (312 updates an epoch, 300 epochs, 20 warmup): the lr at the start of
    epochs 60/120/180/200/240 given with the published code, 3.80e-3 / 2.87e-3 / 1.56e-3 / 1.13e-3 / 4.37e-4."""
    from ToE.EfficientTrain.trainer import PublishedCosine

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=4e-3)
    scheduler = PublishedCosine(optimizer, total=300 * 312, warmup=20 * 312, warmup_lr=0.0, min_lr=1e-6)
    seen = []
    for epoch in (60, 120, 180, 200, 240):
        scheduler.step_update(epoch * 312)
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([3.80e-3, 2.87e-3, 1.56e-3, 1.13e-3,
                                                                               4.37e-4], abs=6e-6)
    scheduler.step_update(6239)  # the last warmup update reaches the base lr (linspace includes both ends)
    assert optimizer.param_groups[0]["lr"] == 4e-3


@pytest.mark.e2e
def test_lr_per_update_in_training_follows_one_uninterrupted_curve(data):
    run = _run(data, "--warmup-lr", "1e-6", "--min-lr", "1e-5")
    trainer = run.task
    per_epoch = trainer.updates_per_epoch
    total, warmup = 5 * per_epoch, 1 * per_epoch
    seen = {}
    step_update = trainer.lr_scheduler.step_update

    def spy(num_updates, metric=None):
        step_update(num_updates, metric)
        seen[num_updates] = trainer.optimizer.param_groups[0]["lr"]

    trainer.lr_scheduler.step_update = spy
    for epoch in range(5):
        run.train_epoch(epoch)
    assert sorted(seen) == list(range(total))
    assert all(seen[u] == pytest.approx(published_lr(u, total, warmup, 1e-3, 1e-6, 1e-5), rel=1e-12) for u in seen)


def test_accumulation_equals_one_large_batch(data):
    """2 micro-batches of 4 with the loss halved give the same update as one batch of 8 (through
    the lifecycle's step loop, with a device-side view of the images)."""
    from ToE.common.lifecycle import EpochPlan

    images, targets = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def run(batch, accum):
        torch.manual_seed(0)
        trained = _run(data, "--no-model-ema", "--epochs", "5")
        task = trained.task
        task.model = torch.nn.Linear(6, 3)
        task.optimizer = torch.optim.SGD(task.model.parameters(), lr=0.5)
        trained.model, trained.toe.last_index = task.model, None
        task.updates_per_epoch = None
        loader = [(images[i:i + batch], targets[i:i + batch]) for i in range(0, 8, batch)]

        def step(model, batch_):
            x, y = batch_
            return F.cross_entropy(model(2 * x), y), {"patch_tokens": 1}, x.shape[0]

        task.train_step = step
        trained.train_steps(0, EpochPlan(batch=batch, accum=accum), loader, 0, None)
        return task.model.weight.detach()

    assert torch.allclose(run(4, 2), run(8, 1), atol=1e-6)
    assert not torch.allclose(run(4, 1), run(8, 1), atol=1e-4)  # two updates of 4 differ


# ---------------------------------------------------------------------------------------------
# End to end: 5-epoch curriculum, resumed after epoch 2 across a resolution change; user errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_resumed_curriculum_equals_uninterrupted_one(data, tmp_path):
    flags = [*TINY, *FAST, *RECIPE, *TOE, "--data-path", data]
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(run_main(*flags, "--output_dir", straight))
    ok(run_main(*flags, "--output_dir", split, "--stop-after-epochs", "3"))
    ok(run_main(*flags, "--output_dir", split, "--resume", split / "checkpoint.pth"))
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    log = read_log(straight)
    assert read_log(split) == [dict(r, epoch_seconds=s["epoch_seconds"]) for r, s in zip(log, read_log(split))]
    assert [(r["resolution"], r["magnitude"], r["stage"], r["kept_tokens"], r["accum"]) for r in log] == [
        (24, 1, 1, 20, 1), (24, 3, 1, 20, 1), (24, 5, 2, 27, 1), (28, 7, 2, 37, 1), (32, 9, 3, 64, 2)]
    assert [r["aa"] for r in log][::4] == ["rand-m1-mstd0.5-inc1", "rand-m9-mstd0.5-inc1"]
    # the best checkpoint is chosen among full-resolution epochs only
    assert [r["best_acc1"] for r in log[:4]] == [0.0] * 4 and log[4]["best_acc1"] == log[4]["test_acc1"]
    assert torch.load(straight / "best_checkpoint.pth", weights_only=True)["epoch"] == 4


def test_user_errors_are_one_line_and_write_nothing(data, tmp_path, capsys):
    from ToE.EfficientTrain.main import cli

    base = [*TINY, *FAST, "--data-path", str(data), "--aa", "none", "--mixup", "0", "--cutmix", "0"]
    cases = [
        (["--epochs", "6", "--curriculum", "table", "--segments", "3:23:1", "6:32:9"], "crop size 23 is odd"),
        (["--epochs", "6", "--curriculum", "table", "--segments", "3:24:1", "5:32:9"], "must be --epochs 6"),
        (["--epochs", "5", "--global-batch", "6"], "--global-batch 6 gives each of 1 process"),
        (["--epochs", "5", "--curriculum", "table", "--segments", "5:48:1"], "larger than --input-size 32"),
    ]
    for extra, problem in cases:
        out = tmp_path / "bad"
        with pytest.raises(SystemExit) as exit_info:
            cli([*base, *extra, "--output_dir", str(out)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error: ") and problem in err and "\n" not in err
        assert not out.exists()
    # a resume into another preset is refused by name, and the run's files stay as they were
    run = tmp_path / "run"
    flags = [*base, "--epochs", "5", "--output_dir", str(run)]
    cli([*flags, "--stop-after-epochs", "1"])
    capsys.readouterr()
    before = (run / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        cli([*flags, "--curriculum", "none", "--resume", str(run / "checkpoint.pth")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--curriculum et, this run gives --curriculum none" in err
    assert (run / "checkpoint.pth").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# python -m ToE.flops --curriculum
# ---------------------------------------------------------------------------------------------
def test_flops_learns_curricula():
    from ToE.flops import curriculum_report

    crops = [segment_at(plan_curriculum("et", 300, 224, 16, 1, 2), e).crop for e in range(300)]
    run = curriculum_report("deit_small_patch16_224", {}, 224, None, 300, crops, [0, 100, 200], [0.6, 0.8, 1.0],
                            0.3, count=False)["run"]
    assert [round(run[f"{k}_speedup_analytic"], 2) for k in ("et", "toe", "et_toe")] == [1.56, 1.24, 1.83]
    # counted on the digits model: a 24 px step costs about (37/65) of a 32 px one, as the formula says
    digits = [24] * 3 + [28, 32]
    report = curriculum_report("vit_tiny_patch16_224", {"embed_dim": 32, "depth": 2, "num_heads": 2}, 32, 4, 5,
                               digits, [0, 2, 4], [0.6, 0.8, 1.0], 0.3)
    for row in report["phases"]:
        assert abs(row["step_flops_counted"] / row["step_flops_analytic"] - 1) < 0.03
    first = report["phases"][0]
    assert (first["crop"], first["patches"], first["kept_patches"]) == (24, 36, 20)
    assert report["run"]["et_speedup_counted"] == pytest.approx(report["run"]["et_speedup_analytic"], rel=0.02)


def test_random_patch_dropout_baseline_keeps_as_many_tokens(data):
    trainer = _trainer(data, "--token-drop", "random")
    model = trainer.model.train()
    assert getattr(model, "_toe_hook", None) is None  # the operator only counts, it does not select
    seen, logged = [], []
    handle = model.blocks[0].register_forward_hook(lambda module, inputs, output: seen.append(output.shape[1]))
    for epoch in (0, 2, 3, 4):
        plan, _ = _enter(trainer, epoch)
        images = torch.randn(2, 3, 32, 32)
        logged.append(trainer.train_step(model, (images, torch.tensor([0, 1])))[1]["kept_tokens"])
    handle.remove()
    assert seen == [1 + 20, 1 + 27, 1 + 37, 1 + 64]
    assert logged == [20, 27, 37, 64]


def test_bench_phases_and_run_level_speedup():
    from bench.efficienttrain import CONFIGS, phases, speedups, step_flops

    et_toe = phases("et_toe", 45)
    assert (et_toe[0], et_toe[15], et_toe[27], et_toe[30], et_toe[44]) == (
        (24, 20, "toe"), (24, 27, "toe"), (28, 37, "toe"), (28, 49, "off"), (32, 64, "off"))
    assert {row for row in phases("random", 45)} == {(32, 38, "random"), (32, 50, "random"), (32, 64, "off")}
    # step times proportional to the FLOPs: every measured speedup is the FLOP-ideal one
    keys = {row for config in CONFIGS for row in phases(config, 45)}
    seconds = {f"{c}/{k}/{m}": step_flops(c, k, m) * 1e-9 for c, k, m in keys}
    result = speedups([{"warmup": False, "seconds": seconds}] * 3, 45)
    for config in CONFIGS:
        assert result[config]["measured_speedup"] == pytest.approx(result[config]["ideal_speedup"], rel=1e-12)
    assert round(result["et_toe"]["ideal_speedup"], 2) == 1.76 and result["full"]["ideal_speedup"] == 1.0


def test_patch_size_from_model_kwargs_and_segments_without_a_table(data, capsys):
    """The curriculum's grid follows --model-kwargs patch_size=N (it read 16 from the model name): the patch
    size is the model's, built on the meta device; --segments without --curriculum table was ignored."""
    import argparse

    from ToE.EfficientTrain.main import cli
    from ToE.EfficientTrain.trainer import EfficientTrainTask

    task = EfficientTrainTask.__new__(EfficientTrainTask)
    task.args = argparse.Namespace(patch_size=None, model_kwargs={"patch_size": 4}, model="vit_tiny_patch16_224",
                                   input_size=32)
    assert token_select.patch_size(task.meta_model()) == 4
    with pytest.raises(SystemExit) as exit_info:
        cli([*TINY, *FAST, "--data-path", str(data), "--epochs", "5", "--segments", "5:32:9"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--segments is read by --curriculum table only" in err


def test_mixup_with_an_odd_segment_batch_is_refused_before_training(data, tmp_path, capsys):
    """The full-resolution batch was checked for mixup, not the segments' own batches: a batch of 3
    failed inside timm's Mixup in the first epoch."""
    from ToE.EfficientTrain.main import cli

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli([*TINY, "--device", "cpu", "--num_workers", "0", "--data-path", str(data), "--epochs", "5",
             "--batch-size", "2", "--global-batch", "6", "--curriculum", "table", "--segments", "3:24:1:3", "5:32:9",
             "--warmup-epochs", "1", "--mixup", "0.8", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "batches of 3 images per process" in err and not out.exists()
