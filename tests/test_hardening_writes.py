"""Interrupted and failing writes (issue 27): every way a run stops says what its output folder
really holds (read from the files), an interrupted or failed checkpoint write leaves the previous
file intact and no ``.tmp``, a full disk is one line naming the file, the space and the fix, a stop
signal during the set-up is one line and exit 3, and under torchrun a clean preemption ends with
exit 3 and rank 0's line instead of torchrun's report of a crash."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, MAIN, PLAIN, ROOT, TINY, child_env, free_port, load

STAGES = ["--expansion-step", "0", "1", "2", "--keep-rate", "0.5", "0.75", "1.0"]


def flags(data, out, epochs=2, *extra):
    return [str(a) for a in ["--data-path", data, "--output_dir", out, "--epochs", epochs, *TINY, *FAST, *PLAIN,
                             *STAGES, *extra]]


def stderr_lines(text: str):
    return [line for line in text.splitlines() if line.strip()]


def failing_save(monkeypatch, name: str, nth: int, error: BaseException) -> None:
    """torch.save fails on the ``nth`` write of ``name`` (checkpoint.pth, best_checkpoint.pth) after
    writing part of the file, as a Ctrl-C or a full disk in the middle of a write does."""
    real, calls = torch.save, {}

    def save(obj, file, *args, **kwargs):  # a path, or a file opened for writing
        target = os.path.basename(getattr(file, "name", str(file))).removesuffix(".tmp")
        calls[target] = calls.get(target, 0) + 1
        if target == name and calls[target] == nth:
            part = b"PK\x03\x04 half a checkpoint"
            file.write(part) if hasattr(file, "write") else Path(file).write_bytes(part)
            raise error
        return real(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def run_cli(argv, capsys):
    from ToE.deit.main import cli

    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# -- what was saved: read from the files, the same for every stop ------------------------------

@pytest.mark.e2e
def test_ctrl_c_during_the_best_checkpoint_write_tells_what_the_folder_holds(data, tmp_path, capsys, monkeypatch):
    """Epoch 0 is the best (forced): Ctrl-C while best_checkpoint.pth is written. The message must
    match the files on disk (the old code said "no checkpoint was written" beside a checkpoint.pth)
    and no partial .tmp may be left."""
    from ToE.common.lifecycle import Run

    save = Run._save
    monkeypatch.setattr(Run, "_save", lambda self, epoch, is_best=False, position=None: save(self, epoch, True,
                                                                                              position))
    failing_save(monkeypatch, "best_checkpoint.pth", 1, KeyboardInterrupt())
    out = tmp_path / "out"
    code, _, err = run_cli(flags(data, out), capsys)
    assert code == 130
    assert not list(out.glob("*.tmp")), "a partial checkpoint was left behind"
    if (out / "checkpoint.pth").exists():
        epoch = load(out / "checkpoint.pth")["epoch"]
        assert f"checkpoint.pth holds the run to the end of epoch {epoch}" in err, err
        assert "no checkpoint was written" not in err
    else:
        assert "no checkpoint was written, nothing to resume" in err, err


@pytest.mark.e2e
def test_ctrl_c_during_a_later_checkpoint_write_keeps_the_previous_one(data, tmp_path, capsys, monkeypatch):
    failing_save(monkeypatch, "checkpoint.pth", 2, KeyboardInterrupt())  # epoch 1's
    out = tmp_path / "out"
    code, _, err = run_cli(flags(data, out), capsys)
    assert code == 130
    assert not list(out.glob("*.tmp")), "a partial checkpoint was left behind"
    assert load(out / "checkpoint.pth")["epoch"] == 0
    line = stderr_lines(err)[-1]
    assert line.startswith("interrupted: ") and f"{out / 'checkpoint.pth'} holds the run to the end of epoch 0" in line
    assert "--auto-resume" in line


@pytest.mark.e2e
def test_stop_after_epochs_says_what_was_saved(data, tmp_path, capsys):
    from ToE.deit.main import cli

    out = tmp_path / "out"
    cli(flags(data, out, 3, "--stop-after-epochs", 1))
    printed = capsys.readouterr().out
    assert (f"stopped after --stop-after-epochs 1: {out / 'checkpoint.pth'} holds the run to the end of epoch 0"
            in printed), printed


def test_saved_state_reads_the_files(tmp_path):
    from ToE.common.checkpoint import saved_state

    assert saved_state("") == "nothing was saved (no --output_dir)"
    assert saved_state(str(tmp_path)) == "no checkpoint was written, nothing to resume"
    resume = str(tmp_path / "elsewhere.pth")
    assert f"{resume} is unchanged" in saved_state(str(tmp_path), resume)
    torch.save({"epoch": 3, "position": {"epoch": 5, "step": 12}}, tmp_path / "checkpoint.pth")
    torch.save({"epoch": 2}, tmp_path / "best_checkpoint.pth")
    text = saved_state(str(tmp_path))
    assert text.startswith(f"{tmp_path / 'checkpoint.pth'} holds the run to step 12 of epoch 5 (best_checkpoint.pth: "
                           "the end of epoch 2); continue with the same command and --auto-resume")
    (tmp_path / "checkpoint.pth").write_bytes(b"not a checkpoint")
    assert "a state this trainer cannot read" in saved_state(str(tmp_path), advice=False)


# -- failing writes: one line, the previous checkpoint intact, no partial file -------------------

@pytest.mark.e2e
def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(data, tmp_path, capsys,
                                                                               monkeypatch):
    failing_save(monkeypatch, "checkpoint.pth", 2, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "out"
    code, _, err = run_cli(flags(data, out), capsys)
    lines = stderr_lines(err)
    assert code == 2 and len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"error: cannot write {out / 'checkpoint.pth'}: no space left on the device of {out}")
    assert "needed" in line and "Free space there, or pass another --output_dir" in line
    assert f"{out / 'checkpoint.pth'} holds the run to the end of epoch 0" in line
    assert load(out / "checkpoint.pth")["epoch"] == 0
    assert not list(out.glob("*.tmp"))


@pytest.mark.e2e
def test_full_disk_on_a_real_small_filesystem(data, tmp_path):
    """A tmpfs that holds epoch 0's outputs but not one more checkpoint (mounting needs root: skipped
    where it is refused)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mount / "out"
        first = subprocess.run([sys.executable, str(MAIN), *flags(data, out, 2, "--stop-after-epochs", 1)], cwd=ROOT,
                               env=child_env(), capture_output=True, text=True, timeout=240)
        assert first.returncode == 0, first.stderr
        before = (out / "checkpoint.pth").read_bytes()
        used = shutil.disk_usage(mount).used
        subprocess.run(["mount", "-o", f"remount,size={used + 64 * 1024}", str(mount)], check=True)
        result = subprocess.run([sys.executable, str(MAIN), *flags(data, out, 2, "--auto-resume")], cwd=ROOT,
                                env=child_env(), capture_output=True, text=True, timeout=240)
        lines = stderr_lines(result.stderr)
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "no space left on the device" in lines[0] and "--output_dir" in lines[0]
        assert (out / "checkpoint.pth").read_bytes() == before, "the previous checkpoint changed"
        assert not list(out.glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("code, needle", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
                                          (errno.EIO, "(EIO)")])
