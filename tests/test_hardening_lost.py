"""Issue 27, lost data: builders that refuse a folder they did not make, one writer per output folder.

The builders (``python -m ToE.common.digits``, ``python -m ToE.yolos.digits_det``) replace only
an older build of their own (``ToE.common.digits.build_folder``); a run's writing process holds
``OUTPUT/.toe.lock`` (``ToE.common.lock``) and a second process is refused in one line naming it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FAST, PLAIN, ROOT, TINY, assert_user_error, child_env, deit_run, write_coco


def _module(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def _snapshot(root: Path):
    """Every file under ``root`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- builders ------------------------------------------------------------------------------------

def test_digits_builder_refuses_a_folder_of_the_users_files(tmp_path):
    photos = tmp_path / "photos"
    (photos / "2024").mkdir(parents=True)
    (photos / "me.jpg").write_bytes(b"\xff\xd8 a photo")
    (photos / "2024" / "beach.jpg").write_bytes(b"\xff\xd8 another")
    before = _snapshot(photos)
    line = assert_user_error(_module("ToE.common.digits", "--out", photos, "--size", 8), str(photos), "--out",
                             "delete")
    assert "did not write" in line
    assert _snapshot(photos) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no staging folder left


def test_digits_det_builder_refuses_a_coco_folder(tmp_path):
    coco = Path(write_coco(tmp_path / "coco"))
    before = _snapshot(coco)
    assert_user_error(_module("ToE.yolos.digits_det", "--out", coco), str(coco), "ToE.yolos.digits_det")
    assert _snapshot(coco) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco"]


def test_builders_take_an_empty_folder_and_replace_only_their_own_older_build(tmp_path):
    from ToE.common.digits import DONE_FILE, build_digits
    from ToE.common.errors import UserError
    from ToE.yolos.digits_det import build_digits_det

    out = tmp_path / "digits"
    out.mkdir()  # made by the user for it: nothing to lose
    build_digits(str(out), size=4)
    assert (out / DONE_FILE).read_text() == "4"
    build_digits(str(out), size=5, shift=True)  # an older build of its own: replaced
    assert (out / DONE_FILE).read_text() == "5 shift"
    with pytest.raises(UserError, match="another builder's"):  # the other builder's: left alone
        build_digits_det(str(out))
    assert (out / DONE_FILE).read_text() == "5 shift"


def test_digits_det_build_interrupted_leaves_nothing_half_written(tmp_path, monkeypatch):
    from ToE.yolos import digits_det

    calls = []
    real = digits_det._canvas

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(digits_det, "_canvas", interrupted)
    with pytest.raises(KeyboardInterrupt):
        digits_det.build_digits_det(str(tmp_path / "det"))
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging folder


# -- one writer per output folder ----------------------------------------------------------------

HOLD = ("import sys, time\nfrom ToE.common.lock import OutputLock\nassert OutputLock(sys.argv[1]).claim()\n"
        "print('held', flush=True)\ntime.sleep(120)\n")


def _holder(folder: Path) -> subprocess.Popen:
    """A process that holds the lock of ``folder`` (until killed)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, env=child_env(),
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    from ToE.common.errors import UserError
    from ToE.common.lock import OutputLock

    out = tmp_path / "out"
    out.mkdir()
    holder = _holder(out)
    try:
        line = assert_user_error(_module("ToE.common.lock", out), f"{out} is in use by pid {holder.pid} on ",
                                 "Wait for it to finish or pick another --output_dir")
        assert "(command " in line and "OutputLock" in line
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            OutputLock(str(out)).claim()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    from ToE.common.lock import LOCK_FILE, OutputLock
    from ToE.common.log import existing_run, remove_run_outputs

    out = tmp_path / "out"
    out.mkdir()
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert f'"pid": {holder.pid}' in (out / LOCK_FILE).read_text()  # left behind, naming the dead process
    assert _module("ToE.common.lock", out).returncode == 0
    lock = OutputLock(str(out))
    assert lock.claim() and f'"pid": {os.getpid()}' in (out / LOCK_FILE).read_text()
    # the lock file is neither a run of the folder nor a run output that --overwrite deletes
    assert existing_run(str(out)) == []
    remove_run_outputs(str(out))
    assert (out / LOCK_FILE).exists()
    lock.release()
    assert _module("ToE.common.lock", out).returncode == 0


def test_a_run_holds_its_folder_from_set_up(data, tmp_path):
    """A Run built in this process holds the lock before it reads or writes the folder; --eval does not
    take it and --check-only only looks."""
    out = tmp_path / "out"
    out.mkdir()
    run = deit_run("--data-path", data, *TINY, *FAST, *PLAIN, "--epochs", "1", "--output_dir", out)
    assert_user_error(_module("ToE.common.lock", out), f"pid {os.getpid()}")
    run.output_lock.release()
    assert _module("ToE.common.lock", out).returncode == 0


def test_check_only_on_a_folder_in_use_is_refused(data, tmp_path):
    """What the run scripts do before torchrun: --check-only looks at the lock (and takes none)."""
    from ToE.common.errors import UserError
    from ToE.common.lock import LOCK_FILE

    out = tmp_path / "out"
    out.mkdir()
    holder = _holder(out)
    try:
        with pytest.raises(UserError, match=f"in use by pid {holder.pid} "):
            deit_run("--data-path", data, *TINY, *FAST, *PLAIN, "--output_dir", out, "--auto-resume", "--check-only")
    finally:
        holder.kill()
        holder.wait()
    held = (out / LOCK_FILE).read_text()
    deit_run("--data-path", data, *TINY, *FAST, *PLAIN, "--output_dir", out, "--auto-resume", "--check-only")
    assert (out / LOCK_FILE).read_text() == held  # a check writes nothing


@pytest.mark.e2e
def test_the_same_training_twice_on_one_folder(data, tmp_path):
    """The same command submitted twice with --auto-resume while the first trains: the second is
    refused in one line naming the first's pid, and the first's files are untouched by it."""
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "ToE" / "deit" / "main.py"), "--data-path", str(data), *TINY, *FAST,
               *PLAIN, "--epochs", "400", "--output_dir", str(out), "--auto-resume"]
    first = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "args.yaml").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, "the first training ended before the test could run a second one"
        args_yaml = (out / "args.yaml").read_bytes()
        second = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120,
                                check=False)
        assert_user_error(second, f"is in use by pid {first.pid}", "--output_dir")
        assert first.poll() is None and (out / "args.yaml").read_bytes() == args_yaml
    finally:
        first.kill()
        first.wait()
