"""Issue 31: Slurm preemption on every cluster, whatever its process tracking.

``run/slurm.sh`` runs under stand-in ``srun``/``scancel``/``scontrol`` (``FAKE_SLURM`` below) that
deliver signals the way Slurm's two process-tracking plugins do:

- ``pgid`` (proctrack/pgid): ``scancel --signal`` reaches each task's process group only, i.e.
  torchrun; torchrun starts its training processes in sessions of their own, so they see the signal
  only if torchrun passes it on (``ToE/common/torchrun.py`` forwards SIGUSR1);
- ``cgroup`` (proctrack/cgroup): every process of the job's steps gets it (the training processes
  then get it twice: directly and forwarded; a stop is a flag set once).

Each srun task starts as the leader of its own process group (as slurmstepd starts tasks), and the
stand-in srun honours ``--kill-on-bad-exit=1``: when a task fails it sends SIGTERM to the job's other
processes (as the tracking mode reaches them) and SIGKILL after ``FAKE_KILL_WAIT`` seconds (Slurm's
KillWait). The stand-in scontrol records a requeue. The run is DeiT's main.py with the tiny ViT of
``helpers.TINY`` on CPU processes (gloo).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, MAIN, ROOT, TINY, child_env, free_port
from PIL import Image

# One stand-in for srun, scancel and scontrol (what it does follows its name). State goes to
# $FAKE_SLURM_DIR: srun_options, tasks (one pid per node), task_exits, scancel (what was signalled),
# requeued, killed_on_bad_exit.
FAKE_SLURM = r'''
import os, signal, subprocess, sys, time

STATE = os.environ["FAKE_SLURM_DIR"]
MODE = os.environ.get("FAKE_PROCTRACK", "cgroup")


def write(name, text, mode="a"):
    with open(os.path.join(STATE, name), mode) as handle:
        handle.write(text)


def tasks():
    with open(os.path.join(STATE, "tasks")) as handle:
        return [int(line) for line in handle.read().split()]


def parents():
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    table[int(entry)] = int(handle.read().rsplit(")", 1)[-1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return table


def tree(root, table):
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += [child for child, parent in table.items() if parent == pid]
    return found


def send(task_pids, signum):
    """What Slurm signals for a step: the tasks' process groups (pgid) or all their processes (cgroup)."""
    reached = []
    table = parents() if MODE == "cgroup" else {}
    for task in task_pids:
        try:
            if MODE == "pgid":
                os.killpg(task, signum)
                reached.append(f"group {task}")
            else:
                for pid in tree(task, table):
                    os.kill(pid, signum)
                    reached.append(str(pid))
        except ProcessLookupError:
            pass
    return reached


def srun(argv):
    options = []
    while argv and argv[0].startswith("-"):
        options.append(argv.pop(0))
    write("srun_options", "\n".join(options) + "\n")
    kill_on_bad_exit = "--kill-on-bad-exit=1" in options or "--kill-on-bad-exit" in options
    nodes = int(os.environ.get("SLURM_NNODES", "1"))
    running = []
    for node in range(nodes):
        env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0")
        running.append(subprocess.Popen(argv, env=env, start_new_session=True))  # a task leads its own group
    write("tasks", "".join(f"{task.pid}\n" for task in running), "w")
    codes, kill_at = {}, None
    while len(codes) < len(running):
        for node, task in enumerate(running):
            if node not in codes and task.poll() is not None:
                codes[node] = 128 - task.returncode if task.returncode < 0 else task.returncode
                write("task_exits", f"{node} {codes[node]}\n")
                if codes[node] != 0 and kill_on_bad_exit and kill_at is None:
                    others = [t.pid for n, t in enumerate(running) if n not in codes]
                    reached = send(others, signal.SIGTERM)
                    write("killed_on_bad_exit", f"node {node} exit {codes[node]}: SIGTERM {reached}\n")
                    kill_at = time.monotonic() + float(os.environ.get("FAKE_KILL_WAIT", "3"))
        if kill_at is not None and time.monotonic() > kill_at:
            send([t.pid for n, t in enumerate(running) if n not in codes], signal.SIGKILL)
            kill_at = float("inf")
        time.sleep(0.05)
    sys.exit(max(codes.values()))


