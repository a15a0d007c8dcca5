"""``--torchcompile`` (issue 32): one dynamo graph per ToE stage, exact resume, plain checkpoints, with the
EMA, gradient accumulation, --finetune and VPT in this process and DDP on 2 processes.

The runs are in this process (dynamo's own counter, ``counters["stats"]["unique_graphs"]``, counts
the graphs) with the ``aot_eager`` backend: dynamo captures the same graphs as with inductor and
AOTAutograd splits forward and backward as it does for inductor, but no C++ is generated, so a
3-stage run compiles in seconds on 2 CPU cores instead of minutes. Inductor's speed is bench/speed.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

from helpers import FAST, INPUT, MAIN, MODEL, MODEL_KWARGS, PATCH, PLAIN, TINY, child_env, free_port

pytestmark = pytest.mark.e2e

THREE_STAGES = ["--expansion-step", "0", "1", "2", "--keep-rate", "0.5", "0.75", "1.0"]


def fit(main_module: str, task_path: str, argv):
    """Parse with the trainer's flags, run it in this process; return the run, with ``new_graphs``: the
    graphs dynamo compiled for it."""
    import importlib

    import torch._dynamo

    from ToE.common.lifecycle import Run

    torch._dynamo.reset()
    before = graphs()  # dynamo's counter runs on over the tests of this process: count the difference
    module, name = task_path.split(":")
    args = importlib.import_module(main_module).parse_args([str(a) for a in argv])
    run = Run(args, getattr(importlib.import_module(module), name))
    run.fit()
    run.new_graphs = graphs() - before
    return run


def graphs() -> int:
    from ToE.common.lifecycle import compiled_graphs

    return compiled_graphs()


def test_deit_compiled_one_graph_per_stage_resumes_exactly_and_saves_plain_weights(data, tmp_path, capsys):
    # with the EMA and 2 micro-batches of 4 accumulated per update (the compiled module under no_sync's
    # absence of DDP, the EMA updated from the plain module it shares its weights with)
    common = ["--data-path", data, *TINY, *FAST, *PLAIN, *THREE_STAGES, "--epochs", "4", "--torchcompile", "aot_eager",
              "--model-ema", "--model-ema-decay", "0.9", "--global-batch", "8"]
    straight = fit("ToE.deit.main", "ToE.deit.trainer:DeiTTask", [*common, "--output_dir", tmp_path / "straight"])
    assert 1 <= straight.new_graphs <= 3  # three distinct stages: no more graphs than that (evaluation runs eager)
    log = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert all("compile_seconds" in line for line in log)
    # the compiled forward still reports the tokens it carried (the operator's last_index, set in the graph)
    records = [json.loads(line) for line in (tmp_path / "straight" / "log.txt").read_text().splitlines()]
    assert [r["kept_tokens"] for r in records] == [8, 12, 16, 16]
    assert records[-1]["compiled_graphs"] == straight.new_graphs  # the log says how many graphs the run compiled
    fit("ToE.deit.main", "ToE.deit.trainer:DeiTTask", [*common, "--output_dir", tmp_path / "resumed",
                                                        "--stop-after-epochs", "2"])
    fit("ToE.deit.main", "ToE.deit.trainer:DeiTTask", [*common, "--output_dir", tmp_path / "resumed", "--auto-resume"])
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for part in ("model", "model_ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=1e-5, atol=1e-6)
    # the weights are those of a plain timm model: no "_orig_mod." of a compiled module
    plain = timm.create_model(MODEL, num_classes=straight.task.num_classes, img_size=INPUT, patch_size=PATCH,
                              **MODEL_KWARGS)
    plain.load_state_dict(a["model"], strict=True)


def test_efficienttrain_compiled_graphs_follow_the_curriculum(data, tmp_path):
    from token_select import stage_of_epoch

    run = fit("ToE.EfficientTrain.main", "ToE.EfficientTrain.trainer:EfficientTrainTask",
              ["--data-path", data, *TINY, "--input-size", "32", *FAST, *PLAIN, "--epochs", "3",
               "--expansion-step", "0", "2", "--keep-rate", "0.5", "1.0", "--curriculum", "table",
               "--segments", "1:24:1", "3:32:9", "--torchcompile", "aot_eager", "--output_dir", tmp_path])
    # every distinct (ToE stage, resolution, batch) is one graph: here (1, 24 px), (1, 32 px), (2, 32 px)
    distinct = {(stage_of_epoch(e, [0, 2]), p.crop, p.batch) for e, p in enumerate(run.task.plan)}
    assert len(distinct) == 3 and 1 <= run.new_graphs <= len(distinct)


def test_vpt_on_a_finetuned_backbone_compiled_resumes_exactly(data, pretrained, tmp_path):
    """--finetune (head and position table adapted) and deep VPT (prompts as prefix tokens, backbone
    frozen) under --torchcompile: one graph per stage, 2 + 1 = 3 epochs, the small VPT checkpoint."""
    common = ["--data-path", data, *TINY, *FAST, *PLAIN, *THREE_STAGES, "--epochs", "3", "--torchcompile", "aot_eager",
              "--no-model-ema", "--finetune", pretrained, "--vpt", "deep", "--prompt-tokens", "3"]
    straight = fit("ToE.deit.main", "ToE.deit.trainer:DeiTTask", [*common, "--output_dir", tmp_path / "straight"])
    assert 1 <= straight.new_graphs <= 3
    fit("ToE.deit.main", "ToE.deit.trainer:DeiTTask", [*common, "--output_dir", tmp_path / "split",
                                                        "--stop-after-epochs", "2"])
    fit("ToE.deit.main", "ToE.deit.trainer:DeiTTask", [*common, "--output_dir", tmp_path / "split", "--auto-resume"])
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=True)
    assert set(a["model"]) == set(b["model"]) == {"vpt.prompts", "head.weight", "head.bias"}
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)


def test_ddp_compiled_two_processes_one_graph_per_stage(data, tmp_path):
    """compile, then DDP, on 2 gloo processes: each process compiles no more graphs than there are
    stages (rank 0's log says how many), and the checkpoint is a plain model's."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(MAIN), "--data-path", str(data), *TINY, *FAST, *PLAIN,
               *THREE_STAGES, "--epochs", "3", "--torchcompile", "aot_eager", "--no-model-ema", "--output_dir",
               str(out)]
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["kept_tokens"] for r in records] == [8, 12, 16]
    assert 1 <= records[-1]["compiled_graphs"] <= 3, records[-1]
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["world_size"] == 2
    plain = timm.create_model(MODEL, num_classes=3, img_size=INPUT, patch_size=PATCH, **MODEL_KWARGS)
    plain.load_state_dict(checkpoint["model"], strict=True)
