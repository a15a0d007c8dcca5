"""run/gpu_check.sh on this CPU machine: every check runs its CPU stand-in and passes, the JSON
report says so, and the output says that CUDA was not exercised (so the GPU checks cannot rot)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import ROOT

from ToE.gpu_check import CHECKS, NO_CUDA


@pytest.mark.e2e
def test_gpu_check_passes_on_the_cpu_and_says_cuda_was_not_exercised(tmp_path):
    out = tmp_path / "gpu_check"
    # no GPU even on a machine that has one: this is the CPU branch CI runs
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TOE_GPU_CHECK_OUT"):
        env.pop(key, None)
    result = subprocess.run(["bash", str(ROOT / "run" / "gpu_check.sh"), "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert NO_CUDA in result.stdout, output[-3000:]
    assert f"report: {out / 'gpu_check.json'}" in result.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["cuda"] is False and report["cuda_exercised"] is False and report["passed"] is True
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert statuses == {name: "passed" for name in CHECKS}, statuses
    assert all(check["seconds"] > 0 for check in report["checks"])
    speed = json.loads((out / "speed.json").read_text())
    assert speed == report["speed"]
    assert speed["full_step_ms"] > 0 and speed["stage1_step_ms"] > 0 and 0 < speed["operator_share_of_stage1"]
    assert speed["stage1_kept_tokens"] < speed["patch_tokens"]
