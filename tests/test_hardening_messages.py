"""Issue 27, "messages that mislead": each message names the real problem and the fix.

- a pretrained state dict (timm's, or DeiT's ``{"model": ...}``) given to ``--resume`` is said to be
  pretrained weights, with ``--finetune`` as the fix (and ``--eval --resume`` evaluates it);
- a VPT run's checkpoint given to ``--finetune`` is said to be one, with its backbone and the flags
  that continue or evaluate it;
- ``--finetune`` prints only true notes (a distilled DeiT into a plain ViT of the same class count
  is not "another class count");
- a DALI decode failure names the file that failed, not the batch's first; with ``--data-backend
  dali`` the up-front val check decodes with DALI's decoder, so an image PIL reads and DALI cannot
  is refused before training; building a DALI pipeline prints none of DALI's internal warnings;
- ``python -m ToE.flops`` and ``gpu_check --out`` refuse edge inputs in one line, before any work.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import CLASSES, FAST, MODEL, MODEL_KWARGS, PATCH, PLAIN, TINY, deit_run, write_images
from PIL import Image

from ToE.common.errors import LocalError, UserError


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"))


def _tiny(name: str = MODEL, classes: int = CLASSES) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=classes, img_size=16, patch_size=PATCH,
                             **MODEL_KWARGS)


def _gif(path: Path) -> Path:
    """Rewrite ``path`` (an image) as a GIF under the same name: PIL reads it, DALI's decoder does not."""
    Image.open(path).convert("RGB").save(path, format="GIF")
    return path


# -- --resume / --finetune: what the file is ---------------------------------------------------------
@pytest.mark.parametrize("layout", ["timm", "deit"])
def test_resume_of_pretrained_weights_points_to_finetune(images, tmp_path, layout):
    """Old: a timm state dict "does not fit the model (KeyError)"; DeiT's {"model": ...} a KeyError traceback."""
    weights = _tiny().state_dict()
    path = tmp_path / "weights.pth"
    torch.save(weights if layout == "timm" else {"model": weights}, path)
    with pytest.raises(UserError) as error:
        deit_run("--data-path", images, "--output_dir", tmp_path / "out", *TINY, *FAST, *PLAIN, "--resume", path)
    message = str(error.value)
    assert "pretrained weights" in message and f"--finetune {path}" in message and "does not fit" not in message


def test_eval_evaluates_a_timm_state_dict(images, tmp_path):
    """DeiT's ``--eval --resume deit.pth`` evaluates pretrained weights; a flat timm state dict too (old: refused)."""
    model = _tiny()
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    run = deit_run("--data-path", images, *TINY, *FAST, *PLAIN, "--eval", "--resume", path)
    assert torch.equal(run.task.model.state_dict()["head.weight"], model.state_dict()["head.weight"])


def test_resume_misfit_names_the_tensors(images, tmp_path):
    """A run checkpoint of another model shape names what does not fit (old: only "(RuntimeError)")."""
    model = _tiny()
    state = {"model": {k: v for k, v in model.state_dict().items() if k != "norm.weight"}, "optimizer": {},
             "epoch": 0}
    torch.save(state, tmp_path / "checkpoint.pth")
    with pytest.raises(UserError, match="missing norm.weight"):
        deit_run("--data-path", images, *TINY, *FAST, *PLAIN, "--eval", "--resume", tmp_path / "checkpoint.pth")


def test_finetune_of_a_vpt_checkpoint_names_its_backbone(tmp_path):
    """A --vpt run's checkpoint (its prompts and head, as Run._save writes it) given to --finetune. Old: "holds
    no ViT weights (no pos_embed)"."""
    from ToE.common.pretrained import read_vit_weights

    state = {"model": {"vpt.prompts": torch.zeros(1, 2, 32), "head.weight": torch.zeros(3, 32),
                       "head.bias": torch.zeros(3)},
             "optimizer": {}, "epoch": 4, "frozen_checksum": 1.5,
             "args": {"vpt": "deep", "finetune": "/data/backbone.pth", "prompt_tokens": 2}}
    path = tmp_path / "checkpoint.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as error:
        read_vit_weights(str(path), "--finetune")
    message = str(error.value)
    assert "--vpt deep run" in message and "/data/backbone.pth" in message and f"--resume {path}" in message
    assert "no ViT weights" not in message


def test_distilled_into_plain_notes_only_what_is_true(tmp_path):
    """Old: "the classifier head has another class count (head_dist.weight, head_dist.bias dropped)" for a
    distilled DeiT of the same class count."""
    from ToE.common.pretrained import finetune

    distilled = _tiny("deit_tiny_distilled_patch16_224")
    path = tmp_path / "distilled.pth"
    torch.save({"model": distilled.state_dict()}, path)
    notes = finetune(_tiny(), str(path))
    assert not any("class count" in note for note in notes), notes
    assert any("distilled" in note and "dropped" in note for note in notes), notes
    # another class count as well: that note names the class head only
    notes = finetune(_tiny(classes=5), str(path))
    counted = [note for note in notes if "class count" in note]
    assert len(counted) == 1 and "head.weight" in counted[0] and "head_dist" not in counted[0], notes


# -- DALI --------------------------------------------------------------------------------------------
def test_dali_decode_failure_names_the_bad_file(images):
    """The batch's third file is a GIF: the error names it (old: "one of 6 images ..., first <the first file>")."""
    pytest.importorskip("nvidia.dali")
    from ToE.common import dali

    files = sorted((images / "val").rglob("*.png"))[:6]
    bad = _gif(files[2])
    samples = [(str(path), 0) for path in files]
    loader = dali.eval_loader(samples, range(len(samples)), len(samples), 16, 1.0, torch.device("cpu"), 1)
    try:
        with pytest.raises(LocalError) as error:
            next(iter(loader))
    finally:
        Image.open(bad).convert("RGB").save(bad, format="PNG")  # the module's images stay as they were
    message = str(error.value)
    assert str(bad) in message and "GIF" in message and "--data-backend torch" in message
    assert str(files[0]) not in message


