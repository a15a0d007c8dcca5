"""End-to-end tests of the DeiT trainer (ToE/deit/main.py) and its run scripts, on the CPU.

Every run is a real subprocess of ``ToE/deit/main.py`` on a tiny generated ImageFolder
(3 classes, 8 train images each, 7 validation images: an odd count) with a 2-block,
32-wide ViT on 16 px images cut into 4 px patches (16 patch tokens). Runs that several
tests read are module-scoped fixtures, so each is trained once.
"""

from __future__ import annotations

import bisect
import copy
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

import token_select
from helpers import (CLASSES, FAST, INIT_RATE, INPUT, KEEP_RATE, MAIN, MODEL, MODEL_KWARGS, MULTIPLE, NUM_PATCHES,
                     NUM_VAL, PATCH, PLAIN, RECIPE, ROOT, RUN_DIR, SCHEDULE, TINY, assert_same_tensors,
                     assert_user_error, child_env, deit_run, free_port, load, ok, read_log, run_main, run_script,
                     write_images)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """4 epochs straight over 3 ToE stages, plain recipe: run A of the resume test too."""
    out = tmp_path_factory.mktemp("straight")
    result = ok(run_main("--data-path", data, "--output_dir", out, "--epochs", 4, *TINY, *FAST, *PLAIN, *SCHEDULE))
    return out, result


# -- training with ToE ------------------------------------------------------------------------