def test_a_failed_write_keeps_the_old_file_and_names_the_fix(tmp_path, code, needle):
    from ToE.common.checkpoint import replacing
    from ToE.common.errors import WriteFailed

    path = tmp_path / "args.yaml"
    path.write_text("old\n")
    with pytest.raises(WriteFailed) as failed:
        with replacing(str(path)) as tmp:
            Path(tmp).write_text("half")
            raise OSError(code, os.strerror(code))
    message = str(failed.value)
    assert message.startswith(f"cannot write {path}: ") and needle in message.lower() + message
    assert "--output_dir" in message
    assert path.read_text() == "old\n" and not list(tmp_path.glob("*.tmp"))


# -- a stop signal while the run sets up ----------------------------------------------------------

SIGNAL_IN_SET_UP = """
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
import ToE.common.lifecycle as lifecycle

original = lifecycle.init_distributed


def init_distributed(*args, **kwargs):  # the set-up (after the resume file is read, before the data)
    os.kill(os.getpid(), signal.{name})
    return original(*args, **kwargs)


lifecycle.init_distributed = init_distributed
sys.argv = [{main!r}] + sys.argv[1:]
runpy.run_path({main!r}, run_name="__main__")
"""


@pytest.mark.e2e
@pytest.mark.parametrize("name, earlier_run", [("SIGTERM", False), ("SIGUSR1", True)])
def test_stop_signal_before_training_is_one_line_and_exit_3(data, tmp_path, name, earlier_run):
    out = tmp_path / "out"
    if earlier_run:
        first = subprocess.run([sys.executable, str(MAIN), *flags(data, out, 2, "--stop-after-epochs", 1)], cwd=ROOT,
                               env=child_env(), capture_output=True, text=True, timeout=240)
        assert first.returncode == 0, first.stderr
    before = (out / "checkpoint.pth").read_bytes() if earlier_run else None
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(SIGNAL_IN_SET_UP.format(root=str(ROOT), main=str(MAIN), name=name))
    result = subprocess.run([sys.executable, str(wrapper), *flags(data, out, 2, "--auto-resume")], cwd=ROOT,
                            env=child_env(), capture_output=True, text=True, timeout=240)
    lines = stderr_lines(result.stderr)
    assert result.returncode == 3 and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith(f"stopped: {name} received before training started; ")
    if earlier_run:
        assert f"{out / 'checkpoint.pth'} holds the run to the end of epoch 0" in lines[0]
        assert (out / "checkpoint.pth").read_bytes() == before
    else:
        assert "no checkpoint was written, nothing to resume" in lines[0]
        assert not (out / "checkpoint.pth").exists()


