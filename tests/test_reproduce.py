"""docs/reproduce.md: one command per row of the paper's tables, and the recipes and tools it uses.

The table is parsed here; its rows are the test's parameters. Each row's command has its
placeholders (DATA, OUT, LABELS, COCO, INIT_T/INIT_S, CIFAR10/CIFAR100, CKPT_TOE/CKPT_FULL)
replaced by tiny data sets written by the test, and a tiny model passed through after the row's
own flags (``TINY``: e.g. ``--model-kwargs embed_dim=32 depth=2 num_heads=2 --input-size 16
--patch-size 4 --device cpu --batch-size 4 --global-batch 4 --epochs 1``).

- Unit tier: the table lists every row, names existing scripts and recipe files and only known
  placeholders; every row's flags pass its trainer's parser and the operator's schedule checks (in
  this process); every recipe file under ToE/*/configs/ has a ``Provenance:`` line saying
  published or derived; the CIFAR converter on fake CIFAR-10/100 python batches.
- e2e tier: every row's command trains ONE epoch on the CPU with the tiny model, in this process
  (a run script's command is taken from its ``DRY_RUN=1`` line), and one representative row per
  trainer also trains one epoch through its real command in a new process, as a user would type
  it: ``deit-s`` (the DeiT run script), ``lvvit-s`` (the LV-ViT
  run script with token labels), ``et-s`` (EfficientTrain, one epoch of a 5-epoch curriculum),
  ``yolos-ti`` (the YOLOS run script with an init checkpoint) and ``cifar10-toe`` (fine-tuning a
  checkpoint on a CIFAR folder converted by ``python -m ToE.common.cifar`` from fake batches).
"""

from __future__ import annotations

import glob
import importlib
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import ROOT, child_env, ok, read_log, write_coco, write_images
from ToE.common.config import load_config
from ToE.common.errors import UserError
from ToE.trainers import TRAINERS

TABLE = ROOT / "docs" / "reproduce.md"
PARSERS = {name: trainer.module for name, trainer in TRAINERS.items()}
FOLDERS = {trainer.folder: name for name, trainer in TRAINERS.items()}  # ToE/<folder>/ -> trainer name
PLACEHOLDERS = ("DATA", "OUT", "LABELS", "COCO", "INIT_T", "INIT_S", "CIFAR10", "CIFAR100", "CKPT_TOE", "CKPT_FULL")
# every row of the paper's tables that docs/reproduce.md must give a command for
REQUIRED = {
    "deit-t", "deit-s", "deit-b", "deit-t-full", "deit-s-full", "deit-b-full",
    "deit-t-hyper", "deit-s-hyper", "deit-b-hyper",
    "lvvit-s", "lvvit-m", "lvvit-s-full", "lvvit-m-full",
    "et-t", "et-s", "et-t-full", "et-s-full",
    "yolos-ti", "yolos-s", "yolos-ti-full", "yolos-s-full",
    "cifar10-toe", "cifar10-full", "cifar100-toe", "cifar100-full",
    "abl-init-random", "abl-expansion-none", "abl-expansion-random", "abl-merging-drop",
    "abl-r0-0.2", "abl-r0-0.3", "abl-r0-0.4", "abl-k1", "abl-k3",
    "abl-distance-manhattan", "abl-distance-euclidean", "abl-stages-2", "abl-stages-4",
}
TRAINED = ["deit-s", "lvvit-s", "et-s", "yolos-ti", "cifar10-toe"]

# -- the tiny model and run, per trainer (after the row's flags, so they win) ----------------------------
CPU = ["--device", "cpu", "--num_workers", "0", "--no-pin-mem", "--batch-size", "4", "--global-batch", "4"]
VIT = ["--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2", "--patch-size", "4"]
TINY = {
    "deit": [*VIT, "--input-size", "16", "--epochs", "1", *CPU],
    "lvvit": ["--model", "lvvit_digits", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2", "stem_dim=8",
              "--img-size", "16", "--patch-size", "4", "--crop-pct", "1.0", "--cooldown-epochs", "0",
              "--token-label-size", "4", "--epochs", "1", *CPU],
    # the et curriculum has 5 segments: 5 epochs, of which the training test runs one
    "et": [*VIT, "--input-size", "32", "--epochs", "5", *CPU],
    "yolos": ["--backbone_name", "vit_tiny_patch16_224", "--backbone-kwargs", "img_size=32", "patch_size=8",
              "embed_dim=32", "depth=3", "num_heads=2", "--det_token_num", "5", "--init_pe_size", "32", "32",
              "--scales", "24", "32", "--max-size", "40", "--eval_size", "32", "--device", "cpu", "--num_workers",
              "0", "--epochs", "1", "--batch_size", "2", "--global-batch", "2"],
}
YOLOS_MID = ["--mid_pe_size", "32", "32"]  # the recipes that have mid-layer position tables (YOLOS-S)