@pytest.mark.e2e
def test_training_with_toe_writes_logs_and_checkpoints(trained):
    out, result = trained
    records = read_log(out)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    kept = token_select.kept_tokens_per_stage(NUM_PATCHES, KEEP_RATE, INIT_RATE, MULTIPLE)
    assert kept == [8, 12, 16]
    steps = [0, 2, 3]
    for r in records:
        stage = bisect.bisect_right(steps, r["epoch"])
        assert r["stage"] == stage
        assert r["kept_tokens"] == kept[stage - 1]
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        assert math.isfinite(r["test_loss"])
        assert r["test_images"] == NUM_VAL
        assert 0.0 <= r["test_acc1"] <= r["test_acc5"] <= 100.0
        assert "ema_acc1" in r and r["lr"] > 0 and r["epoch_seconds"] >= 0
    assert records[-1]["best_acc1"] == max(r["test_acc1"] for r in records)
    for name in ("checkpoint.pth", "best_checkpoint.pth", "args.yaml"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp")), "a temporary checkpoint was left behind"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    saved_args = yaml.safe_load((out / "args.yaml").read_text())
    assert saved_args["model"] == MODEL and saved_args["keep_rate"] == KEEP_RATE
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_training_changes_the_weights_and_tensorboard_has_scalars(trained):
    out, _ = trained
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train_loss", "kept_tokens", "test_acc1"):
        assert tag in tags
    assert [e.value for e in events.Scalars("kept_tokens")] == [8, 8, 12, 16]
    checkpoint = load(out / "checkpoint.pth")
    torch.manual_seed(0)
    fresh = timm.create_model(MODEL, num_classes=CLASSES, img_size=INPUT, patch_size=PATCH, **MODEL_KWARGS)
    # trained weights differ from an initialisation (the run learnt something)
    assert not torch.equal(fresh.head.weight, checkpoint["model"]["head.weight"])


# -- the checkpoint -------------------------------------------------------------------------

@pytest.mark.e2e
def test_checkpoint_loads_into_plain_timm_model_with_same_eval(trained, data):
    out, _ = trained
    checkpoint = load(out / "checkpoint.pth")
    for key in ("model", "optimizer", "lr_scheduler", "scaler", "model_ema", "epoch", "rng", "args"):
        assert key in checkpoint, key
    assert checkpoint["epoch"] == 3
    assert isinstance(checkpoint["args"], dict) and checkpoint["args"]["model"] == MODEL
    best = load(out / "best_checkpoint.pth")
    assert best["best_acc1"] == read_log(out)[-1]["best_acc1"]

    def fresh():
        model = timm.create_model(MODEL, num_classes=CLASSES, img_size=INPUT, patch_size=PATCH, **MODEL_KWARGS)
        model.load_state_dict(checkpoint["model"], strict=True)
        return model.eval()

    plain, attached = fresh(), fresh()
    toe = token_select.attach(attached, token_select.TokenSelect([0, 2, 3], KEEP_RATE, INIT_RATE, MULTIPLE))
    toe.update_current_stage(0)  # a reducing stage: in eval mode it must still be the identity
    attached.eval()

    from timm.data import create_transform
    from torchvision import datasets

    val = datasets.ImageFolder(str(data / "val"), transform=create_transform(INPUT, is_training=False,
                                                                            interpolation="bicubic"))
    loader = torch.utils.data.DataLoader(val, batch_size=6, shuffle=False)  # the trainer's 1.5 x batch
    loss_sum, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for images, targets in loader:
            logits = plain(images)
            assert torch.equal(logits, attached(images)), "attached model in eval mode is not the plain model"
            loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            hits += (logits.argmax(1) == targets).sum().item()
            count += targets.numel()
    last = read_log(out)[-1]
    assert count == NUM_VAL
    assert loss_sum / count == pytest.approx(last["test_loss"], rel=1e-6, abs=1e-9)
    assert 100.0 * hits / count == pytest.approx(last["test_acc1"])

    # the trainer's own --eval of the same checkpoint agrees
    result = ok(run_main("--data-path", data, "--eval", "--resume", out / "checkpoint.pth", *TINY, *FAST, *PLAIN,
                         *SCHEDULE))
    match = re.search(r"Accuracy on (\d+) test images: top-1 ([\d.]+) %", result.stdout)
    assert match, result.stdout
    assert int(match.group(1)) == NUM_VAL
    assert float(match.group(2)) == pytest.approx(last["test_acc1"], abs=0.01)


# -- resume ---------------------------------------------------------------------------------

def _interrupted(data, out, extra):
    """Epochs 0-1 (stage 1), exit, then resume for epochs 2-3 (stages 2 and 3) into the same folder."""
    common = ["--data-path", data, "--output_dir", out, "--epochs", 4, *TINY, *FAST, *extra, *SCHEDULE]
    ok(run_main(*common, "--stop-after-epochs", 2))
    first = load(out / "checkpoint.pth")
    assert first["epoch"] == 1
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    ok(run_main(*common, "--resume", out / "checkpoint.pth"))
    return first


def _assert_resume_matches(straight: Path, resumed: Path):
    a, b = load(straight / "checkpoint.pth"), load(resumed / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 3
    assert_same_tensors(a["model"], b["model"], "model")
    if a["model_ema"] is not None:
        assert_same_tensors(a["model_ema"], b["model_ema"], "EMA")
    for key in a["optimizer"]["state"]:
        assert_same_tensors(a["optimizer"]["state"][key], b["optimizer"]["state"][key], f"optimizer state {key}")
    log_a, log_b = read_log(straight), read_log(resumed)
    assert [r["epoch"] for r in log_b] == [0, 1, 2, 3]
    for ra, rb in zip(log_a, log_b):
        for key in ("stage", "kept_tokens", "train_loss", "lr", "test_loss", "test_acc1"):
            assert ra[key] == rb[key], (ra["epoch"], key)


@pytest.mark.e2e
def test_resume_equals_uninterrupted_run(trained, data, tmp_path):
    straight, _ = trained
    first = _interrupted(data, tmp_path, PLAIN)
    # the resumed half really trained (weights moved after the stage boundary)
    final = load(tmp_path / "checkpoint.pth")
    assert not torch.equal(first["model"]["head.weight"], final["model"]["head.weight"])
    _assert_resume_matches(straight, tmp_path)


@pytest.mark.e2e
def test_resume_equals_uninterrupted_run_with_full_recipe(data, tmp_path):
    """Mixup, cutmix, RandAugment, random erasing, repeated augmentation, drop path and EMA."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(run_main("--data-path", data, "--output_dir", straight, "--epochs", 4, *TINY, *FAST, *RECIPE, *SCHEDULE))
    _interrupted(data, resumed, RECIPE)
    checkpoint = load(straight / "checkpoint.pth")
    assert checkpoint["model_ema"] is not None
    assert list(checkpoint["model_ema"]) == list(checkpoint["model"])  # plain timm keys
    assert not torch.equal(checkpoint["model_ema"]["head.weight"], checkpoint["model"]["head.weight"])
    _assert_resume_matches(straight, resumed)


# -- user errors ------------------------------------------------------------------------------

def error_run(data, *extra, out=None):
    args = ["--data-path", data, "--epochs", 1, *TINY, *FAST, *PLAIN, *SCHEDULE]
    if out is not None:
        args += ["--output_dir", out]
    return run_main(*args, *extra)


@pytest.mark.e2e
def test_error_missing_data_path(tmp_path):
    missing = tmp_path / "no_such_folder"
    assert_user_error(error_run(missing), str(missing), "does not exist")


@pytest.mark.e2e
def test_error_data_path_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    assert_user_error(error_run(tmp_path), "no class folders")
    assert_user_error(error_run(tmp_path / "train"), "missing")  # a folder without train/ and val/


@pytest.mark.e2e
def test_error_empty_split(tmp_path):
    write_images(tmp_path)
    for image in (tmp_path / "val").rglob("*.png"):
        image.unlink()
    assert_user_error(error_run(tmp_path), "val", "no images")


@pytest.mark.e2e
def test_error_unreadable_image_is_named(tmp_path):
    write_images(tmp_path)
    bad = tmp_path / "train" / "class1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    assert_user_error(error_run(tmp_path, out=tmp_path / "out"), str(bad))


@pytest.mark.e2e
def test_error_bad_toe_schedule(data):
    result = run_main("--data-path", data, *TINY, *FAST, *PLAIN, "--expansion-step", "0", "1", "2",
                      "--keep-rate", "0.5", "0.4", "1.0")
    assert_user_error(result, "ToE schedule", "--keep-rate")


@pytest.mark.e2e
def test_error_odd_batch_with_mixup(data):
    assert_user_error(error_run(data, "--batch-size", "3", "--mixup", "0.8"), "even --batch-size")


@pytest.mark.e2e
def test_error_unknown_model(data):
    assert_user_error(error_run(data, "--model", "no_such_vit_model"), "no_such_vit_model")
    not_a_vit = run_main("--data-path", data, "--model", "test_resnet", "--input-size", INPUT, *FAST, *PLAIN)
    assert_user_error(not_a_vit, "test_resnet", "ViT")


@pytest.mark.e2e
def test_error_missing_resume_file(data, tmp_path):
    missing = tmp_path / "nothing.pth"
    assert_user_error(error_run(data, "--resume", missing), str(missing), "does not exist")


@pytest.mark.e2e
def test_error_corrupt_resume_file(data, tmp_path):
    corrupt = tmp_path / "checkpoint.pth"
    corrupt.write_bytes(np.random.default_rng(1).bytes(4096))
    assert_user_error(error_run(data, "--resume", corrupt), str(corrupt), "corrupt")


@pytest.mark.e2e
def test_error_unwritable_output_folder(data, tmp_path):
    regular = tmp_path / "a_file"
    regular.write_text("not a folder")
    assert_user_error(error_run(data, out=regular / "out"), str(regular / "out"), "output folder")


@pytest.mark.e2e
def test_non_finite_loss_stops_and_keeps_earlier_checkpoints(data, trained, tmp_path):
    """Resuming a run whose checkpoint holds a NaN weight: the first loss is NaN, training stops
    with a clear message and a non-zero exit, and the checkpoint in the folder is not replaced."""
    straight, _ = trained
    good = load(straight / "checkpoint.pth")
    poisoned = dict(good)
    poisoned["model"] = {k: v.clone() for k, v in good["model"].items()}
    poisoned["model"]["head.weight"][0, 0] = float("nan")
    poisoned["epoch"] = 1  # continue at epoch 2
    out = tmp_path / "out"
    out.mkdir()
    kept = out / "checkpoint.pth"
    torch.save(poisoned, kept)
    before = kept.read_bytes()

    result = error_run(data, "--epochs", 4, "--resume", kept, out=out)
    assert result.returncode not in (0, 2), result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(r"loss became nan or inf in epoch 2", result.stderr), result.stderr
    assert kept.read_bytes() == before
    assert not (out / "best_checkpoint.pth").exists()


def test_a_non_finite_loss_stops_training_before_its_update(data):
    from ToE.common.errors import TrainingStopped

    run = deit_run("--data-path", data, "--epochs", 2, *TINY, *FAST, *PLAIN, "--no-model-ema", "--log-interval", 1)
    before = {k: v.clone() for k, v in run.task.model.state_dict().items()}
    run.task.criterion = lambda images, outputs, targets: outputs.sum() * float("inf")
    with pytest.raises(TrainingStopped, match="loss became nan or inf in epoch 0"):
        run.train_epoch(0)
    after = run.task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), \
        "with --log-interval 1 a non-finite loss must not update the weights"


def test_non_finite_loss_is_caught_between_log_intervals(data):
    """The loss is read every --log-interval steps (no host sync per step): a NaN in step 2 of 6
    with an interval of 4 still stops the epoch, at step 4, before that step's update."""
    from ToE.common.errors import TrainingStopped

    run = deit_run("--data-path", data, "--epochs", 4, *TINY, *FAST, *PLAIN, "--no-model-ema", "--log-interval", 4)
    steps = []

    def criterion(images, outputs, targets):
        steps.append(len(steps) + 1)
        loss = torch.nn.functional.cross_entropy(outputs, targets)
        return loss * float("nan") if len(steps) == 2 else loss

    run.task.criterion = criterion
    with pytest.raises(TrainingStopped, match="epoch 3"):
        run.train_epoch(3)
    assert steps == [1, 2, 3, 4], "stopped at the first read after the NaN, not before, not later"


# -- distributed ------------------------------------------------------------------------------

DUMP_WRAPPER = """
import os, runpy, sys
import torch
sys.path.insert(0, {root!r})
import ToE.common.lifecycle as lifecycle

fit = lifecycle.Run.fit

def fit_and_dump(self):
    fit(self)
    torch.save(self.task.model.state_dict(), os.path.join({out!r}, f"rank{{self.env.rank}}.pt"))

lifecycle.Run.fit = fit_and_dump
sys.argv = [{main!r}] + sys.argv[1:]
runpy.run_path({main!r}, run_name="__main__")
"""


@pytest.mark.e2e
def test_two_process_gloo_run(data, tmp_path):
    """torchrun with 2 CPU processes: completes, both end with the same weights (also the saved
    ones), and distributed evaluation counts each of the 7 (odd) validation images exactly once."""
    out = tmp_path / "out"
    out.mkdir()
    wrapper = tmp_path / "dump_ranks.py"  # ToE/deit/main.py, plus a per-rank dump of the final weights
    wrapper.write_text(DUMP_WRAPPER.format(root=str(ROOT), out=str(out), main=str(MAIN)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(wrapper)]
    result = ok(run_main("--data-path", data, "--output_dir", out, "--epochs", 2, "--dist-eval", *TINY, *FAST,
                         *PLAIN, "--expansion-step", "0", "1", "--keep-rate", "0.5", "1.0", cmd=torchrun))
    assert "2 process(es)" in result.stdout
    records = read_log(out)
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["test_images"] == NUM_VAL for r in records)
    rank0, rank1 = load(out / "rank0.pt"), load(out / "rank1.pt")
    assert_same_tensors(rank0, rank1, "rank 0 vs rank 1")
    checkpoint = load(out / "checkpoint.pth")
    assert_same_tensors(rank0, checkpoint["model"], "rank 0 vs checkpoint")
    assert set(checkpoint["rng"]) == {"0", "1"}  # each process's RNG stream is saved for resume

    # without --dist-eval each process evaluates the whole set: still every image once, not once per process
    torchrun[torchrun.index("--master_port") + 1] = str(free_port())
    whole = ok(run_main("--data-path", data, "--eval", "--resume", out / "checkpoint.pth", "--no-dist-eval", *TINY,
                        *FAST, *PLAIN, cmd=torchrun))
    assert f"Accuracy on {NUM_VAL} test images" in whole.stdout, whole.stdout


# -- run scripts ------------------------------------------------------------------------------

SCRIPTS = {"tiny": ("deit_tiny_patch16_224", 256), "small": ("deit_small_patch16_224", 256),
           "base": ("deit_base_patch16_224", 128)}


def flag(argv, name, count=1):
    i = argv.index(name)
    values = argv[i + 1:i + 1 + count]
    return values[0] if count == 1 else values


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
@pytest.mark.e2e
def test_run_script_usage_without_data_and_output(size, tmp_path):
    script = RUN_DIR / f"imagenet_{size}_run1.sh"
    for args in ([], ["/data/imagenet"]):
        result = run_script(script, *args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "usage:" in result.stderr and f"imagenet_{size}_run1.sh DATA OUT" in result.stderr
        assert "Traceback" not in result.stderr


def split_command(result):
    """The printed command as (launcher part, main.py arguments)."""
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.strip())
    main_index = next(i for i, a in enumerate(argv) if a.endswith("main.py"))
    assert Path(argv[main_index]) == MAIN
    assert argv[0] == sys.executable
    return argv[:main_index], argv[main_index + 1:]


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
@pytest.mark.e2e
def test_run_script_builds_the_published_command(size, tmp_path):
    from ToE.deit.main import parse_args

    model, batch = SCRIPTS[size]
    # from ToE/deit with the relative path, as the README says; no GPU visible
    result = run_script(f"run/imagenet_{size}_run1.sh", "/data/imagenet", "runs/x", "--epochs", "1", "--lr",
                        "1e-3", cwd=ROOT / "ToE" / "deit", DRY_RUN="1")
    launcher, main_argv = split_command(result)
    assert launcher == [sys.executable]  # one CPU process: main.py directly, no torchrun
    args = parse_args(main_argv)  # every flag is one main.py knows
    assert args.model == model and args.batch_size == batch and args.seed == 3407
    assert args.expansion_step == [0, 100, 200] and args.keep_rate == [0.5, 0.75, 1.0]
    assert args.initialization_keep_rate == 0.25 and args.expansion_multiple_stage == 2
    assert args.device == "cpu" and args.auto_resume  # re-running the script continues the run
    assert args.data_path == "/data/imagenet" and args.output_dir == "runs/x"
    assert args.epochs == 1 and args.lr == 1e-3  # extra arguments pass through and win
    # DeiT defaults for the rest
    assert args.opt == "adamw" and args.sched == "cosine" and args.mixup == 0.8 and args.model_ema


@pytest.mark.e2e
def test_run_script_environment_and_any_cwd(tmp_path):
    script = RUN_DIR / "imagenet_small_run1.sh"
    result = run_script(script, "d a t a", "out", "--model-kwargs", "drop_rate=0.1", cwd=tmp_path, DRY_RUN="1",
                        NPROC="3", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.7", MASTER_PORT="29411")
    launcher, main_argv = split_command(result)
    assert Path(launcher[1]) == MAIN.parents[1] / "common" / "torchrun.py"  # torchrun that keeps exit 3 (preempted)
    assert flag(launcher, "--nproc_per_node") == "3"
    assert flag(launcher, "--nnodes") == "2" and flag(launcher, "--node_rank") == "1"
    assert flag(launcher, "--master_addr") == "10.0.0.7" and flag(launcher, "--master_port") == "29411"
    assert flag(main_argv, "--data-path") == "d a t a"
    assert main_argv[-2:] == ["--model-kwargs", "drop_rate=0.1"]

    # several processes on one machine: torchrun on a free-picked local port
    launcher, _ = split_command(run_script(script, "d", "o", cwd=tmp_path, DRY_RUN="1", NPROC="2"))
    assert flag(launcher, "--nproc_per_node") == "2" and flag(launcher, "--nnodes") == "1"
    assert flag(launcher, "--master_addr") == "127.0.0.1"
    assert 1024 <= int(flag(launcher, "--master_port")) < 65536

    # several machines need the address of machine 0; the process count must be a number
    bad = run_script(script, "d", "o", cwd=tmp_path, DRY_RUN="1", NNODES="2")
    assert bad.returncode == 2 and "MASTER_ADDR" in bad.stderr
    bad = run_script(script, "d", "o", cwd=tmp_path, DRY_RUN="1", NPROC="zero")
    assert bad.returncode == 2 and "NPROC" in bad.stderr


@pytest.mark.e2e
def test_run_script_missing_data_folder_is_one_line(tmp_path):
    result = run_script(RUN_DIR / "imagenet_base_run1.sh", tmp_path / "nope", tmp_path / "out", cwd=tmp_path)
    assert_user_error(result, str(tmp_path / "nope"))


@pytest.mark.e2e
def test_run_script_really_trains(data, tmp_path):
    """The script itself (no dry run) from another folder, with the tiny model passed through."""
    out = tmp_path / "out"
    result = run_script(RUN_DIR / "imagenet_tiny_run1.sh", data, out, *TINY, *FAST, *PLAIN, "--epochs", "1",
                        "--no-model-ema", "--global-batch", "4", cwd=tmp_path)  # the recipe's 1,024: too many here
    assert result.returncode == 0, result.stderr
    records = read_log(out)
    assert len(records) == 1 and records[0]["kept_tokens"] == NUM_PATCHES // 2
    assert load(out / "checkpoint.pth")["args"]["seed"] == 3407


# -- run summary and embedded data ------------------------------------------------------------

@pytest.mark.e2e
def test_summary_reports_each_stage_against_its_flop_prediction(trained):
    out, _ = trained
    result = ok(subprocess.run([sys.executable, "-m", "ToE.common.summary", str(out)], cwd=ROOT, env=child_env(),
                               capture_output=True, text=True, timeout=120))
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| \d ", line)]
    kept = token_select.kept_tokens_per_stage(NUM_PATCHES, KEEP_RATE, INIT_RATE, MULTIPLE)
    assert [row.split("|")[3].strip() for row in rows] == [f"{k} of {NUM_PATCHES}" for k in kept]
    assert rows[-1].split("|")[5].strip() == "baseline"  # the full-token stage
    # each reducing stage: the full stage's median epoch time over its own, from log.txt by hand
    records = read_log(out)
    seconds = {stage: [r["epoch_seconds"] for r in records if r["stage"] == stage] for stage in (1, 2, 3)}
    for row, stage in zip(rows[:2], (1, 2)):
        expected = np.median(seconds[3]) / np.median(seconds[stage])
        assert row.split("|")[5].strip() == f"{expected:.2f}x"
    predicted = [float(row.split("|")[6].strip().rstrip("x")) for row in rows]
    flops = [token_select.vit_step_flops(NUM_PATCHES, 32, 2, kept_patches=k, patch_dim=3 * PATCH * PATCH,
                                         num_classes=CLASSES) for k in kept]
    assert predicted == [round(flops[2] / f, 2) for f in flops]
    assert "Top-1 on the held-out images" in result.stdout


def test_embedded_digits_are_an_imagenet_layout_folder(tmp_path):
    from ToE.common.digits import build_digits

    root = build_digits(str(tmp_path / "digits"), size=16)
    counts = {split: {c: len(os.listdir(tmp_path / "digits" / split / c))
                      for c in os.listdir(tmp_path / "digits" / split)}
              for split in ("train", "val")}
    assert sorted(counts["train"]) == sorted(counts["val"]) == [str(d) for d in range(10)]
    assert sum(counts["train"].values()) == 1500 and sum(counts["val"].values()) == 297
    image = Image.open(next((tmp_path / "digits" / "val" / "3").iterdir()))
    assert image.size == (16, 16) and image.mode == "RGB"
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "digits" / "train" / "0").iterdir())
    build_digits(root, size=16)  # complete: left alone
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "digits" / "train" / "0").iterdir()) == before



