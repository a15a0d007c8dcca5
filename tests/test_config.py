"""Recipes as data: -c/--config FILE.yaml, the recipe files, and the scripts and demos that read them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import torch
import yaml

from ToE.common.config import config_path, load_config, scaled_stages
from ToE.common.errors import UserError
from ToE.trainers import TRAINERS

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {name: trainer.module for name, trainer in TRAINERS.items()}
RECIPES = {"deit": ["imagenet_tiny", "imagenet_small", "imagenet_base", "demo"],
           "lvvit": ["imagenet_small", "imagenet_medium", "demo"],
           "et": ["imagenet_tiny", "imagenet_small", "demo"],
           "yolos": ["coco_tiny", "coco_small", "demo"]}


def parse(trainer, argv):
    import importlib

    return importlib.import_module(PARSERS[trainer]).parse_args([str(a) for a in argv])


@pytest.mark.parametrize("trainer, name", [(t, n) for t, names in RECIPES.items() for n in names])
def test_every_recipe_file_parses_and_sets_its_values(trainer, name):
    path = config_path(trainer, name)
    args = parse(trainer, ["-c", path])
    for key, value in load_config(path).items():
        assert getattr(args, key) == value, (trainer, name, key)


def test_command_line_overrides_the_file_and_the_file_overrides_the_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 2.0e-3\nkeep_rate: [0.6, 1.0]\nexpansion_step: [0, 5]\nmodel_kwargs: {depth: 2}\n"
                    "model_ema: false\nclip_grad: 1\n")
    args = parse("deit", ["-c", path])
    assert (args.lr, args.keep_rate, args.expansion_step, args.model_kwargs, args.model_ema, args.clip_grad) == \
        (2e-3, [0.6, 1.0], [0, 5], {"depth": 2}, False, 1.0)
    args = parse("deit", ["--config", path, "--lr", "3e-3", "--keep-rate", "0.7", "1.0", "--model-ema"])
    assert (args.lr, args.keep_rate, args.model_ema) == (3e-3, [0.7, 1.0], True)
    assert parse("deit", []).lr == 5e-4  # no file: the trainer's defaults


@pytest.mark.parametrize("text, needle", [
    ("lrr: 1.0\n", "lrr is not a flag of this trainer (did you mean lr?)"),
    ("keep_rate: 0.5\n", "keep_rate is 0.5, expected a list"),
    ("expansion_step: [0, 1.5]\n", "expected a list of integers ('1.5' is not an integer)"),
    ("model_ema: maybe\n", "expected true or false"),
    ("lr: [\n", "is not valid YAML at line 2"),
    ("- lr\n", "holds a list, not a mapping"),
    ("resume: old.pth\n", "resume is not a flag of this trainer"),  # only the command line resumes
])
def test_bad_config_file_is_one_line(tmp_path, capsys, text, needle):
    from ToE.deit.main import cli

    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as stop:
        cli(["-c", str(path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_config_value_goes_through_the_flags_own_check(capsys):
    from ToE.deit.main import cli

    with pytest.raises(SystemExit):
        cli(["-c", "/nonexistent.yaml", "--check-only"])
    assert "config file /nonexistent.yaml does not exist" in capsys.readouterr().err
    with pytest.raises(UserError, match="needs a file"):
        parse("deit", ["-c"])


# Issue 27: every value of a file goes through its flag's own type, choice, count and range check
# (argparse checks neither for defaults, and a file's values are defaults): each of these trained
# something else than asked, or ended in a traceback, before.
@pytest.mark.parametrize("trainer, text, needle", [
    ("deit", "vpt: Deep\n", "vpt is 'Deep', not one of shallow, deep"),
    ("deit", "token_drop: Random\n", "token_drop is 'Random', not one of toe, random"),
    ("deit", "data_backend: DALI\n", "data_backend is 'DALI', not one of torch, dali"),
    ("deit", "mixup_mode: elements\n", "not one of batch, pair, elem"),
    ("deit", "scale: [0.5, 2.0]\n", "must be between 0 and 1, not 2.0"),
    ("deit", "scale: [0.5]\n", "expected a list of 2 values"),
    ("deit", "amp_dtype: bf16\n", "not one of auto, bfloat16, float16, float32"),
    ("deit", "lr: null\n", "but --lr needs a value"),
    ("deit", "aa: off\n", "a YAML boolean"),
    ("deit", "model: no\n", "a YAML boolean"),
    ("deit", "epochs: 300.5\n", "'300.5' is not an integer"),
    ("deit", "batch_size: 0\n", "must be a positive integer, not 0"),
    ("deit", "model_kwargs: [depth, 2]\n", "expected a mapping"),
    ("deit", "lr: 1.0e-3\nepochs: 3\nlr: 2.0e-3\n", "lr is written twice (lines 1 and 3)"),
    ("lvvit", "amp_dtype: fp16\n", "not one of auto, bfloat16, float16, float32"),
    ("et", "distance: Cosine\n", "not one of cosine, manhattan, euclidean"),
    ("yolos", "initialization: Stride\n", "not one of stride, uniform"),
])
def test_config_values_go_through_their_flags_checks(tmp_path, capsys, trainer, text, needle):
    import importlib

    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(PARSERS[trainer]).cli(["-c", str(path), "--check-only"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_config_values_are_converted_as_the_command_line_would(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("clip_grad: null\nvpt: null\nlr: 1e-3\ntime_limit: 90m\nscale: [0.5, 1]\nepochs: 7\n")
    args = parse("deit", ["-c", path])
    assert (args.clip_grad, args.vpt, args.lr, args.time_limit, args.scale, args.epochs) == \
        (None, None, 1e-3, 5400.0, [0.5, 1.0], 7)
    assert isinstance(args.scale[1], float) and isinstance(args.lr, float)


def test_one_config_file_no_prefixes_and_the_short_form_is_read(tmp_path, capsys):
    from ToE.deit.main import cli

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("lr: 2.0e-3\n")
    second.write_text("epochs: 3\n")
    # two files: the second used to replace the first without a word (a run script's own recipe too)
    with pytest.raises(UserError, match="--config is given 2 times"):
        parse("deit", ["-c", first, "-c", second])
    with pytest.raises(UserError, match="--config is given 2 times"):
        parse("deit", ["--config", first, f"--config={second}"])
    # argparse's -cFILE and -c=FILE name the file: it is read, not dropped
    assert parse("deit", [f"-c{first}"]).lr == 2e-3
    assert parse("deit", [f"-c={first}"]).lr == 2e-3
    # no prefix matching: --conf was taken for --config and the file never read
    for argv in (["--conf", str(first)], ["--epoch", "3"], ["--model-k", "depth=2"]):
        with pytest.raises(SystemExit) as stop:
            cli(argv + ["--check-only"])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "unrecognized arguments" in err and len(err.splitlines()) == 1, err


def test_model_kwargs_on_the_command_line_merge_into_the_recipes(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_kwargs: {embed_dim: 96, depth: 6, num_heads: 3}\n")
    args = parse("deit", ["-c", path, "--model-kwargs", "depth=2"])
    assert args.model_kwargs == {"embed_dim": 96, "depth": 2, "num_heads": 3}
    args = parse("deit", ["--model-kwargs", "depth=2", "--model-kwargs", "num_heads=4"])
    assert args.model_kwargs == {"depth": 2, "num_heads": 4}
    assert parse("deit", ["-c", path]).model_kwargs == {"embed_dim": 96, "depth": 6, "num_heads": 3}


def test_scaled_stages():
    assert scaled_stages([0, 16, 32], 48, 24) == [0, 8, 16]
    assert scaled_stages([0, 16, 32], 48, 3) == [0, 1, 2]
    assert scaled_stages([1, 7, 13], 20, 3) == [1, 2, 3]
    assert scaled_stages([5, 100, 200], 300, 300) == [5, 100, 200]


def test_lvvit_defaults_are_its_published_recipe_file_and_the_published_aliases_work():
    args = parse("lvvit", [])
    recipe = load_config(config_path("lvvit", "imagenet_small"))
    assert recipe.pop("global_batch") == 1024 and args.global_batch is None  # the run scripts pass -c for it
    assert {key: getattr(args, key) for key in recipe} == recipe
    assert (args.model, args.epochs, args.cooldown_epochs, args.lr) == ("lvvit_s", 300, 10, 1.6e-3)
    args = parse("lvvit", ["-b", "32", "--img-size", "192", "--apex-amp", "--no-model-ema"])
    assert (args.batch_size, args.input_size, args.amp_dtype, args.model_ema) == (32, 192, "float16", False)
    args = parse("lvvit", ["-c", config_path("lvvit", "imagenet_medium")])
    assert (args.model, args.drop_path) == ("lvvit_m", 0.2)


def _copy_repository(tmp_path: Path) -> Path:
    """The code of the repository in tmp_path (its data folder linked; not its outputs or venv)."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("ToE", "token_select.py"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, copy / name)
    (ROOT / "data").mkdir(exist_ok=True)
    (copy / "data").symlink_to(ROOT / "data")  # the embedded data sets are written once, as the demos do
    return copy