# -- the table ----------------------------------------------------------------------------------------------
def read_table():
    """The rows of docs/reproduce.md's table: dicts of the header's columns, the command unquoted."""
    lines = TABLE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        assert len(cells) == len(header), f"docs/reproduce.md: {len(cells)} cells, not {len(header)}: {line}"
        row = dict(zip(header, cells))
        assert row["command"].startswith("`") and row["command"].endswith("`"), line
        row["command"] = row["command"].strip("`")
        rows.append(row)
    return rows


ROWS = {row["row"]: row for row in read_table()}


def trainer_of(command: str) -> str:
    match = re.search(r"ToE/(\w+)/(?:run|main\.py)", command)
    assert match and match.group(1) in FOLDERS, command
    return FOLDERS[match.group(1)]


def script_config(script: str) -> str:
    """The recipe file a run script passes (its CONFIG=.../configs/NAME.yaml line)."""
    match = re.search(r'CONFIG="[^\n]*/configs/(\w+)\.yaml"', (ROOT / script).read_text())
    assert match, f"{script} names no recipe file"
    return str(Path(script).parent.parent / "configs" / f"{match.group(1)}.yaml")


def tiny_flags(command: str) -> list:
    flags = list(TINY[trainer_of(command)])
    if "coco_small" in command:
        flags += YOLOS_MID
    return flags


def substitute(tokens, places) -> list:
    return [str(places.get(token, token)) for token in tokens]


# -- unit tier: the table and the recipes ---------------------------------------------------------------------
def test_the_table_lists_every_row_of_the_paper_once():
    ids = [row["row"] for row in read_table()]
    assert len(ids) == len(set(ids)), "a row id appears twice"
    assert REQUIRED <= set(ids), f"missing rows: {sorted(REQUIRED - set(ids))}"
    for row in ROWS.values():
        assert row["provenance"].startswith(("published", "derived")), row
        assert row["target (published)"], row
        float(row["training FLOPs"])  # a number, from the FLOP calculator
    # nothing claims a ToE number the project could not read: the targets are the baselines or "unknown"
    assert all("unknown" in row["target (published)"] for name, row in ROWS.items() if not name.endswith("-full"))


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_row_names_existing_files_and_known_placeholders(name):
    tokens = shlex.split(ROWS[name]["command"])
    assert tokens[0] in ("bash", "python"), tokens
    assert (ROOT / tokens[1]).is_file(), f"{name}: {tokens[1]} does not exist"
    if "-c" in tokens:
        assert (ROOT / tokens[tokens.index("-c") + 1]).is_file(), name
    for token in tokens[2:]:
        if re.fullmatch(r"[A-Z][A-Z0-9_]+", token):
            assert token in PLACEHOLDERS, f"{name}: unknown placeholder {token}"
    assert "OUT" in tokens, f"{name}: no output folder"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_row_passes_its_trainers_flag_and_schedule_checks(name):
    """Parsed in this process as the trainer parses it (the recipe's values through the flags' own
    checks), then the operator built from the flags (the schedule's checks)."""
    from ToE.common.args import build_token_select

    tokens = shlex.split(ROWS[name]["command"])
    trainer = trainer_of(ROWS[name]["command"])
    if tokens[0] == "bash":  # the script passes its recipe; its positional arguments are not flags
        positional = {"lvvit": 3, "yolos": 3}.get(trainer, 2)
        argv = ["-c", str(ROOT / script_config(tokens[1])), *tokens[2 + positional:]]
    else:
        argv = tokens[2:]
    args = importlib.import_module(PARSERS[trainer]).parse_args(argv)
    build_token_select(args)
    assert args.global_batch is not None, f"{name}: the recipe states no global batch"


def recipe_files():
    return sorted(glob.glob(str(ROOT / "ToE" / "*" / "configs" / "*.yaml")))