def test_embedded_digits_replace_an_other_size_build(tmp_path):
    from ToE.common.digits import build_digits

    # (a folder without the builder's stamp is refused, untouched: tests/test_hardening_lost.py)
    partial = tmp_path / "digits" / "train" / "0"
    build_digits(str(tmp_path / "digits"), size=8)
    files = sorted(partial.iterdir())
    assert {Image.open(f).size for f in files} == {(8, 8)}
    build_digits(str(tmp_path / "digits"), size=12)  # another size: rebuilt
    assert {Image.open(f).size for f in partial.iterdir()} == {(12, 12)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no staging folder left

# -- distillation -------------------------------------------------------------------------------

def test_distillation_loss_variants():
    from ToE.deit.losses import DistillationLoss

    torch.manual_seed(0)
    teacher = torch.nn.Linear(6, 3)
    images, targets = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
    cls, dist = torch.randn(4, 3), torch.randn(4, 3)
    ce = torch.nn.CrossEntropyLoss()
    none = DistillationLoss(ce)
    assert torch.allclose(none(images, cls, targets), ce(cls, targets))
    assert torch.allclose(none(images, (cls, dist), targets), (ce(cls, targets) + ce(dist, targets)) / 2)
    hard = DistillationLoss(ce, teacher, "hard", alpha=0.5)
    expected = 0.5 * ce(cls, targets) + 0.5 * ce(dist, teacher(images).argmax(1))
    assert torch.allclose(hard(images, (cls, dist), targets), expected)
    soft = DistillationLoss(ce, teacher, "soft", alpha=1.0, tau=2.0)
    # a student that copies the teacher has zero soft-distillation loss
    assert soft(images, (cls, teacher(images).detach()), targets).abs().item() < 1e-6


@pytest.mark.e2e
def test_distilled_deit_trains_with_a_teacher_from_disk(data, tmp_path):
    teacher = timm.create_model("test_resnet", pretrained=False, num_classes=CLASSES)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    out = tmp_path / "distilled"
    student = ["--model", "deit_tiny_distilled_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2",
               "num_heads=2", "--input-size", str(INPUT), "--patch-size", str(PATCH)]
    ok(run_main("--data-path", data, "--output_dir", out, "--epochs", 1, *student, *FAST, *PLAIN, *SCHEDULE,
                "--distillation-type", "hard", "--teacher-model", "test_resnet", "--teacher-path",
                tmp_path / "teacher.pth"))
    record = read_log(out)[-1]
    assert record["kept_tokens"] == token_select.kept_tokens_per_stage(NUM_PATCHES, KEEP_RATE, INIT_RATE)[0]
    fresh = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=CLASSES,
                              img_size=INPUT, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2)
    fresh.load_state_dict(load(out / "checkpoint.pth")["model"], strict=True)
    missing = run_main("--data-path", data, "--output_dir", tmp_path / "x", "--epochs", 1, *student, *FAST, *PLAIN,
                       "--distillation-type", "soft", "--teacher-model", "test_resnet",
                       "--teacher-path", tmp_path / "nope.pth")
    assert missing.returncode == 2 and "teacher checkpoint" in missing.stderr and "Traceback" not in missing.stderr


