"""Issue 27, the scripts: every argument and variable of the shell scripts (run/demo.sh, run/slurm.sh,
the run scripts through ToE/common/launch.sh, ToE/lvvit/run/generate_labels.sh) is checked before
any work, a user's relative path means what it means where the user is, a Slurm job continues its
own checkpoint whatever it was started with, and the summary does not advise resuming a run that
is still training."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, assert_user_error, child_env, run_script, write_images

SLURM = ROOT / "run" / "slurm.sh"
DEIT_MAIN = ROOT / "ToE" / "deit" / "main.py"


def bash(script, *args, cwd=ROOT, timeout=120, **env):
    """``bash script args`` with ``env`` on top of a clean launcher environment (no DRY_RUN, NPROC, ...)."""
    environment = child_env()
    for key in ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "DRY_RUN", "DEMO_EPOCHS", "DEMO_OUT",
                "GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "CUDA_VISIBLE_DEVICES"):
        environment.pop(key, None)
    environment.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=timeout, check=False)


# -- run/demo.sh --------------------------------------------------------------------------------------
# (--check-only after the flags: the old demo, which took these, ends in seconds instead of training)
@pytest.mark.e2e
@pytest.mark.parametrize("env, flags, needle", [
    ({"DEMO_EPOCHS": "abc"}, [], "DEMO_EPOCHS is 'abc'"),
    ({"DEMO_EPOCHS": "0"}, [], "DEMO_EPOCHS is '0'"),
    ({"DEMO_EPOCHS": "2.5"}, ["et"], "DEMO_EPOCHS is '2.5'"),
    ({"DEMO_EPOCHS": "3"}, ["--epochs", "4"], "both set the length"),
    ({}, ["--output_dir", "elsewhere"], "Set DEMO_OUT"),
])
def test_demo_refuses_a_bad_variable_or_flag_before_any_work(tmp_path, env, flags, needle):
    """Bug caught: DEMO_EPOCHS=abc printed a traceback and trained the recipe's 48 epochs; --epochs
    beside DEMO_EPOCHS trained other stages than asked; --output_dir left the summary without a run."""
    out = tmp_path / "demo"
    result = bash(ROOT / "run" / "demo.sh", *flags, "--check-only", DEMO_OUT=str(out), **env)
    assert_user_error(result, needle)
    assert not out.exists(), "the demo set up its output folder before refusing"
    assert not (tmp_path / "elsewhere").exists() and not (ROOT / "elsewhere").exists()


@pytest.mark.e2e
def test_demo_out_is_read_from_where_the_user_is(tmp_path):
    """Bug caught: a relative DEMO_OUT was read from the repository root (the demo moves there), so
    a user in another folder found the run in the repository, or a folder of theirs refused."""
    result = bash(ROOT / "run" / "demo.sh", "--check-only", cwd=tmp_path, DEMO_OUT="mine", timeout=300)
    assert (tmp_path / "mine" / ".toe-demo").is_file(), result.stderr
    assert not (ROOT / "mine").exists()


# -- the run scripts (ToE/common/launch.sh) -----------------------------------------------------------
@pytest.mark.e2e
def test_a_mistyped_dry_run_never_starts_the_run(tmp_path):
    """Bug caught: DRY_RUN=yes (or true) was not 1, so the scripts started the real training."""
    script = ROOT / "ToE" / "deit" / "run" / "imagenet_tiny_run1.sh"
    for value in ("yes", "true"):
        assert_user_error(run_script(script, tmp_path / "missing", tmp_path / "out", cwd=tmp_path, DRY_RUN=value),
                          "DRY_RUN is", "DRY_RUN=1")
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("script, args, env, needle", [
    # a flag where OUT belongs: the LV-ViT script printed the DeiT usage (without LABELS), YOLOS took
    # --epochs for its init checkpoint
    ("ToE/lvvit/run/imagenet_small_run1.sh", ["/d", "/l", "--epochs", "3"], {}, "OUT is missing: '--epochs'"),
    ("ToE/yolos/run/coco_tiny_run1.sh", ["/c", "/o", "--epochs", "3"], {}, "INIT_CHECKPOINT is missing"),
    ("ToE/EfficientTrain/run/imagenet_tiny_run1.sh", ["", "/o"], {}, "DATA is missing"),
    # torchrun got a port it cannot bind
    ("ToE/deit/run/imagenet_tiny_run1.sh", ["/d", "/o"], {"MASTER_PORT": "99999"}, "MASTER_PORT is '99999'"),
])
def test_run_scripts_name_the_bad_argument_in_one_line(tmp_path, script, args, env, needle):
    result = run_script(ROOT / script, *args, cwd=tmp_path, DRY_RUN="1", **env)
    assert_user_error(result, needle)


# -- ToE/lvvit/run/generate_labels.sh -----------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    import timm
    import torch

    import ToE.lvvit  # noqa: F401  (registers digits_cnn)

    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("digits_cnn", num_classes=3).state_dict(), path)
    return path


@pytest.mark.e2e
def test_generate_labels_reads_relative_paths_from_where_the_user_is(tmp_path, teacher):
    """Bug caught: the script moved to the repository root first, so 'bash .../generate_labels.sh
    data/digits t.pth labels' labelled the repository's data/digits and wrote into the repository."""
    write_images(tmp_path / "mine")
    (tmp_path / "t.pth").write_bytes(teacher.read_bytes())
    script = ROOT / "ToE" / "lvvit" / "run" / "generate_labels.sh"
    tiny = ["--model", "digits_cnn", "--img-size", "32", "-b", "8", "--device", "cpu", "--num-workers", "0"]
    result = bash(script, "mine", "t.pth", "labels", *tiny, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "labels").rglob("*.pt"))) == 24
    assert not (ROOT / "labels").exists()
    # a missing input folder or a flag where OUT belongs: one line, nothing written
    assert_user_error(bash(script, "absent", "t.pth", "new", *tiny, cwd=tmp_path), "absent")
    assert_user_error(bash(script, "mine", "t.pth", "--model", "digits_cnn", cwd=tmp_path), "OUT is missing")
    assert not (tmp_path / "new").exists()


def test_generate_label_refuses_an_out_inside_the_images(tmp_path, teacher):
    """Bug caught: --out DATA/train/labels wrote the label folders among the class folders, so the
    data set gained a class. The checks come before the folder is scanned or the teacher loaded."""
    from ToE.common.errors import UserError
    from ToE.lvvit.generate_label import generate, parse_args

    data = write_images(tmp_path / "data")
    args = parse_args(["--model", "digits_cnn", "--checkpoint", str(teacher), "--data-path", str(data),
                       "--out", str(data / "train" / "labels"), "--img-size", "32", "--device", "cpu",
                       "--num-workers", "0"])
    with pytest.raises(UserError, match="inside the images of --data-path"):
        generate(args)
    assert not (data / "train" / "labels").exists()
    args.out = str(tmp_path / "labels")
    args.checkpoint = str(tmp_path / "absent.pth")
    args.data_path = str(tmp_path / "no-data")  # the checkpoint is named first: no folder is scanned before
    with pytest.raises(UserError, match="teacher checkpoint .*absent.pth not found"):
        generate(args)


# -- run/slurm.sh --------------------------------------------------------------------------------------
def slurm_command(result):
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    return words[words.index(str(DEIT_MAIN)) + 1:]


@pytest.mark.e2e
def test_slurm_without_nvidia_smi_says_no_gpu_was_found(tmp_path):
    """Bug caught: where nvidia-smi is absent (a CPU partition, a login node) or fails (no driver),
    the script ended with its exit code (127) and no word."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    paths = [f"{bin_dir}:{child_env()['PATH']}"]
    if shutil.which("nvidia-smi") is None:
        paths.append(child_env()["PATH"])  # absent as well
    for path in paths:
        result = bash(SLURM, DEIT_MAIN, "--output_dir", tmp_path / "out", DRY_RUN="1", PATH=path)
        assert_user_error(result, "no GPU found", "--device cpu")
        # the way out the message names: one CPU process per node
        cpu = bash(SLURM, DEIT_MAIN, "--output_dir", tmp_path / "out", "--device", "cpu", DRY_RUN="1", PATH=path)
        assert cpu.returncode == 0 and "--nproc_per_node 1" in cpu.stdout, cpu.stderr
    # what Slurm gave the job counts without nvidia-smi
    assert "--nproc_per_node 3" in bash(SLURM, DEIT_MAIN, "--output_dir", "o", DRY_RUN="1", PATH=paths[0],
                                        CUDA_VISIBLE_DEVICES="0,1,2").stdout
    assert_user_error(bash(SLURM, DEIT_MAIN, DRY_RUN="1", GPUS_PER_NODE="two"), "GPUS_PER_NODE is 'two'")


