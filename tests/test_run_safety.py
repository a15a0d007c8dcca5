"""The shared run foundation under misuse: bad flags, reused folders, resumes that change the run,
interruptions, damaged run folders. Each case gives the right result or one line ``error: ...``
with exit code 2.

Flag checks run in-process through ``ToE.deit.main.cli`` (they fail before any work, so they are
fast); runs that write a folder are real subprocesses of ``ToE/deit/main.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import (FAST, MAIN, NUM_PATCHES, PLAIN, ROOT, SCHEDULE, TINY, assert_user_error, child_env, load, ok,
                     read_log, run_main, write_images)


@pytest.fixture(scope="module")
def two_epochs(data, tmp_path_factory):
    """A finished 2-epoch run (stages 1 and 2 of the test schedule); tests copy what they change."""
    out = tmp_path_factory.mktemp("two_epochs")
    ok(run_main("--data-path", data, "--output_dir", out, "--epochs", 2, *TINY, *FAST, *PLAIN, *SCHEDULE))
    return out


def cli_error(capsys, *argv) -> str:
    """Run the trainer's command line in-process; expect one ``error:`` line and exit code 2."""
    from ToE.deit.main import cli

    with pytest.raises(SystemExit) as exit_info:
        cli([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def base(data, epochs=4):
    return ["--data-path", data, "--epochs", epochs, *TINY, *FAST, *PLAIN, *SCHEDULE]


# -- flag values ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needles", [
    (["--epochs", "0"], ["--epochs", "positive integer", "not 0"]),
    (["--epochs", "-3"], ["--epochs", "not -3"]),
    (["--batch-size", "0"], ["--batch-size", "not 0"]),
    (["--lr", "-5e-4"], ["--lr", "not -5e-4"]),            # the value as typed, exponent included
    (["--lr", "0"], ["--lr", "not 0"]),
    (["--lr", "fast"], ["--lr", "'fast' is not a number"]),
    (["--patch-size", "0"], ["--patch-size", "not 0"]),
    (["--input-size", "18"], ["--input-size 18", "multiple of the patch size 4"]),
    (["--opt", "adamx"], ["--opt adamx", "unknown optimizer"]),
    (["--sched", "cosin"], ["--sched cosin", "cosine"]),
    (["--aa", "rand-x9"], ["--aa rand-x9"]),
    (["--stop-after-epochs", "0"], ["--stop-after-epochs", "not 0"]),
    (["--start_epoch", "4"], ["--start_epoch 4", "nothing to train"]),
    (["--eval"], ["--eval", "--resume"]),
    (["--amp-dtype", "float16"], ["float16", "GPU"]),
    (["--scale", "0.9", "0.5"], ["--scale 0.9 0.5"]),
    (["--smoothing", "1.5"], ["--smoothing", "not 1.5"]),
])
def test_bad_flag_value_is_one_line_before_any_work(data, capsys, flags, needles):
    line = cli_error(capsys, *base(data), *flags)
    for needle in needles:
        assert needle in line, (needle, line)


def test_stage_the_run_never_reaches_is_a_warning(data, capsys):
    from ToE.deit.main import cli

    cli([str(a) for a in base(data, epochs=1)] + ["--warmup-epochs", "1"])  # stages at 0, 2, 3: two are past the end
    out = capsys.readouterr().out
    assert "warning: ToE stages starting at epochs [2, 3] are never reached in 1 epochs" in out
    # "--epochs 1" is the smoke test of any recipe (timm, DeiT): a warmup as long as the run is a warning
    assert "warning: --warmup-epochs 1 is as long as the run (--epochs 1)" in out
    assert "nothing will be saved" in out  # no --output_dir: said at the start


@pytest.mark.parametrize("model, needle", [
    ("vit_relpos_small_patch16_224", "VisionTransformerRelPos"),   # relative position bias per block
    ("eva02_tiny_patch14_224", "Eva"),                              # rotary embeddings
    ("beit_base_patch16_224", "Beit"),                              # relative position bias
    ("test_resnet", "ViT"),                                         # no patch embedding at all
])
def test_models_toe_cannot_reduce_are_refused_by_name(data, capsys, model, needle):
    line = cli_error(capsys, "--data-path", data, "--epochs", 1, *FAST, *PLAIN, "--model", model,
                     "--input-size", 16 if model == "test_resnet" else 224, "--check-only")
    assert model in line and needle in line, line


# -- nothing already written is lost -----------------------------------------------------------