def test_set_up_signals_raise_at_once_and_the_handlers_come_back():
    from ToE.common.preemption import StopSignal, StopWatch

    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(StopSignal, match="SIGUSR1 received"):
        with StopWatch.at_once():
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(1000):  # the handler runs between two bytecodes
                pass
    assert signal.getsignal(signal.SIGUSR1) == before


# -- torchrun: a clean preemption exits 3 with one line ------------------------------------------

@pytest.mark.e2e
def test_preemption_under_torchrun_through_the_run_script_exits_3_in_one_line(data, tmp_path):
    """NPROC=2 (torchrun, 2 gloo processes): --time-limit stops both after their first step. The
    job ends with exit 3 and rank 0's line, not torchrun's ChildFailedError report and exit 1."""
    out = tmp_path / "out"
    env = {**child_env(), "NPROC": "2", "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "",
           "MASTER_PORT": str(free_port())}
    result = subprocess.run(["bash", str(ROOT / "ToE" / "deit" / "run" / "imagenet_tiny_run1.sh"), str(data), str(out),
                             *flags(data, out, 3, "--time-limit", "0.05", "--log-interval", "1", "--global-batch",
                                    "8")[4:]], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=240)
    lines = stderr_lines(result.stderr)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert lines == [line for line in lines if line.startswith("stopped: ")] and len(lines) == 1, result.stderr
    assert "the --time-limit is near" in lines[0] and "holds the run to step 1 of epoch 0" in lines[0]
    assert load(out / "checkpoint.pth")["position"]["step"] == 1


@pytest.mark.parametrize("exitcodes, expected", [
    ([3, 3], 3), ([3, -signal.SIGTERM], 3), ([2, 1], 2), ([2, -signal.SIGTERM, 1], 2),
    ([1, 1], None), ([3, 1], None), ([3, -signal.SIGSEGV], None), ([-signal.SIGTERM], None), ([2, 3], None)])
def test_which_endings_keep_the_trainers_exit_code(exitcodes, expected):
    from ToE.common.torchrun import told_exit

    assert told_exit(exitcodes) == expected
