"""Long runs on shared clusters (DeiT's trainer): a time limit in the middle of an epoch,
--auto-resume with other flags, two torchrun "nodes" on the loopback address, the Slurm script.
SIGTERM mid-epoch and kill -9 during a checkpoint write are checked for every trainer in
tests/test_lifecycle.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import (FAST, MAIN, RECIPE, ROOT, TINY, assert_same_tensors, assert_user_error, child_env, free_port,
                     load, ok, run_main)

STAGES = ["--expansion-step", "0", "1", "2", "--keep-rate", "0.5", "0.75", "1.0"]


def args(data, out, *extra):
    # the full recipe: RandAugment (Python RNG), mixup/cutmix (NumPy), drop path (torch), repeated
    # augmentation, EMA; --log-interval 1: the stop check at every step
    return ["--data-path", data, "--output_dir", out, "--epochs", 3, *TINY, *FAST, *RECIPE, *STAGES,
            "--log-interval", 1, *extra]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    ok(run_main(*args(data, out)))
    return load(out / "checkpoint.pth")


@pytest.mark.e2e
def test_time_limit_stops_with_a_checkpoint_and_the_run_continues_exactly(data, straight, tmp_path):
    out = tmp_path / "out"
    stopped = run_main(*args(data, out, "--auto-resume", "--time-limit", "0.05"))
    assert stopped.returncode == 3, stopped.stderr
    assert "the --time-limit is near" in stopped.stderr
    ok(run_main(*args(data, out, "--auto-resume")))
    assert_same_tensors(straight["model"], load(out / "checkpoint.pth")["model"], "straight vs time-limited")


@pytest.mark.e2e
def test_auto_resume_refuses_a_checkpoint_of_other_flags(data, straight, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    torch.save(straight | {"epoch": 0}, out / "checkpoint.pth")
    result = run_main(*args(data, out, "--auto-resume", "--keep-rate", "0.4", "0.7", "1.0"))
    assert_user_error(result, "--keep-rate 0.5 0.75 1.0", "--keep-rate 0.4 0.7 1.0")
    both = run_main(*args(data, out, "--auto-resume", "--resume", out / "checkpoint.pth"))
    assert_user_error(both, "--auto-resume", "--resume")


@pytest.mark.parametrize("text, seconds", [("3600", 3600), ("90m", 5400), ("1.5h", 5400), ("3:50:00", 13800),
                                           ("05:30", 330), ("1-00:00:00", 86400)])
def test_time_limit_formats(text, seconds):
    from ToE.common.preemption import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.e2e
def test_two_loopback_nodes_equal_one_node_with_two_processes(data, tmp_path):
    """torchrun --nnodes 2 with c10d rendezvous on 127.0.0.1, one gloo process per "node", against
    torchrun --nproc_per_node 2 on one node: the same final weights."""
    common = ["--data-path", data, "--epochs", 2, *TINY, *FAST, "--no-repeated-aug", "--aa", "none", "--reprob", 0,
              "--mixup", 0, "--cutmix", 0, *STAGES]
    one_node = tmp_path / "one_node"
    single = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), str(MAIN)]
    ok(run_main(*common, "--output_dir", one_node, cmd=single))

    two_nodes = tmp_path / "two_nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    launches = []
    for _node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "toe-test",
                   str(MAIN), *map(str, common), "--output_dir", str(two_nodes)]
        env = {**child_env(), "GLOO_SOCKET_IFNAME": "lo"}
        launches.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    for launch in launches:
        out, err = launch.communicate(timeout=240)
        assert launch.returncode == 0, err
    assert_same_tensors(load(one_node / "checkpoint.pth")["model"], load(two_nodes / "checkpoint.pth")["model"],
                        "one node x 2 processes vs 2 nodes x 1 process")
    assert os.path.isfile(two_nodes / "log.txt")


FAKE_SLURM = {
    # srun: run the task here (its options dropped); scancel --signal=USR1: signal the job's
    # processes (torchrun ignores it, the training processes catch it); scontrol: hostnames and a
    # requeue that leaves a mark
    "srun": '#!/usr/bin/env bash\nwhile [ "${1#-}" != "$1" ]; do echo "$1" >> "$FAKE_SLURM_DIR/srun_options"; shift; '
            'done\nexec "$@"\n',
    # (only this test's trainer, whose --output_dir is under FAKE_SLURM_DIR: never another run on the machine)
    "scancel": '#!/usr/bin/env bash\npkill -USR1 -f "python.*ToE/deit/main.py.*$FAKE_SLURM_DIR" || true\n',
    "scontrol": '#!/usr/bin/env bash\nif [ "$1" = requeue ]; then echo "$2" > "$FAKE_SLURM_DIR/requeued"; '
                'else echo 127.0.0.1; fi\n',
}


@pytest.mark.e2e
def test_slurm_script_checkpoints_on_usr1_requeues_and_the_next_start_continues(data, tmp_path):
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**child_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path),
           "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable, "SLURM_SUBMIT_DIR": str(ROOT)}
    out = tmp_path / "out"
    flags = ["--data-path", data, "--output_dir", out, "--epochs", 12, *TINY, *FAST, *RECIPE, *STAGES]
    command = ["bash", str(ROOT / "run" / "slurm.sh"), str(MAIN), *map(str, flags)]
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (out / "log.txt").exists() and time.monotonic() < deadline:  # epoch 0 finished
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # what Slurm's --signal=B:USR1@... does before the time limit
    output, _ = job.communicate(timeout=180)
    assert job.returncode == 0, output
    assert (tmp_path / "requeued").read_text().strip() == "7", output
    # the node's cores reach the torchrun task (srun does not inherit sbatch's --cpus-per-task)
    assert "--cpus-per-task=32" in (tmp_path / "srun_options").read_text().split()
    stopped_at = load(out / "checkpoint.pth")["epoch"]
    assert stopped_at < 11, "the run was not stopped before its end"

    env["MASTER_PORT"] = str(free_port())
    restart = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    straight = tmp_path / "straight"
    ok(run_main(*[a if a != out else straight for a in flags]))
    assert_same_tensors(load(straight / "checkpoint.pth")["model"], load(out / "checkpoint.pth")["model"],
                        "straight vs Slurm-preempted and requeued")