@pytest.mark.e2e
def test_slurm_resume_and_eval_jobs_and_their_requeue(tmp_path):
    """Bug caught: --auto-resume was always added, so a --resume FILE job was refused by the trainer.
    Now the first start continues FILE, a requeued start the job's own OUTPUT/checkpoint.pth (never
    FILE again), and --eval gets nothing added."""
    out, start = tmp_path / "out", tmp_path / "start.pth"
    env = {"DRY_RUN": "1", "GPUS_PER_NODE": "1"}
    first = slurm_command(bash(SLURM, DEIT_MAIN, "--output_dir", out, "--resume", start, **env))
    assert "--auto-resume" not in first and first[first.index("--resume") + 1] == str(start)
    # requeued before the job wrote a checkpoint: FILE again; after: its own checkpoint
    requeued = {"SLURM_RESTART_COUNT": "1", **env}
    again = slurm_command(bash(SLURM, DEIT_MAIN, "--output_dir", out, f"--resume={start}", **requeued))
    assert f"--resume={start}" in again and "--auto-resume" not in again
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"")
    own = slurm_command(bash(SLURM, DEIT_MAIN, "--output_dir", out, "--resume", start, "--epochs", "3", **requeued))
    # (--device cuda: the job has a GPU, so a torch that cannot use it is an error, not a CPU run)
    assert own == ["--device", "cuda", "--output_dir", str(out), "--epochs", "3", "--auto-resume"]
    evaluation = slurm_command(bash(SLURM, DEIT_MAIN, "--resume", start, "--eval", **env))
    assert "--auto-resume" not in evaluation
    # without --output_dir a requeue could only go back to FILE: refused up front
    assert_user_error(bash(SLURM, DEIT_MAIN, "--resume", start, **env), "needs --output_dir")
    # the plain job is as before
    assert slurm_command(bash(SLURM, DEIT_MAIN, "--output_dir", out, **env))[-1] == "--auto-resume"
    # a device the flags name is theirs
    for device in (["--device", "auto"], ["--device=cpu"]):
        assert "cuda" not in slurm_command(bash(SLURM, DEIT_MAIN, "--output_dir", out, *device, **env))


