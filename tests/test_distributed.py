"""Resume and distribution: the EMA on resume, 2-process resume, a change of process count,
failures inside a DataLoader worker or on one of two processes, and the mixed-precision step.

Multi-process runs are real ``torchrun`` launches of ``ToE/deit/main.py`` with 2 gloo processes
on the CPU.
"""

from __future__ import annotations

import math
import re
import sys
import time

import pytest
import torch
from helpers import (FAST, MAIN, PLAIN, TINY, assert_same_tensors, assert_user_error, deit_run, free_port, load, ok,
                     read_log, run_main, write_images)

# a traceback frame in the project's code (torchrun's own report names main.py, that is fine)
OUR_TRACEBACK = re.compile(r'File "[^"]*ToE/(common|deit)/')
# three stages in three epochs, so a resume after epoch 1 crosses a stage boundary
STAGES = ["--expansion-step", "0", "1", "2", "--keep-rate", "0.5", "0.75", "1.0"]


def torchrun(nproc: int = 2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(MAIN)]


def args(data, out, epochs=3, *extra):
    return ["--data-path", data, "--output_dir", out, "--epochs", epochs, *TINY, *FAST, *PLAIN, *STAGES, *extra]


@pytest.fixture(scope="module")
def two_process_runs(data, tmp_path_factory):
    """(straight 3 epochs, 2 epochs then stopped) on 2 processes."""
    straight, stopped = tmp_path_factory.mktemp("straight2"), tmp_path_factory.mktemp("stopped2")
    ok(run_main(*args(data, straight), cmd=torchrun()))
    ok(run_main(*args(data, stopped, 3, "--stop-after-epochs", 2), cmd=torchrun()))
    return straight, stopped


