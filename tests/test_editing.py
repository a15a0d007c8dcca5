"""A trainer a researcher edits (issue 29): four edits, each made in one trainer's own code only (here a
subclass of that trainer's task, as the edit would be in its trainer.py), each with a passing run;
and the fifth trainer of tests/fixtures/finetune_trainer (main.py, task.py, config.yaml) run for real."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import FAST, PLAIN, ROOT, TINY, child_env

pytestmark = pytest.mark.e2e

ONE_EPOCH = [*TINY, *FAST, *PLAIN, "--epochs", "2", "--expansion-step", "0", "1", "--keep-rate", "0.5", "1.0"]


def run_task(main_module: str, task_class, data, out, *extra):
    """Parse with the trainer's own flags and run ``task_class`` on the one lifecycle, in this process."""
    import importlib

    from ToE.common.lifecycle import Run

    parse_args = importlib.import_module(main_module).parse_args
    args = parse_args(["--data-path", str(data), "--output_dir", str(out), *ONE_EPOCH, *map(str, extra)])
    run = Run(args, task_class)
    run.fit()
    return run, [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


class FocalLoss(torch.nn.Module):
    """Focal loss (Lin et al., 2017) on hard labels."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits, targets):
        log_p = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        return (-(1 - log_p.exp()) ** self.gamma * log_p).mean()


def test_a_focal_loss_for_deit_is_one_build_step(data, tmp_path, capsys):
    from ToE.deit.trainer import DeiTTask

    class FocalDeiT(DeiTTask):  # the edit, in ToE/deit/trainer.py
        def build_loss(self):
            return FocalLoss()

    run, log = run_task("ToE.deit.main", FocalDeiT, data, tmp_path)
    assert isinstance(run.task.criterion.base_criterion, FocalLoss)  # distillation wraps it as it wraps any base loss
    assert len(log) == 2 and all(record["train_loss"] > 0 for record in log)


def test_a_per_epoch_metric_reaches_console_log_and_tensorboard(data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ToE.deit.trainer import DeiTTask

    class Balanced(DeiTTask):  # the edit, in ToE/deit/trainer.py: a metric of the evaluation
        console_metrics = ("test_worst_class_acc",)

        def evaluate(self, model):
            stats = super().evaluate(model)
            stats["worst_class_acc"] = 12.5  # (a real one would count per class)
            return stats

    run_task("ToE.deit.main", Balanced, data, tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and all("test_worst_class_acc 12.5" in line for line in lines), lines
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [record["test_worst_class_acc"] for record in log] == [12.5, 12.5]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [event.value for event in events.Scalars("test_worst_class_acc")] == [12.5, 12.5]


def test_value_clipping_for_efficienttrain_alone(data, tmp_path):
    from ToE.EfficientTrain.trainer import EfficientTrainTask

    largest = []

    class ValueClipped(EfficientTrainTask):  # the edit, in ToE/EfficientTrain/trainer.py
        def before_optimizer_step(self, model):
            torch.nn.utils.clip_grad_value_(model.parameters(), 1e-4)
            largest.append(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))
            return super().before_optimizer_step(model)

    run_task("ToE.EfficientTrain.main", ValueClipped, data, tmp_path, "--curriculum", "none")
    assert largest and max(largest) <= 1e-4
    # DeiT's step is untouched by it: the shared default clips nothing without --clip-grad
    from ToE.common.lifecycle import Task
    from ToE.deit.trainer import DeiTTask

    assert DeiTTask.before_optimizer_step is Task.before_optimizer_step


def test_per_step_records_and_checkpoint_history(data, tmp_path, capsys):
    from ToE.deit.trainer import DeiTTask

    run_task("ToE.deit.main", DeiTTask, data, tmp_path, "--log-interval", "2", "--checkpoint-hist", "1")
    steps = [json.loads(line) for line in (tmp_path / "log_steps.txt").read_text().splitlines()]
    assert steps and {"epoch", "step", "loss", "lr", "grad_norm", "images_per_second"} <= set(steps[0])
    assert all(record["step"] % 2 == 0 for record in steps)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pth")) == ["checkpoint-1.pth"]


def test_the_fifth_trainer_runs_from_its_folder_and_resumes(data, tmp_path):
    folder = ROOT / "tests" / "fixtures" / "finetune_trainer"
    out = tmp_path / "run"
    command = [sys.executable, str(folder / "main.py"), "-c", str(folder / "config.yaml"), "--data-path", str(data),
               "--output_dir", str(out), *TINY, "--device", "cpu", "--num_workers", "0", "--batch-size", "4",
               "--epochs", "2"]
    result = subprocess.run([*command, "--stop-after-epochs", "1"], cwd=tmp_path, env=child_env(),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((out / "args.yaml").read_text())
    # the saved configuration holds the flags this trainer has, not the augmentation and mixup it never uses
    assert "aa" not in saved and "mixup" not in saved and "reprob" not in saved
    assert saved["lr"] == 1e-4 and saved["keep_rate"] == [0.5, 1.0]
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    # and it resumes like every trainer
    again = subprocess.run([*command, "--auto-resume"], cwd=tmp_path, env=child_env(), capture_output=True,
                           text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1]