def test_distilled_student_consults_the_teacher(data, tmp_path):
    """The trainer switches timm's distilled DeiT to return (class, distillation) logits in training,
    so the distillation head learns from the teacher (timm averages the two heads otherwise)."""
    from ToE.common.lifecycle import EpochPlan
    from ToE.deit.main import parse_args
    from ToE.deit.trainer import DeiTTask

    teacher = timm.create_model("test_resnet", pretrained=False, num_classes=CLASSES)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    args = parse_args(["--data-path", str(data), "--model", "deit_tiny_distilled_patch16_224", "--model-kwargs",
                       "embed_dim=32", "depth=2", "num_heads=2", "--input-size", str(INPUT), "--patch-size",
                       str(PATCH), *FAST, *PLAIN, "--distillation-type", "hard", "--teacher-model", "test_resnet",
                       "--teacher-path", str(tmp_path / "teacher.pth")])
    from ToE.common.lifecycle import Run

    trainer = Run(args, DeiTTask).task
    calls = []
    trainer.criterion.teacher.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    images, targets = next(iter(trainer.train_loader(0, EpochPlan(batch=4), 0)))
    trainer.model.train()
    outputs = trainer.model(images)
    assert isinstance(outputs, tuple) and len(outputs) == 2
    trainer.criterion(images, outputs, targets)
    assert calls == [(images.shape[0], CLASSES)]
    trainer.model.eval()
    assert torch.is_tensor(trainer.model(images))  # evaluation: the averaged heads, as DeiT reports