def test_dali_up_front_check_decodes_with_dali(tmp_path):
    """An image PIL reads but DALI cannot (a GIF named .png) passes the PIL check and is refused by the DALI one,
    before any training (old: check_images had no DALI decoder; the run failed after its first epoch)."""
    pytest.importorskip("nvidia.dali")
    import functools

    from ToE.common import dali
    from ToE.common.data import check_images, train_val_folders

    root = write_images(tmp_path / "data")
    bad = _gif(root / "val" / "class1" / "1.png")
    _, val_set = train_val_folders(str(root))
    check_images(val_set, "val")  # PIL reads it: the torch path trains on it
    with pytest.raises(LocalError) as error:
        check_images(val_set, "val", decoder=functools.partial(dali.undecodable, device=torch.device("cpu")))
    assert str(error.value).startswith("val image check:") and str(bad) in str(error.value)


def test_dali_pipeline_shows_no_internal_warnings(images):
    """DALI's RandAugment calls its own deprecated operators: every epoch's pipeline showed two warnings on
    stderr (eight lines) in a run that works. (Recorded here: what is recorded is what a run prints.)"""
    pytest.importorskip("nvidia.dali")
    from ToE.common import dali
    from ToE.deit.main import parse_args

    args = parse_args(["--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0", "--num_workers", "0"])
    samples = [(str(path), 0) for path in sorted((images / "train").rglob("*.png"))[:4]]
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        for epoch in range(2):
            loader = dali.train_loader(samples, range(4), 4, 16, args, args.aa, torch.device("cpu"), seed=epoch)
            assert next(iter(loader))[0].shape == (4, 3, 16, 16)
    assert not [str(w.message) for w in shown if "deprecated" in str(w.message)]


# -- python -m ToE.flops and gpu_check --out ----------------------------------------------------------
def _flops_error(argv, capsys) -> str:
    from ToE import flops

    with pytest.raises(SystemExit) as exit_info:
        flops.main(["--analytic-only", *map(str, argv)])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and "error:" in lines[0], err
    assert out == "", "refused only after the report was printed"
    return lines[0]


@pytest.mark.parametrize("case", ["json_folder", "json_missing_folder", "depth0", "not_vit", "curriculum"])
def test_flops_edge_inputs_are_one_line_errors(tmp_path, capsys, case):
    """Old: --json FOLDER / --json in a missing folder: a traceback after the whole count; depth=0 an
    IndexError traceback; resnet50 "unexpected keyword argument 'img_size'"; --curriculum table without
    --segments refused only after the report was printed."""
    argv, needle = {
        "json_folder": (["--json", tmp_path], "is a folder"),
        "json_missing_folder": (["--json", tmp_path / "missing" / "r.json"], "does not exist"),
        "depth0": (["--model-kwargs", "depth=0"], "no transformer blocks"),
        "not_vit": (["--model", "resnet50"], "not a timm VisionTransformer"),
        "curriculum": (["--curriculum", "table"], "--segments"),
    }[case]
    assert needle in _flops_error(argv, capsys)


def test_flops_warns_of_stages_the_run_never_reaches(capsys):
    """--epochs 50 with stages at 0 100 200: the trainers warn, the calculator said nothing (old)."""
    from ToE import flops

    flops.main(["--analytic-only", "--epochs", "50"])
    assert "never reached in 50 epochs" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["file", "under_a_file", "user_folder"])
def test_gpu_check_out_is_refused_in_one_line(tmp_path, capsys, case):
    """Old: --out FILE and --out FILE/sub were tracebacks (FileExistsError, NotADirectoryError) and a folder
    with the user's files was written into (its runs/ replaced by gpu_check's)."""
    from ToE.gpu_check import parse_args

    (tmp_path / "file").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    out = {"file": tmp_path / "file", "under_a_file": tmp_path / "file" / "sub", "user_folder": tmp_path / "mine"}[case]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: --out"), err
    assert (tmp_path / "file").read_text() == "mine" and os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_gpu_check_out_accepts_a_new_folder_or_an_earlier_report(tmp_path):
    from ToE.gpu_check import parse_args

    assert parse_args(["--out", str(tmp_path / "a" / "b")]).out == str(tmp_path / "a" / "b")
    (tmp_path / "earlier" / "runs").mkdir(parents=True)
    (tmp_path / "earlier" / "gpu_check.json").write_text("{}")
    assert parse_args(["--out", str(tmp_path / "earlier")]).out == str(tmp_path / "earlier")


def test_checkpoint_kind_names_each_file():
    from ToE.common.pretrained import OTHER, RUN, VPT_RUN, WEIGHTS, checkpoint_kind

    weights = {"pos_embed": torch.zeros(1, 2, 3)}
    assert checkpoint_kind(weights) == WEIGHTS
    assert checkpoint_kind({"model": weights}) == WEIGHTS
    assert checkpoint_kind({"model": weights, "optimizer": {}, "epoch": 1, "args": {"vpt": None}}) == RUN
    assert checkpoint_kind({"model": weights, "optimizer": {}, "epoch": 1, "args": {"vpt": "shallow"}}) == VPT_RUN
    assert checkpoint_kind([np.zeros(2)]) == OTHER and checkpoint_kind({"a": 1}) == OTHER