def scancel(argv):
    name = next(a.split("=", 1)[1] for a in argv if a.startswith("--signal="))
    write("scancel", f"{name} {MODE}: {send(tasks(), getattr(signal, 'SIG' + name))}\n")


def scontrol(argv):
    if argv[:1] == ["requeue"]:
        write("requeued", argv[1] + "\n")
    else:  # show hostnames LIST
        print("127.0.0.1")


{"srun": srun, "scancel": scancel, "scontrol": scontrol}[os.path.basename(sys.argv[0])](sys.argv[1:])
'''

EPOCHS = 4
BATCH = 2


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """600 training images of 16 px: 300 steps an epoch at batch 2 (about 2 s), so that a signal sent
    shortly after epoch 0 lands inside epoch 1."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 200), ("val", 3)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray((rng.random((16, 16, 3)) * 90 + 80 * c).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def fake_slurm(tmp_path: Path, mode: str, nodes: int = 1):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scancel", "scontrol"):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{FAKE_SLURM}")
        (bin_dir / name).chmod(0o755)
    env = {**child_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path),
           "FAKE_PROCTRACK": mode, "FAKE_KILL_WAIT": "3", "SLURM_JOB_ID": "31", "SLURM_NNODES": str(nodes),
           "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    for key in ("SLURM_RESTART_COUNT", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES", "DRY_RUN"):
        env.pop(key, None)
    return env


def start_job(data, out, env):
    flags = ["--data-path", data, "--output_dir", out, "--epochs", EPOCHS, *TINY, *FAST, "--batch-size", BATCH,
             "--log-interval", 1, "--no-model-ema"]
    command = ["bash", str(ROOT / "run" / "slurm.sh"), str(MAIN), *map(str, flags)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, job, seconds: float):
    deadline = time.monotonic() + seconds
    while not path.exists():
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"{path.name} did not appear (job exit {job.poll()}):\n{job.communicate()[0]}")
        time.sleep(0.05)


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["pgid", "cgroup"])
def test_usr1_checkpoints_mid_epoch_exits_3_and_requeues(many_images, tmp_path, mode):
    """Slurm's --signal=B:USR1 reaches the batch script; it scancels USR1 to the job's steps. Under
    pgid tracking only torchrun gets it (the old script had torchrun ignore it, so the run trained on
    to its end); now torchrun forwards it, the training process writes a checkpoint inside epoch 1,
    exits 3, torchrun passes the 3 on, srun ends with it and the script requeues the job."""
    env = fake_slurm(tmp_path, mode)
    out = tmp_path / "out"
    job = start_job(many_images, out, env)
    wait_for(out / "checkpoint.pth", job, 60)  # epoch 0 finished: evaluated, logged, saved
    time.sleep(0.5)  # into epoch 1 (about 2 s long)
    job.send_signal(signal.SIGUSR1)  # what Slurm's --signal=B:USR1@300 does before the time limit
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 0, output
    assert read(tmp_path / "requeued").split() == ["31"], output
    assert read(tmp_path / "task_exits").split() == ["0", "3"], output  # node 0's torchrun: exit 3
    assert "stopped with exit 3; requeueing job 31" in output
    assert "SIGUSR1 received in epoch 1 after step" in output, output
    reached = read(tmp_path / "scancel")
    if mode == "pgid":  # only the task's process group: the worker got it from torchrun
        assert reached.startswith("USR1 pgid: ['group "), reached
    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    position = checkpoint.get("position")
    assert position is not None and position["epoch"] == 1 and 0 < position["step"], position
    assert "--kill-on-bad-exit=1" in read(tmp_path / "srun_options").split()


@pytest.mark.e2e
def test_sigterm_without_the_stop_signal_checkpoints_and_is_not_requeued(many_images, tmp_path):
    """scancel (or a preemption) sends SIGTERM to the batch script and the job's steps. The script used to
    end at once (an untrapped TERM), with no word of what happened; now it waits for the training
    processes, which write a checkpoint inside the epoch, and does not requeue: a cancel stays a cancel
    (the time limit comes with the USR1 first, and requeues)."""
    env = fake_slurm(tmp_path, "pgid")
    out = tmp_path / "out"
    job = start_job(many_images, out, env)
    wait_for(out / "checkpoint.pth", job, 60)
    time.sleep(0.5)  # into epoch 1
    job.send_signal(signal.SIGTERM)  # Slurm signals the batch script and every step
    subprocess.run([str(tmp_path / "bin" / "scancel"), "--signal=TERM", "31"], env=env, check=True)
    output, _ = job.communicate(timeout=90)
    assert "[slurm] SIGTERM" in output and "not requeued" in output, output
    assert not (tmp_path / "requeued").exists(), output
    position = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True).get("position")
    assert position is not None and position["epoch"] == 1, (position, output)


@pytest.mark.e2e
def test_a_node_that_dies_ends_the_job(many_images, tmp_path):
    """Two nodes; node 1 dies mid-training: its training process freezes (holding its connections, as
    a hung or unreachable node does: node 0 then waits in its next collective call) and its torchrun
    is killed. srun's --kill-on-bad-exit=1 ends node 0 (SIGTERM, then SIGKILL after KillWait): the job
    ends within seconds with a failure and is not requeued (the old --kill-on-bad-exit=0 left node 0
    waiting until the collective's timeout, 30 minutes for gloo)."""
    env = fake_slurm(tmp_path, "cgroup", nodes=2)
    out = tmp_path / "out"
    job = start_job(many_images, out, env)
    frozen = []
    try:
        wait_for(out / "args.yaml", job, 90)  # written as training starts
        time.sleep(1.0)  # inside epoch 0: both nodes in their step loop
        node1 = int(read(tmp_path / "tasks").split()[1])
        # node 1's processes: its torchrun (the task) and the training process it started
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(node1)], capture_output=True, text=True)
        frozen = [int(pid) for pid in children.stdout.split()]
        assert frozen, "node 1 has no training process"
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        os.kill(node1, signal.SIGKILL)
        killed = time.monotonic()
        try:
            job.wait(timeout=30)  # (not communicate: the frozen process holds the output pipe open)
        except subprocess.TimeoutExpired:
            pass
        ended_after = time.monotonic() - killed
    finally:
        for pid in frozen:
            for signum in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
        if job.poll() is None:
            job.kill()
    output, _ = job.communicate(timeout=30)
    assert job.returncode != 0, output
    print(f"the job ended {ended_after:.1f} s after node 1 died")
    assert ended_after < 20, f"the job took {ended_after:.0f} s to end after node 1 died\n{output}"
    assert "node 1 exit 137" in read(tmp_path / "killed_on_bad_exit"), output
    assert not (tmp_path / "requeued").exists(), output
    node0 = int(read(tmp_path / "tasks").split()[0])
    alive = subprocess.run(["ps", "-o", "pid=", "--ppid", str(node0)], capture_output=True, text=True).stdout.split()
    assert not alive, f"node 0's training processes are still running: {alive}"


@pytest.mark.e2e
def test_torchrun_forwards_usr1_to_every_worker(tmp_path):
    """ToE/common/torchrun.py passes SIGUSR1 on to each training process, which torchrun starts in a
    session of its own (so a signal to torchrun's process group misses them)."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, signal, sys, time\n"
        "folder = sys.argv[1]\n"
        "rank = os.environ['RANK']\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda *a: got.append(1))\n"
        "open(os.path.join(folder, f'ready{rank}'), 'w').write(f'{os.getsid(0)}')\n"
        "deadline = time.monotonic() + 30\n"
        "while not got and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "open(os.path.join(folder, f'got{rank}'), 'w').write(str(bool(got)))\n")
    launcher = subprocess.Popen([sys.executable, str(ROOT / "ToE" / "common" / "torchrun.py"), "--standalone",
                                 "--nproc_per_node", "2", str(worker), str(tmp_path)], cwd=ROOT, env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for rank in (0, 1):
        wait_for(tmp_path / f"ready{rank}", launcher, 60)
    sessions = {int((tmp_path / f"ready{rank}").read_text()) for rank in (0, 1)}
    assert os.getsid(launcher.pid) not in sessions  # the workers are in sessions of their own
    launcher.send_signal(signal.SIGUSR1)  # torchrun alone, as pgid tracking delivers it
    output, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, output
    assert [(tmp_path / f"got{rank}").read_text() for rank in (0, 1)] == ["True", "True"], output