def test_sparse_eval_reduces_the_model_and_its_ema_in_evaluation(data):
    """--sparse-eval: evaluation runs the current stage's token count, for the EMA copy too."""
    run = deit_run("--data-path", data, "--epochs", "4", *TINY, *FAST, *PLAIN, *SCHEDULE, "--sparse-eval",
                   "--model-ema")
    run.train_epoch(0)  # stage 1: 8 of 16 patch tokens
    for model in (run.task.model, run.model_ema.module):
        model.eval()
        assert model.token_select.current_stage == 1 and model.token_select.reducing
        model(torch.zeros(2, 3, INPUT, INPUT))
        assert model.token_select.last_index.shape == (2, 1 + 8)


@pytest.mark.e2e
def test_eval_sparse_eval_end_to_end(trained, data, tmp_path):
    """``--eval --sparse-eval --resume CKPT`` evaluates with the tokens of the checkpoint's stage."""
    out, _ = trained
    checkpoint = load(out / "checkpoint.pth")
    checkpoint["epoch"] = 0  # as if written at the end of epoch 0: stage 1, 8 of 16 patch tokens
    torch.save(checkpoint, tmp_path / "stage1.pth")
    common = ["--data-path", data, "--eval", "--resume", tmp_path / "stage1.pth", *TINY, *FAST, *PLAIN, *SCHEDULE]
    sparse, dense = ok(run_main(*common, "--sparse-eval")), ok(run_main(*common))
    pattern = r"Accuracy on (\d+) test images: top-1 ([\d.]+) %, top-5 [\d.]+ %, loss ([\d.]+)"
    sparse_match, dense_match = re.search(pattern, sparse.stdout), re.search(pattern, dense.stdout)
    assert sparse_match and dense_match, sparse.stdout + dense.stdout
    assert "sparse evaluation: 8 of 16 patch tokens (stage 1)" in sparse.stdout
    assert "sparse evaluation" not in dense.stdout

    # The same evaluation by hand: a fresh timm model, the operator in sparse-inference mode.
    model = timm.create_model(MODEL, num_classes=CLASSES, img_size=INPUT, patch_size=PATCH, **MODEL_KWARGS)
    model.load_state_dict(checkpoint["model"], strict=True)
    plain = copy.deepcopy(model).eval()
    toe = token_select.attach(model, token_select.TokenSelect([0, 2, 3], KEEP_RATE, INIT_RATE, MULTIPLE))
    toe.sparse_inference = True
    toe.update_current_stage(0)
    model.eval()
    from timm.data import create_transform
    from torchvision import datasets

    val = datasets.ImageFolder(str(data / "val"), transform=create_transform(INPUT, is_training=False,
                                                                            interpolation="bicubic"))
    images, targets = zip(*[val[i] for i in range(len(val))])
    images, targets = torch.stack(images), torch.tensor(targets)
    with torch.no_grad():
        logits, plain_logits = model(images), plain(images)
    assert toe.last_index.shape == (NUM_VAL, 1 + 8)
    assert not torch.allclose(logits, plain_logits), "sparse inference did not change the output"
    for match, out_logits in ((sparse_match, logits), (dense_match, plain_logits)):
        assert int(match.group(1)) == NUM_VAL
        acc1 = 100.0 * (out_logits.argmax(1) == targets).float().mean().item()
        loss = torch.nn.functional.cross_entropy(out_logits, targets).item()
        assert float(match.group(2)) == pytest.approx(acc1, abs=0.01)
        assert float(match.group(3)) == pytest.approx(loss, abs=1e-4)