def header(path: str) -> str:
    """The comment lines at the top of a recipe file, joined."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return " ".join(lines)


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_recipe_file_states_its_provenance(path):
    assert re.search(r"Provenance: (published|derived)\b", header(path)), \
        f"{os.path.relpath(path, ROOT)}: no 'Provenance: published ...' or 'Provenance: derived ...' in its header"


@pytest.mark.parametrize("path", [p for p in recipe_files() if re.search(r"_(hyper|r0_\d+|stages\d)\.yaml$|cifar", p)],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_the_reproduction_recipes_name_the_file_they_derive_from(path):
    match = re.search(r"Provenance: derived from (\S+\.yaml)", header(path))
    assert match and (ROOT / match.group(1)).is_file(), path
    base, recipe = load_config(str(ROOT / match.group(1))), load_config(path)
    assert recipe["global_batch"] and recipe["model"] == base["model"]


def test_the_hyper_recipes_mark_the_unknown_minimal_lr():
    for size in ("tiny", "small", "base"):
        text = (ROOT / "ToE" / "deit" / "configs" / f"imagenet_{size}_hyper.yaml").read_text()
        assert re.search(r"^min_lr: .*FILL IN", text, re.M), size
        assert load_config(str(ROOT / "ToE" / "deit" / "configs" / f"imagenet_{size}_hyper.yaml"))[
            "expansion_step"] == [0, 131, 261]


# -- the CIFAR converter ---------------------------------------------------------------------------------------
def fake_cifar(root: Path, dataset: str = "cifar10", per_batch: int = 4, classes: int = 3, seed: int = 0) -> Path:
    """The python-version layout with tiny batches (pickled dicts with byte-string keys, as CIFAR's)."""
    rng = np.random.default_rng(seed)
    folder, train, test, meta, label_key, names_key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                    b"labels", b"label_names"),
        "cifar100": ("cifar-100-python", ["train"], "test", "meta", b"fine_labels", b"fine_label_names")}[dataset]
    path = root / folder
    path.mkdir(parents=True)
    for name in [*train, test]:
        count = per_batch * (5 if dataset == "cifar100" and name == "train" else 1)
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 label_key: [i % classes for i in range(count)], b"filenames": [b"x.png"] * count}
        (path / name).write_bytes(pickle.dumps(batch, protocol=2))
    (path / meta).write_bytes(pickle.dumps({names_key: [f"class{c}".encode() for c in range(classes)]}, protocol=2))
    return path


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_batches_become_an_imagenet_layout_folder(tmp_path, dataset):
    from ToE.common.cifar import convert

    source = fake_cifar(tmp_path / "download", dataset)
    found, out, counts = convert(str(tmp_path / "download"), str(tmp_path / "out"))  # the folder holding it
    assert (found, counts) == (dataset, {"train": 20, "val": 4})
    assert sorted(os.listdir(tmp_path / "out" / "train")) == ["0_class0", "1_class1", "2_class2"]
    assert len(os.listdir(tmp_path / "out" / "val" / "1_class1")) == 1  # test labels 0, 1, 2, 0
    # image 1 of the first training batch: label 1, its rows the R, G, B planes of 32 x 32
    first = "data_batch_1" if dataset == "cifar10" else "train"
    row = pickle.loads((source / first).read_bytes())[b"data"][1]
    pixels = np.asarray(Image.open(tmp_path / "out" / "train" / "1_class1" / "00001.png"))
    assert pixels.shape == (32, 32, 3)
    assert np.array_equal(pixels, row.reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_conversion_is_left_alone_when_done_and_refuses_other_folders(tmp_path):
    from ToE.common.cifar import convert

    fake_cifar(tmp_path / "download")
    out = tmp_path / "out"
    convert(str(tmp_path / "download" / "cifar-10-batches-py"), str(out), "cifar10")
    image = out / "train" / "0_class0" / "00000.png"
    before = image.stat().st_mtime_ns
    convert(str(tmp_path / "download"), str(out))
    assert image.stat().st_mtime_ns == before  # a finished conversion is not written again
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="did not write"):
        convert(str(tmp_path / "download"), str(mine))
    assert os.listdir(mine) == ["photos"] and (mine / "photos" / "a.jpg").read_bytes() == b"x"
    with pytest.raises(UserError, match="holds cifar10, not cifar100"):
        convert(str(tmp_path / "download"), str(tmp_path / "other"), "cifar100")