def _demo_with_new_lr(tmp_path: Path, trainer: str, python: str) -> Tuple[Path, subprocess.CompletedProcess]:
    """Run the trainer's demo script from a copy of the code whose demo YAML says lr 7.5e-4 (as
    run/demo.sh starts it: PY, DEMO_OUT, DEMO_EPOCHS; .venv's set-up left out, it is this one's)."""
    copy = _copy_repository(tmp_path)
    recipe = copy / "ToE" / TRAINERS[trainer].folder / "configs" / "demo.yaml"
    text = recipe.read_text()
    assert "\nlr: 1.0e-3\n" in text or "\nlr: 5.0e-4\n" in text
    recipe.write_text(text.replace("\nlr: 1.0e-3\n", "\nlr: 7.5e-4\n").replace("\nlr: 5.0e-4\n", "\nlr: 7.5e-4\n"))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PY": python, "DEMO_OUT": str(out), "DEMO_EPOCHS": "1", "PYTHONPATH": str(copy)}
    result = subprocess.run(["bash", f"ToE/{TRAINERS[trainer].folder}/run/demo.sh"], cwd=copy, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return copy, result


@pytest.mark.e2e
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_each_demo_passes_its_yaml_to_the_trainer(tmp_path, trainer):
    """The demo's YAML is the one place of its flags: the trainer command each demo script runs,
    parsed by that trainer, carries the lr written in the YAML. (A stand-in python records the
    commands instead of training; the DeiT demo is run for real below.)"""
    record = tmp_path / "commands.txt"
    shim = tmp_path / "python"
    shim.write_text("#!/usr/bin/env bash\n"  # the demo's length flags come from the real ToE.common.config
                    f"if [ \"$2\" = ToE.common.config ]; then exec {sys.executable} \"$@\"; fi\n"
                    f"printf '%s\\0' \"$@\" >> {record}; printf '\\n' >> {record}\n")
    shim.chmod(0o755)
    copy, _ = _demo_with_new_lr(tmp_path, trainer, str(shim))
    commands = [line.strip("\0").split("\0") for line in record.read_text().splitlines() if line]
    runs = [argv for argv in commands if argv[0].endswith("main.py")]
    assert len(runs) == 1, commands
    argv = [str(copy / a) if a.startswith("ToE/") and a.endswith(".yaml") else a for a in runs[0][1:]]
    args = parse(trainer, argv)
    assert args.lr == 7.5e-4 and args.epochs == 1


@pytest.mark.e2e
def test_the_deit_demo_trains_what_its_yaml_says(tmp_path):
    _, result = _demo_with_new_lr(tmp_path, "deit", sys.executable)
    stored = yaml.safe_load((tmp_path / "out" / "args.yaml").read_text())
    assert stored["lr"] == 7.5e-4 and stored["epochs"] == 1
    assert stored["config"] == "ToE/deit/configs/demo.yaml"
    assert "Top-1 on the held-out images" in result.stdout


@pytest.mark.e2e
def test_published_run_script_smoke_test_with_epochs_1(tmp_path):
    """bash ToE/deit/run/imagenet_small_run1.sh DATA OUT --epochs 1, the usual smoke test of a recipe,
    runs on the CPU with a small model passed through, and writes a checkpoint."""
    from helpers import write_images

    data = tmp_path / "images"
    write_images(data)
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "ToE/deit/run/imagenet_small_run1.sh", str(data), str(out), "--epochs", "1",
         "--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2",
         "--input-size", "32", "--patch-size", "4", "--batch-size", "4", "--global-batch", "4", "--num_workers", "0"],
        cwd=ROOT, env={**os.environ, "NPROC": "1", "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: --warmup-epochs 5 is as long as the run (--epochs 1)" in result.stdout
    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 0
    stored = yaml.safe_load((out / "args.yaml").read_text())
    assert (stored["seed"], stored["expansion_step"], stored["epochs"]) == (3407, [0, 100, 200], 1)


@pytest.mark.e2e
def test_args_yaml_reruns_the_run(tmp_path):
    """A run's args.yaml is its resolved configuration: -c OUT/args.yaml --output_dir NEW trains the same weights."""
    from helpers import write_images

    data = tmp_path / "images"
    write_images(data)
    first = tmp_path / "first"
    flags = ["--data-path", data, "--device", "cpu", "--num_workers", "0", "--no-pin-mem", "--epochs", "2",
             "--cooldown-epochs", "1", "--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2",
             "num_heads=2", "--input-size", "16", "--patch-size", "4", "--batch-size", "4", "--warmup-epochs", "0",
             "--aa", "none", "--mixup", "0", "--cutmix", "0", "--expansion-step", "0", "2", "--keep-rate", "0.5", "1.0"]
    main = str(ROOT / "ToE" / "deit" / "main.py")
    subprocess.run([sys.executable, main, *map(str, flags), "--output_dir", str(first)], check=True,
                   capture_output=True)
    again = tmp_path / "again"
    subprocess.run([sys.executable, main, "-c", str(first / "args.yaml"), "--output_dir", str(again)], check=True,
                   capture_output=True)
    stored = yaml.safe_load((again / "args.yaml").read_text())
    assert (stored["epochs"], stored["cooldown_epochs"], stored["run_epochs"]) == (2, 1, 3)
    a = torch.load(first / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    b = torch.load(again / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("trainer", list(PARSERS))
def test_ablation_flags_reach_the_operator(trainer):
    from ToE.common.args import TOE_KEYS, build_token_select

    flags = ["--initialization", "random", "--expansion", "none", "--merging", "drop", "--distance", "euclidean",
             "--distance-rank", "published"]
    args = parse(trainer, flags)
    operator = build_token_select(args)
    assert (operator.initialization, operator.expansion, operator.merging, operator.distance_rank) == \
        ("random", "none", "drop", "published")
    assert {"initialization", "expansion", "merging", "distance_rank"} <= set(TOE_KEYS)  # part of a run's identity
    default = build_token_select(parse(trainer, []))
    assert (default.initialization, default.expansion, default.merging, default.distance_rank) == \
        ("stride", "farthest", "mean", "similarity")


def test_ablation_switches_with_the_random_drop_baseline_are_refused(capsys):
    from ToE.deit.main import cli

    with pytest.raises(SystemExit) as stop:
        cli(["--token-drop", "random", "--merging", "drop", "--check-only"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "--merging drop switches a part of ToE's operator" in err, err
