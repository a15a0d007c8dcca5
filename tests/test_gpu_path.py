"""Issue 31: the first GPU run tells the truth. A GPU that the installed torch cannot use (a build for a
newer CUDA than the driver's, a CPU-only build) is one line that names both versions and the fix,
from ``run/gpu_check.sh`` and from a trainer; no silent fall back to the CPU; ``run/_env.sh`` installs
the torch build a user picks (TOE_TORCH, TOE_TORCH_INDEX).

The GPU is a stand-in ``nvidia-smi`` on PATH that lists one (torch on this machine sees none, as on a
node whose driver is older than torch's CUDA). On a machine where torch can use a GPU the stand-in
tells nothing about torch, so those tests are skipped there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, MAIN, ROOT, TINY, assert_user_error, child_env, write_images

from ToE.common import distributed
from ToE.common.errors import UserError

DRIVER, DRIVER_CUDA = "535.104.05", "12.2"
NVIDIA_SMI = f"""#!/usr/bin/env bash
case "$*" in
  *--query-gpu=name,driver_version*) echo "NVIDIA H100 80GB HBM3, {DRIVER}" ;;
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)" ;;
  "") echo "| NVIDIA-SMI {DRIVER}    Driver Version: {DRIVER}    CUDA Version: {DRIVER_CUDA} |" ;;
  *) exit 6 ;;
esac
"""
torch_sees_a_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="torch can use a GPU here: the stand-in "
                                      "nvidia-smi cannot make it unusable")


@pytest.fixture
def fake_gpu(tmp_path):
    """A PATH whose nvidia-smi lists an H100 with driver 535 (CUDA 12.2)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.fixture
def no_nvidia_smi(tmp_path):
    """A PATH without nvidia-smi (python, bash and the coreutils stay)."""
    bin_dir = tmp_path / "plain"
    bin_dir.mkdir()
    for name in ("bash", "env", "sha256sum", "cut", "cat", "dirname", "sort", "head"):
        found = subprocess.run(["bash", "-c", f"command -v {name}"], capture_output=True, text=True).stdout.strip()
        if found:
            (bin_dir / name).symlink_to(found)
    return str(bin_dir)


def environment(path, **extra):
    env = {**child_env(), "PATH": path, **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def one_line(result):
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout + result.stderr
    assert "Traceback" not in lines[0]
    return lines[0]


def names_the_problem(line):
    assert "NVIDIA H100 80GB HBM3" in line and f"driver {DRIVER}" in line and DRIVER_CUDA in line, line
    if torch.version.cuda:
        assert f"built for CUDA {torch.version.cuda}" in line, line
    else:
        assert "CPU-only build" in line, line
    assert "TOE_TORCH_INDEX=https://download.pytorch.org/whl/cu121" in line, line  # the newest build for CUDA 12.2


# -- in one process: the diagnosis ---------------------------------------------------------------------------
@pytest.fixture
def fresh_diagnosis():
    distributed._diagnosis.cache_clear()
    yield
    distributed._diagnosis.cache_clear()


@torch_sees_a_gpu
def test_a_listed_gpu_torch_cannot_use_is_named_with_both_cuda_versions(fake_gpu, monkeypatch, fresh_diagnosis):
    monkeypatch.setenv("PATH", fake_gpu)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    problem = distributed.cuda_problem()
    names_the_problem(problem)
    assert distributed.unusable_gpu() == problem
    for device in ("cuda", "auto"):  # a broken install is no reason to train on the CPU
        with pytest.raises(UserError, match=f"--device {device}: nvidia-smi lists"):
            distributed.resolve_device(device)
    assert distributed.resolve_device("cpu").type == "cpu"  # asked for


@torch_sees_a_gpu
def test_no_gpu_is_the_cpu_for_auto_and_an_error_for_cuda(no_nvidia_smi, monkeypatch, fresh_diagnosis):
    monkeypatch.setenv("PATH", no_nvidia_smi)
    assert distributed.cuda_problem().startswith("no GPU visible")
    assert distributed.unusable_gpu() is None
    assert distributed.resolve_device("auto").type == "cpu"
    assert "--device auto: no GPU visible" in distributed.device_note("auto", torch.device("cpu"))
    assert distributed.device_note("cpu", torch.device("cpu")) == ""
    with pytest.raises(UserError, match="--device cuda: no GPU visible .* pass --device cpu"):
        distributed.resolve_device("cuda")


@torch_sees_a_gpu
def test_gpus_hidden_on_purpose_are_no_gpu(fake_gpu, monkeypatch, fresh_diagnosis):
    """CUDA_VISIBLE_DEVICES="" (a CPU job on a GPU node) hides the GPUs nvidia-smi lists: no GPU, not a broken one."""
    monkeypatch.setenv("PATH", fake_gpu)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES='' hides the 1 GPU(s)" in distributed.cuda_problem()
    assert distributed.unusable_gpu() is None and distributed.resolve_device("auto").type == "cpu"


def test_the_suggested_build_is_the_newest_the_driver_runs():
    assert distributed._suggested_index("12.2") == "cu121"
    assert distributed._suggested_index("12.4") == "cu124"
    assert distributed._suggested_index("13.0") == "cu130"
    assert distributed._suggested_index("11.4") == ""  # older than every index: the message says cuXYZ
    assert distributed._suggested_index("") == ""


def test_a_gpu_without_kernels_in_this_build_is_unusable(monkeypatch):
    """torch sees the GPU, but its build has no code for the GPU's architecture (a new GPU, an old build)."""
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_50", "sm_60", "sm_70", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA B200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (10, 0))
    assert "has no kernels for NVIDIA B200 (compute capability 10.0" in distributed._arch_problem()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))  # sm_80 code runs on 8.6
    assert distributed._arch_problem() is None
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "compute_90"])  # PTX for 9.0 and newer
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (10, 0))
    assert distributed._arch_problem() is None