# -- the summary ----------------------------------------------------------------------------------------
def test_summary_does_not_advise_resuming_a_run_that_is_still_training(tmp_path):
    """Bug caught: the summary of a run in progress said UNFINISHED and 'continue with --resume',
    which starts a second writer of the folder. A process holding the folder's lock is training."""
    from ToE.common.lock import OutputLock
    from ToE.common.summary import summarise

    run = tmp_path / "run"
    run.mkdir()
    (run / "args.yaml").write_text(yaml.safe_dump({
        "model": "vit_tiny_patch16_224", "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        "input_size": 16, "patch_size": 4, "epochs": 5}))
    (run / "log.txt").write_text("".join(json.dumps({"epoch": e, "stage": 1, "kept_tokens": 16, "epoch_seconds": 1.0,
                                                     "test_acc1": 50.0}) + "\n" for e in range(2)))
    (run / "checkpoint.pth").write_bytes(b"")
    lock = OutputLock(str(run))
    assert lock.claim()
    try:
        status = summarise(str(run)).splitlines()[0]
    finally:
        lock.release()
    assert "IN PROGRESS: 2 of 5 epochs" in status and "--resume" not in status, status
    assert f"pid {os.getpid()}" in status
    finished_training = summarise(str(run)).splitlines()[0]  # the lock released: a stopped run
    assert "UNFINISHED: 2 of 5 epochs" in finished_training and "--resume" in finished_training
    (run / "checkpoint.pth").unlink()  # nothing to resume from: no advice to resume it
    assert "--resume" not in summarise(str(run)).splitlines()[0]