def copy_run(source, target):
    target.mkdir()
    for name in ("checkpoint.pth", "log.txt", "args.yaml"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


@pytest.mark.e2e
def test_two_process_resume_equals_the_uninterrupted_run(two_process_runs, data, tmp_path):
    straight, stopped = two_process_runs
    resumed = copy_run(stopped, tmp_path / "resumed")
    ok(run_main(*args(data, resumed), "--resume", resumed / "checkpoint.pth", cmd=torchrun()))
    a, b = load(straight / "checkpoint.pth"), load(resumed / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 2
    assert_same_tensors(a["model"], b["model"], "straight vs resumed on 2 processes")
    assert_same_tensors(a["model_ema"], b["model_ema"], "EMA straight vs resumed")
    assert [r["epoch"] for r in read_log(resumed)] == [0, 1, 2]
    assert b["world_size"] == 2 and set(b["rng"]) == {"0", "1"}


@pytest.mark.e2e
def test_resume_on_another_process_count_warns_and_gives_each_process_its_own_stream(two_process_runs, data,
                                                                                     tmp_path):
    _, stopped = two_process_runs
    # 2 processes -> 1
    fewer = copy_run(stopped, tmp_path / "fewer")
    result = ok(run_main(*args(data, fewer), "--resume", fewer / "checkpoint.pth"))
    assert "written by 2 process(es), this run has 1" in result.stdout
    assert load(fewer / "checkpoint.pth")["epoch"] == 2
    # 1 process -> 2: rank 1 must not take rank 0's saved stream (both would then draw the same
    # augmentations and end the epoch in the same state)
    single = tmp_path / "single"
    ok(run_main(*args(data, single, 3, "--stop-after-epochs", 2)))
    more = copy_run(single, tmp_path / "more")
    result = ok(run_main(*args(data, more), "--resume", more / "checkpoint.pth", cmd=torchrun()))
    assert "written by 1 process(es), this run has 2" in result.stdout
    rng = load(more / "checkpoint.pth")["rng"]
    assert not torch.equal(rng["0"]["torch"], rng["1"]["torch"])


@pytest.mark.e2e
def test_ema_resumed_from_a_checkpoint_without_one_starts_from_its_weights(data, tmp_path):
    out = tmp_path / "no_ema"
    ok(run_main(*args(data, out, 3, "--stop-after-epochs", 1, "--no-model-ema")))
    checkpoint = load(out / "checkpoint.pth")
    assert checkpoint["model_ema"] is None
    run = deit_run(*args(data, out, 3, "--resume", out / "checkpoint.pth", "--model-ema"))
    assert_same_tensors(run.model_ema.module.state_dict(), checkpoint["model"], "EMA vs loaded weights")


@pytest.mark.e2e
def test_error_inside_a_dataloader_worker_is_one_line(data, tmp_path):
    bad_data = write_images(tmp_path / "data")
    bad = bad_data / "train" / "class2" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    result = run_main(*args(bad_data, tmp_path / "out", 1), "--num_workers", 1)
    assert_user_error(result, str(bad))


@pytest.mark.e2e
def test_failure_on_one_of_two_processes_ends_both_with_one_message(data, tmp_path):
    """A bad image lands in one process's shard: that process names it, the other ends too
    (torchrun stops it, or it loses its peer and exits quietly), promptly."""
    bad_data = write_images(tmp_path / "data")
    bad = bad_data / "train" / "class1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    start = time.monotonic()
    result = run_main(*args(bad_data, tmp_path / "out", 1), cmd=torchrun(), timeout=180)
    assert result.returncode != 0
    assert time.monotonic() - start < 120
    assert result.stderr.count(f"error: cannot read image {bad}") == 1, result.stderr
    assert not OUR_TRACEBACK.search(result.stderr), "a process printed a traceback of ours"


@pytest.mark.e2e
def test_non_finite_loss_on_two_processes_stops_both_once(two_process_runs, data, tmp_path):
    _, stopped = two_process_runs
    out = copy_run(stopped, tmp_path / "poisoned")
    checkpoint = load(out / "checkpoint.pth")
    checkpoint["model"]["head.weight"][0, 0] = float("nan")
    torch.save(checkpoint, out / "checkpoint.pth")
    before = (out / "checkpoint.pth").read_bytes()
    result = run_main(*args(data, out), "--resume", out / "checkpoint.pth", cmd=torchrun(), timeout=180)
    assert result.returncode != 0
    assert result.stderr.count("training stopped: the loss became nan or inf in epoch 2") == 1, result.stderr
    assert not OUR_TRACEBACK.search(result.stderr)
    assert (out / "checkpoint.pth").read_bytes() == before


def test_bf16_autocast_step_on_the_cpu(data):
    """--amp-dtype bfloat16 runs the mixed-precision path on the CPU: blocks compute in bf16,
    the operator still keeps the scheduled tokens, the loss is finite."""
    trainer = deit_run("--data-path", data, "--epochs", 3, *TINY, *FAST, *PLAIN, *STAGES, "--amp-dtype", "bfloat16",
                       "--no-model-ema")
    seen = []
    # the qkv projection of block 1 (after the operator): autocast runs linear layers in bf16
    trainer.task.model.blocks[1].attn.qkv.register_forward_hook(
        lambda m, i, o: seen.append((o.dtype, o.shape[1])))
    records = []
    trainer.log = type("Log", (), {"write": lambda self, record, step=None: records.append(record),
                                "write_step": lambda self, record, image: None})()
    # the logged count must come from the forward passes, not from the schedule's arithmetic
    trainer.toe.kept_patch_tokens = lambda num_patches: 999
    trainer.train_epoch(0)
    assert {dtype for dtype, _ in seen} == {torch.bfloat16}
    assert 1 + 8 in {tokens for _, tokens in seen}  # training steps ran on 8 of 16 patch tokens
    assert records[0]["kept_tokens"] == 8 and math.isfinite(records[0]["train_loss"])


def test_rng_state_holds_only_this_process_device():
    from ToE.common.checkpoint import rng_state, set_rng_state

    state = rng_state(torch.device("cpu"))
    assert "cuda" not in state
    expected = torch.rand(3)
    set_rng_state({**state, "cuda": torch.zeros(16, dtype=torch.uint8)}, torch.device("cpu"))  # ignored on CPU
    assert torch.equal(torch.rand(3), expected)