# -- the published lr stepping (issue 28) --------------------------------------------------------------

def _published_deit_lrs(args, epochs: int):
    """The lr of every epoch as the published DeiT/ToE main.py trains it: timm's cosine created on the
    optimizer (which starts at warmup_lr), lr_scheduler.step(epoch) called AFTER each epoch."""
    from timm.scheduler import CosineLRScheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs, lr_min=args.min_lr, warmup_lr_init=args.warmup_lr,
                                  warmup_t=args.warmup_epochs, cycle_limit=1, t_in_epochs=True)
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])  # train_one_epoch(...)
        scheduler.step(epoch)
    return lrs


def _our_deit_lrs(args, epochs: int, start: int = 0):
    """The lr of every epoch as the run lifecycle trains the DeiT task: step(epoch) BEFORE each epoch, on
    a scheduler built afresh at ``start`` (a resumed run rebuilds it from the flags)."""
    from ToE.deit.trainer import DeiTTask

    task = object.__new__(DeiTTask)
    task.args = args
    task.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = task.build_scheduler()
    lrs = []
    for epoch in range(start, epochs):
        scheduler.step(epoch)
        lrs.append(task.optimizer.param_groups[0]["lr"])
    return lrs


def test_deit_small_recipe_trains_every_epoch_at_the_published_lr():
    from ToE.common.config import config_path
    from ToE.deit.main import parse_args

    args = parse_args(["-c", config_path("deit", "imagenet_small")])
    published = _published_deit_lrs(args, args.epochs)
    ours = _our_deit_lrs(args, args.epochs)
    assert ours == published  # all 300 epochs, exactly
    assert published[0] == published[1] == args.warmup_lr  # epochs 0 and 1 both at warmup_lr
    # a run resumed at any epoch trains the same sequence (the schedule is rebuilt from the epoch)
    for start in (1, 2, 5, 150, 299):
        assert _our_deit_lrs(args, args.epochs, start) == published[start:]
