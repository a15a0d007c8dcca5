"""The published recipes as published (issue 28): the global batch is part of the recipe (images per
optimizer update, the same on any number of processes, reached with the per-process batch and
gradient accumulation); each trainer reports and evaluates as its published code does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import ROOT, free_port, ok, read_log, run_main, write_coco
from ToE.common.config import config_path
from ToE.common.errors import UserError
from ToE.common.schedule import split_global_batch
from ToE.trainers import TRAINERS


def test_split_reaches_the_global_batch_or_says_why_not():
    assert split_global_batch(1024, 1, 256) == (256, 4)
    assert split_global_batch(1024, 2, 256) == (256, 2)
    assert split_global_batch(1024, 4, 256) == (256, 1)
    assert split_global_batch(1024, 8, 256) == (128, 1)  # more GPUs than the published 4: smaller steps
    assert split_global_batch(16, 1, 2) == (2, 8) and split_global_batch(8, 8, 1) == (1, 1)
    with pytest.raises(UserError, match="cannot be split evenly over 3 processes"):
        split_global_batch(1024, 3, 256)
    with pytest.raises(UserError, match="Pass --batch-size 64"):
        split_global_batch(1024, 1, 100)


# -- the published recipes on 1 and on 2 processes (gloo, CPU), a tiny model passed through ------------
TINY_VIT = ["--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2", "--input-size", "16", "--patch-size", "4"]
CPU = ["--device", "cpu", "--num_workers", "0", "--no-pin-mem", "--epochs", "1"]
RECIPES = {
    # trainer: (recipe, published images per update, per-process batch, extra flags)
    "deit": ("imagenet_small", 1024, 256, [*TINY_VIT, *CPU]),
    "lvvit": ("imagenet_small", 1024, 256, ["--model", "lvvit_digits", "--model-kwargs", "embed_dim=32", "depth=2",
                                            "num_heads=2", "stem_dim=8", "--img-size", "16", "--patch-size", "4",
                                            "--crop-pct", "1.0", "--cooldown-epochs", "0", *CPU]),
    "yolos": ("coco_tiny", 16, 2, ["--backbone_name", "vit_tiny_patch16_224", "--backbone-kwargs", "img_size=32",
                                   "patch_size=8", "embed_dim=32", "depth=3", "num_heads=2", "--det_token_num", "5",
                                   "--init_pe_size", "32", "32", "--scales", "24", "32", "--max-size", "40",
                                   "--eval_size", "32", "--device", "cpu", "--num_workers", "0", "--epochs", "1",
                                   "--expansion-step", "1", "2", "3"]),
}


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """1,100 train images in 2 classes (enough for one update of 1,024) and 4 val images, 16 px."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for split, count in (("train", 550), ("val", 2)):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, size=(16, 16, 3), dtype=np.uint8) + 80 * c
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.mark.e2e
@pytest.mark.parametrize("trainer", list(RECIPES))
def test_published_recipe_keeps_its_global_batch_on_one_and_two_processes(trainer, many_images, tmp_path):
    recipe, published, batch, extra = RECIPES[trainer]
    coco = tmp_path / "coco"
    data = ["--coco_path", str(write_coco(coco, splits=(("train", 16), ("val", 2))))] if trainer == "yolos" \
        else ["--data-path", str(many_images)]
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        main = str(ROOT / TRAINERS[trainer].main)
        cmd = [sys.executable, main] if processes == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), main]
        result = ok(run_main("-c", config_path(trainer, recipe), *data, *extra, "--output_dir", out, cmd=cmd,
                             timeout=600))
        saved = yaml.safe_load((out / "args.yaml").read_text())
        runs[processes] = (saved, read_log(out), result.stdout)
    for processes, (saved, _, stdout) in runs.items():
        assert saved["global_batch"] == published, (trainer, processes)
        assert saved["batch_size"] == batch and saved["accumulation"] == published // (processes * batch)
        assert f"global batch {published} ({batch} per process" in stdout
    assert runs[1][1][0]["updates"] == runs[2][1][0]["updates"] >= 1  # the same updates per epoch
    if trainer == "deit":  # DeiT's rule applies to the global batch, whatever the process count
        assert all("lr 1.00e-03 (--lr 0.0005 x 1024 / 512)" in run[2] for run in runs.values())


def test_each_trainer_reports_and_evaluates_as_published():
    from ToE.deit.main import parse_args as deit
    from ToE.EfficientTrain.main import parse_args as et
    from ToE.lvvit.main import parse_args as lvvit
    from ToE.yolos.main import parse_args as yolos

    assert (deit([]).best_of, deit([]).eval_amp, et([]).best_of, et([]).eval_amp) == ("model", True, "model", True)
    # timm's train.py: the EMA's top-1, evaluated in the training's mixed precision (apex O1 there)
    assert (lvvit([]).best_of, lvvit([]).eval_amp) == ("ema", True)
    assert yolos([]).eval_amp is False  # published YOLOS evaluates (and trains) in float32
    args = lvvit(["--best-of", "model", "--no-eval-amp"])
    assert (args.best_of, args.eval_amp) == ("model", False)


@pytest.mark.e2e
def test_best_of_ema_makes_the_best_checkpoint_from_the_emas_top1(tmp_path):
    from helpers import FAST, PLAIN, TINY, write_images

    data = write_images(tmp_path / "data")
    out = tmp_path / "out"
    ok(run_main("--data-path", data, "--output_dir", out, "--epochs", 3, *TINY, *FAST, *PLAIN, "--model-ema",
                "--model-ema-decay", "0.5", "--best-of", "ema", "--expansion-step", "0", "1", "2", "--keep-rate",
                "0.5", "0.75", "1.0"))
    log = read_log(out)
    assert [r["best_acc1"] for r in log] == [max(r["ema_acc1"] for r in log[:i + 1]) for i in range(len(log))]