@pytest.mark.e2e
def test_new_run_cannot_overwrite_another_runs_checkpoint(data, two_epochs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("checkpoint.pth", "log.txt"):
        (out / name).write_bytes((two_epochs / name).read_bytes())
    before = (out / "checkpoint.pth").read_bytes()
    line = cli_error(capsys, *base(data), "--output_dir", out)
    assert str(out) in line and "--resume" in line and "--overwrite" in line
    assert (out / "checkpoint.pth").read_bytes() == before
    # a resume from another run's checkpoint into this folder is a new run too
    line = cli_error(capsys, *base(data), "--output_dir", out, "--resume", two_epochs / "checkpoint.pth")
    assert "holds another run" in line
    # --overwrite: the old run's files go, the new run starts a fresh log
    ok(run_main(*base(data, epochs=1), "--output_dir", out, "--overwrite"))
    assert [r["epoch"] for r in read_log(out)] == [0]
    assert load(out / "checkpoint.pth")["epoch"] == 0


@pytest.mark.e2e
def test_demo_never_deletes_a_folder_it_did_not_create(tmp_path):
    user_folder = tmp_path / "my_results"
    user_folder.mkdir()
    (user_folder / "thesis.tex").write_text("months of work")
    env = {**child_env(), "DEMO_OUT": str(user_folder), "DEMO_EPOCHS": "3"}
    result = subprocess.run(["bash", str(ROOT / "run" / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "was not made by run/demo.sh" in result.stderr
    assert (user_folder / "thesis.tex").read_text() == "months of work"
    unknown = subprocess.run(["bash", str(ROOT / "run" / "demo.sh"), "detr"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown trainer 'detr'" in unknown.stderr


@pytest.mark.e2e
def test_kill_between_log_and_checkpoint_does_not_duplicate_the_epoch(data, two_epochs, tmp_path):
    """Epoch 2 logged (log.txt and TensorBoard), then killed before its checkpoint: the resume
    trains epoch 2 again, and the log and TensorBoard hold it once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "out"
    out.mkdir()
    for name in ("checkpoint.pth", "log.txt", "args.yaml"):
        (out / name).write_bytes((two_epochs / name).read_bytes())
    records = read_log(out)
    lost = {**records[-1], "epoch": 2, "train_loss": 123.0}  # the epoch the kill cut off
    with open(out / "log.txt", "a") as handle:
        handle.write(json.dumps(lost) + "\n")
    writer = SummaryWriter(str(out / "tensorboard"))
    for record in records + [lost]:
        writer.add_scalar("train_loss", record["train_loss"], record["epoch"])
    writer.close()

    ok(run_main(*base(data, epochs=4), "--output_dir", out, "--resume", out / "checkpoint.pth",
                "--stop-after-epochs", 1))
    logged = read_log(out)
    assert [r["epoch"] for r in logged] == [0, 1, 2]
    assert logged[2]["train_loss"] != 123.0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train_loss")
    assert [e.step for e in scalars] == [0, 1, 2]
    assert scalars[-1].value == pytest.approx(logged[2]["train_loss"], rel=1e-6)


@pytest.mark.parametrize("with_output", [False, True])
def test_ctrl_c_says_what_was_saved(data, tmp_path, capsys, monkeypatch, with_output):
    from ToE.common.lifecycle import Run
    from ToE.deit.main import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "train_steps", interrupted)
    extra = ["--output_dir", tmp_path / "out"] if with_output else []
    with pytest.raises(SystemExit) as exit_info:
        cli([str(a) for a in [*base(data), *extra]])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    if with_output:
        assert "no checkpoint was written, nothing to resume" in err
    else:
        assert "nothing was saved (no --output_dir)" in err
    assert "intact" not in err


# -- resume does what the user meant -----------------------------------------------------------

@pytest.mark.e2e
def test_resume_with_more_epochs_extends_the_cosine_schedule(data, two_epochs, tmp_path):
    """2 epochs planned and done; resumed with --epochs 4: epoch 2 trains at the cosine over 4
    epochs, not at the minimum learning rate of the finished 2-epoch cycle (DeiT steps it after
    each epoch, as published: epoch 2 at the 4-epoch cosine's lr(1))."""
    from timm.scheduler import create_scheduler_v2

    from ToE.common.schedule import stepped_after_epoch

    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes((two_epochs / "checkpoint.pth").read_bytes())
    result = ok(run_main(*base(data, epochs=4), "--output_dir", out, "--resume", out / "checkpoint.pth",
                         "--stop-after-epochs", 1))
    assert "extending the run from 2 to 4 epochs" in result.stdout
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=4, warmup_epochs=0, min_lr=1e-5)
    scheduler.step(stepped_after_epoch(2))
    expected = optimizer.param_groups[0]["lr"]
    assert expected > 1e-4  # far from the 1e-5 floor the old schedule had reached
    assert read_log(out)[0]["lr"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.e2e
def test_resume_refusals_name_the_stored_and_the_given_value(data, two_epochs, tmp_path, capsys):
    checkpoint = two_epochs / "checkpoint.pth"
    line = cli_error(capsys, *base(data, epochs=2), "--resume", checkpoint)
    assert "finished run" in line and "Raise --epochs" in line
    line = cli_error(capsys, *base(data), "--resume", checkpoint, "--keep-rate", "0.4", "0.7", "1.0")
    assert "--keep-rate 0.5 0.75 1.0" in line and "--keep-rate 0.4 0.7 1.0" in line
    line = cli_error(capsys, *base(data), "--resume", checkpoint, "--model-kwargs", "embed_dim=48", "depth=2",
                     "num_heads=2")
    assert "--model-kwargs" in line and "embed_dim=32" in line and "embed_dim=48" in line
    line = cli_error(capsys, *base(data), "--resume", checkpoint, "--lr", "2e-3")
    assert "--lr 0.001" in line and "--lr 0.002" in line
    # a stored 4-epoch plan resumed with --epochs 3 would bend the schedule
    stored = load(checkpoint)
    stored["args"]["epochs"] = stored["args"]["run_epochs"] = 5  # the flag and the epochs the run planned
    stored["epoch"] = 0
    torch.save(stored, tmp_path / "five.pth")
    line = cli_error(capsys, *base(data, epochs=3), "--resume", tmp_path / "five.pth")
    assert "--epochs 5" in line and "--epochs 3" in line
    # other data: another class count
    four_classes = write_images(tmp_path / "four")
    (four_classes / "train" / "class3").mkdir()
    (four_classes / "val" / "class3").mkdir()
    for split in ("train", "val"):
        for image in (four_classes / split / "class0").glob("*.png"):
            (four_classes / split / "class3" / image.name).write_bytes(image.read_bytes())
    line = cli_error(capsys, *base(four_classes), "--resume", checkpoint)
    assert "3 classes" in line and "4" in line


@pytest.mark.e2e
def test_eval_sparse_eval_uses_the_checkpoints_own_schedule(data, two_epochs, capsys):
    """The checkpoint ended in epoch 1, stage 1 of its stages at 0 2 3 with --keep-rate 0.5 0.75
    1.0: 8 of 16 tokens. The command line's own schedule would put epoch 1 in a full-token stage."""
    from ToE.deit.main import cli

    cli([str(a) for a in ["--data-path", data, *TINY, *FAST, *PLAIN, "--eval", "--sparse-eval",
                          "--resume", two_epochs / "checkpoint.pth", "--expansion-step", "0", "1",
                          "--keep-rate", "0.25", "1.0"]])
    out = capsys.readouterr().out
    assert f"sparse evaluation: 8 of {NUM_PATCHES} patch tokens (stage 1)" in out


# -- the run summary on damaged or unfinished folders -----------------------------------------

def summary(folder):
    return subprocess.run([sys.executable, "-m", "ToE.common.summary", str(folder)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
def test_summary_of_damaged_or_unfinished_run_folders(data, two_epochs, tmp_path):
    assert_user_error(summary(tmp_path / "missing"), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(summary(empty), "no log.txt")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "args.yaml").write_bytes((two_epochs / "args.yaml").read_bytes())
    (damaged / "log.txt").write_text((two_epochs / "log.txt").read_text() + '{"epoch": 2, "sta')
    assert_user_error(summary(damaged), "line 3 is damaged")
    (damaged / "args.yaml").unlink()
    assert_user_error(summary(damaged), "no args.yaml")

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "args.yaml").write_text((two_epochs / "args.yaml").read_text().replace("epochs: 2", "epochs: 5"))
    (unfinished / "log.txt").write_bytes((two_epochs / "log.txt").read_bytes())
    result = ok(summary(unfinished))
    assert "UNFINISHED: 2 of 5 epochs" in result.stdout


@pytest.mark.e2e
def test_check_only_checks_and_trains_nothing(data, tmp_path):
    out = tmp_path / "out"
    result = ok(run_main(*base(data), "--output_dir", out, "--check-only"))
    assert "check passed" in result.stdout
    assert not (out / "log.txt").exists() and not (out / "checkpoint.pth").exists()
    assert MAIN.exists()


@pytest.mark.e2e
def test_run_script_with_several_processes_reports_a_flag_error_once(data, tmp_path):
    """NPROC=2: the script checks the flags in one process before torchrun starts, so a mistake
    is one line, not one per process plus torchrun's traceback."""
    env = {**child_env(), "NPROC": "2", "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(ROOT / "ToE" / "deit" / "run" / "imagenet_tiny_run1.sh"), str(data),
                             str(tmp_path / "out"), "--epochs", "0"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert_user_error(result, "--epochs", "not 0")