# -- the commands -----------------------------------------------------------------------------------------------
@torch_sees_a_gpu
@pytest.mark.e2e
def test_gpu_check_fails_in_one_line_when_torch_cannot_use_the_listed_gpu(fake_gpu, tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(["bash", str(ROOT / "run" / "gpu_check.sh"), "--out", str(out)], cwd=ROOT,
                            env=environment(fake_gpu), capture_output=True, text=True, timeout=120)
    line = one_line(result)
    assert result.returncode != 0 and line.startswith("gpu_check FAILED: nvidia-smi lists"), line
    names_the_problem(line)
    assert not out.exists() or not any(out.iterdir())  # failed before any check ran


@torch_sees_a_gpu
@pytest.mark.e2e
def test_a_trainer_with_device_cuda_stops_in_one_line_before_any_training(fake_gpu, no_nvidia_smi, tmp_path):
    data = write_images(tmp_path / "data")
    out = tmp_path / "out"
    flags = ["--data-path", data, "--output_dir", out, "--epochs", 1, *TINY, *FAST]
    flags[flags.index("--device") + 1] = "cuda"
    result = subprocess.run([sys.executable, str(MAIN), *map(str, flags)], cwd=ROOT, env=environment(fake_gpu),
                            capture_output=True, text=True, timeout=120)
    names_the_problem(assert_user_error(result, "--device cuda: nvidia-smi lists"))
    assert not result.stdout.strip()  # no start line: nothing trained
    assert not (out / "checkpoint.pth").exists() and not (out / "log.txt").exists()
    # no GPU at all: --device cuda is refused too, and says how to train on the CPU
    result = subprocess.run([sys.executable, str(MAIN), *map(str, flags)], cwd=ROOT, env=environment(no_nvidia_smi),
                            capture_output=True, text=True, timeout=120)
    assert_user_error(result, "--device cuda: no GPU visible", "--device cpu")
    assert not (out / "checkpoint.pth").exists()


@torch_sees_a_gpu
@pytest.mark.e2e
def test_device_auto_trains_on_the_cpu_only_where_there_is_no_gpu(fake_gpu, no_nvidia_smi, tmp_path):
    data = write_images(tmp_path / "data")
    flags = ["--data-path", data, "--epochs", 1, *TINY, *FAST]
    flags[flags.index("--device") + 1] = "auto"
    result = subprocess.run([sys.executable, str(MAIN), *map(str, flags)], cwd=ROOT, env=environment(no_nvidia_smi),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "1 process(es) on cpu (--device auto: no GPU visible" in result.stdout, result.stdout
    result = subprocess.run([sys.executable, str(MAIN), *map(str, flags)], cwd=ROOT, env=environment(fake_gpu),
                            capture_output=True, text=True, timeout=120)
    names_the_problem(assert_user_error(result, "--device auto: nvidia-smi lists", "--device cpu"))


# -- run/_env.sh: the torch build ---------------------------------------------------------------------------------
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls"
exit 0
"""


def fake_checkout(tmp_path: Path) -> Path:
    """run/_env.sh and pyproject.toml beside a .venv whose python records its calls (pip installs nothing)."""
    root = tmp_path / "checkout"
    (root / "run").mkdir(parents=True)
    (root / "run" / "_env.sh").write_text((ROOT / "run" / "_env.sh").read_text())
    (root / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("ruff", "#!/bin/sh\n"), ("pytest", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return root


def source_env(root: Path, **variables):
    env = {key: value for key, value in child_env().items() if not key.startswith("TOE_TORCH")}
    return subprocess.run(["bash", "-c", f"source {root}/run/_env.sh"], env={**env, **variables},
                          capture_output=True, text=True, timeout=60)


def calls(root: Path):
    path = root / ".venv" / "calls"
    lines = path.read_text().splitlines() if path.exists() else []
    path.unlink(missing_ok=True)
    return [line for line in lines if line.startswith("-m pip")]


@pytest.mark.e2e
def test_env_installs_the_torch_build_a_user_picks(tmp_path):
    root = fake_checkout(tmp_path)
    assert source_env(root).returncode == 0
    assert calls(root) == [f"-m pip install -q -e {root}[dev]"]  # torch is there: kept
    index = "https://download.pytorch.org/whl/cu121"
    result = source_env(root, TOE_TORCH="2.5.1", TOE_TORCH_INDEX=index)
    assert result.returncode == 0, result.stderr
    assert f"installing torch==2.5.1 torchvision from {index}" in result.stdout
    assert calls(root) == ["-m pip uninstall -y -q torch torchvision",
                           f"-m pip install -q --index-url {index} torch==2.5.1 torchvision"]
    # installed: the same values again, or none, keep it; another index reinstalls
    assert source_env(root, TOE_TORCH="2.5.1", TOE_TORCH_INDEX=index).returncode == 0 and calls(root) == []
    assert source_env(root).returncode == 0 and calls(root) == []
    assert source_env(root, TOE_TORCH_INDEX="https://download.pytorch.org/whl/cu124").returncode == 0
    assert calls(root)[-1] == ("-m pip install -q --index-url https://download.pytorch.org/whl/cu124 "
                               "torch==2.14.1 torchvision==0.29.1")
    # a version the project cannot run on, or not a version: refused before anything is installed
    for value, needle in (("2.3.1", "needs torch 2.4 or newer"), ("cu121", "Set it to a torch version")):
        result = source_env(root, TOE_TORCH=value)
        assert result.returncode == 2 and needle in result.stderr and calls(root) == [], result.stderr