def test_cifar_errors_say_where_the_data_comes_from(tmp_path):
    from ToE.common.cifar import convert

    with pytest.raises(UserError, match="CIFAR-10 python version .* from the CIFAR website"):
        convert(str(tmp_path / "missing"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds neither CIFAR-10's python batches"):
        convert(str(tmp_path / "empty"), str(tmp_path / "out"))
    folder = fake_cifar(tmp_path / "evil")
    (folder / "data_batch_3").write_bytes(pickle.dumps(os.system, protocol=2))  # not a CIFAR batch: never built
    with pytest.raises(UserError, match="data_batch_3 is not a CIFAR python batch"):
        convert(str(folder), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_interrupted_cifar_conversion_leaves_nothing(tmp_path, monkeypatch):
    from ToE.common.cifar import convert

    fake_cifar(tmp_path / "download")
    saved = []

    def save(self, path, *args, **kwargs):
        if len(saved) == 5:
            raise KeyboardInterrupt
        saved.append(path)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tmp_path / "download"), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["download"]  # no output folder, no staging folder left


# -- e2e tier: every row's command ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The placeholders' tiny stand-ins (OUT is set per row)."""
    import timm
    import torch

    from ToE.common.cifar import convert

    root = tmp_path_factory.mktemp("reproduce")
    images = write_images(root / "images")
    labels = root / "labels"
    generator = torch.Generator().manual_seed(0)
    for image in sorted((images / "train").rglob("*.png")):  # LV-ViT token labels: top-5 logits and indices
        logits = torch.randn(3, 4, 4, generator=generator)
        values, indices = logits.topk(3, dim=0)
        values = torch.cat([values, values[-1:].expand(2, -1, -1)])
        indices = torch.cat([indices, indices[-1:].expand(2, -1, -1)])
        path = labels / image.parent.name / f"{image.name.split('.')[0]}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.stack([values, indices.float()]).half(), path)
    coco = str(write_coco(root / "coco"))
    init = root / "init.pth"  # the YOLOS backbone's "ImageNet weights": the tiny backbone's shape
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                 depth=3, num_heads=2).state_dict(), init)
    ckpt = root / "pretrained.pth"  # a "DeiT-S checkpoint" of the tiny shape, 10 classes (the head is dropped)
    torch.save(timm.create_model("deit_small_patch16_224", pretrained=False, img_size=16, patch_size=4,
                                 embed_dim=32, depth=2, num_heads=2, num_classes=10).state_dict(), ckpt)
    cifar = {}
    for dataset in ("cifar10", "cifar100"):
        fake_cifar(root / f"{dataset}-download", dataset)
        cifar[dataset.upper()] = convert(str(root / f"{dataset}-download"), str(root / dataset))[1]
    return {"DATA": images, "LABELS": labels, "COCO": coco, "INIT_T": init, "INIT_S": init, "CKPT_TOE": ckpt,
            "CKPT_FULL": ckpt, **cifar}


def launch_env(**extra):
    env = child_env()
    for key in ("DRY_RUN", "NNODES", "NODE_RANK", "MASTER_ADDR"):
        env.pop(key, None)
    env.update(NPROC="1", CUDA_VISIBLE_DEVICES="", MASTER_PORT="29500", **extra)
    return env


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_row_trains_one_epoch_with_a_tiny_model(name, places, tmp_path, capsys):
    """The row's command with a tiny model and data: a run script's command as its DRY_RUN=1 line
    prints it (PYTHON=false: no interpreter starts), then one epoch of it trains in this process
    (no interpreter start per row: about a second each)."""
    command = ROWS[name]["command"]
    tokens = substitute(shlex.split(command), {**places, "OUT": tmp_path / "out"}) + tiny_flags(command)
    if tokens[0] == "bash":
        dry = subprocess.run(tokens, cwd=ROOT, env=launch_env(DRY_RUN="1", PYTHON="false"), capture_output=True,
                             text=True, timeout=60, check=False)
        assert dry.returncode == 0, dry.stderr
        printed = shlex.split(dry.stdout.strip())
        argv = printed[next(i for i, word in enumerate(printed) if word.endswith("main.py")) + 1:]
    else:
        argv = tokens[2:]
    if trainer_of(command) == "et":
        argv += ["--stop-after-epochs", "1"]  # one epoch of the 5-epoch curriculum
    module = importlib.import_module(PARSERS[trainer_of(command)])
    module.main(module.parse_args(argv))
    log = read_log(tmp_path / "out")
    assert len(log) == 1 and (tmp_path / "out" / "checkpoint.pth").is_file(), capsys.readouterr().out


@pytest.mark.e2e
@pytest.mark.parametrize("name", TRAINED)
def test_a_row_per_trainer_trains_one_epoch_through_its_command(name, places, tmp_path):
    command = ROWS[name]["command"]
    out = tmp_path / "out"
    tokens = substitute(shlex.split(command), {**places, "OUT": out}) + tiny_flags(command)
    if trainer_of(command) == "et":
        tokens += ["--stop-after-epochs", "1"]
    tokens[0] = "bash" if tokens[0] == "bash" else sys.executable
    ok(subprocess.run(tokens, cwd=ROOT, env=launch_env(PYTHON=sys.executable), capture_output=True, text=True,
                      timeout=600, check=False))
    log = read_log(out)
    assert len(log) == 1, log  # one epoch trained and logged
    assert (out / "checkpoint.pth").is_file()
    stored = yaml.safe_load((out / "args.yaml").read_text())
    if name == "lvvit-s":
        assert stored["token_label"] and stored["token_label_data"] == str(places["LABELS"])
    if name == "cifar10-toe":
        assert stored["finetune"] == str(places["CKPT_TOE"]) and stored["data_path"] == str(places["CIFAR10"])
