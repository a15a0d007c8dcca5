"""Audit: the newer trainers (LV-ViT, EfficientTrain, YOLOS; DeiT where a case applies) tried as a
careless or unlucky user would, each outcome classified.

    python bench/audit.py --repo /tmp/audit-old --label before     # the code before the current work
    python bench/audit.py --repo .              --label after
    python bench/audit.py --repo . --label after --only yolos_empty_val_split   # re-run one case
    python bench/audit.py --report                                  # rewrite audit.md from audit.jsonl

Every case is a small function (the CASES registry below) that builds its inputs in a temporary
folder, runs the command of the checkout given by ``--repo`` (a subprocess, OMP_NUM_THREADS=1,
TQDM_DISABLE=1, cwd = that checkout, PYTHONPATH = that checkout, on the CPU) and looks at the exit
code, stderr, the files written, log.txt and args.yaml. Its docstring says what a user of
timm/DeiT would expect. The outcome is one of

    ok         what was asked was done, or it was refused in one line naming the problem (exit 2)
    poor       exit 2, but not one line naming the problem, or a misleading message
    traceback  a Python traceback, or an error only after training had started
    silent     accepted, but it computed something other than what was asked, or reported something false
    lost       user data deleted or replaced

Results: one record per case and checkout in bench/results/audit.jsonl (a run replaces the records
of its label, or with --only those of its cases), and bench/results/audit.md rebuilt from all of
them (a table per trainer with the counts before and after, then every case with its class before
and after and a one-line reason). Tiny models and data (16-32 px, 2 blocks, 32 wide, 1-2 epochs):
the whole audit takes a few minutes on 2 cores (``--jobs 2`` runs two cases at a time).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parents[1]
RESULTS = HERE / "bench" / "results"
CLASSES = ("ok", "poor", "traceback", "silent", "lost")
OK, POOR, TRACEBACK, SILENT, LOST = CLASSES
# groups of cases: a trainer, the tools, or (issue 27's hardening) the root a case belongs to
ROOTS = ("lost", "recipes", "combos", "writes", "scripts", "messages")
TRAINERS = ("lvvit", "et", "yolos", "deit", "tools", *ROOTS)
TRAINER_TITLES = {"lvvit": "LV-ViT", "et": "EfficientTrain", "yolos": "YOLOS", "deit": "DeiT",
                  "tools": "Tools (FLOP calculator)",
                  "lost": "Lost data (builders, one writer per output folder)",
                  "recipes": "Recipe values (-c FILE.yaml through the flags' own checks)",
                  "combos": "Feature combinations (VPT, LV-ViT, attach, summary)",
                  "writes": "Interrupted and failing writes (what was saved, signals, full disk)",
                  "scripts": "Scripts (demo, Slurm, label generation)",
                  "messages": "Messages that name the real problem and the fix"}
MAIN = {"deit": "ToE/deit/main.py", "lvvit": "ToE/lvvit/main.py", "et": "ToE/EfficientTrain/main.py",
        "yolos": "ToE/yolos/main.py"}
# what every trainer prints when training starts (both checkouts): an error after it is a late one
STARTED = "ToE stages start at epochs"

# -- tiny recipes (the tests' flag sets, 1-2 epochs) ---------------------------------------------------
CPU = ["--device", "cpu", "--num_workers", "0"]
DEIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2",
        "--input-size", "16", "--patch-size", "4", *CPU, "--no-pin-mem", "--batch-size", "4", "--warmup-epochs", "0",
        "--lr", "1e-3", "--unscale-lr", "--no-repeated-aug", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
        "--epochs", "2", "--expansion-step", "0", "1", "2", "--keep-rate", "0.5", "0.75", "1.0"]
LVVIT = ["--model", "lvvit_digits", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2", "stem_dim=8",
         "--img-size", "16", "--patch-size", "4", "--crop-pct", "1.0", *CPU, "--no-pin-mem", "-b", "4",
         "--warmup-epochs", "0", "--cooldown-epochs", "0", "--lr", "1e-3", "--epochs", "2",
         "--expansion-step", "0", "1", "2", "--keep-rate", "0.4", "0.7", "1.0", "--initialization-keep-rate", "0.2"]
# the et preset over 5 epochs at 32 px, 4 px patches: crops 24, 24, 24, 28, 32
ET = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2",
      "--input-size", "32", "--patch-size", "4", *CPU, "--no-pin-mem", "--batch-size", "4", "--global-batch", "8",
      "--warmup-epochs", "0", "--lr", "1e-3", "--unscale-lr", "--no-repeated-aug", "--aa", "none", "--reprob", "0",
      "--mixup", "0", "--cutmix", "0", "--epochs", "5", "--expansion-step", "0", "2", "4",
      "--keep-rate", "0.6", "0.8", "1.0", "--initialization-keep-rate", "0.3"]
YOLOS = ["--backbone_name", "vit_tiny_patch16_224", "--backbone-kwargs", "img_size=32", "patch_size=8",
         "embed_dim=32", "depth=3", "num_heads=2", "--det_token_num", "5", "--init_pe_size", "32", "32",
         "--mid_pe_size", "32", "32", "--scales", "24", "32", "40", "--max-size", "56", "--select-scales", "24", "32",
         "--crop-size", "16", "24", "--eval_size", "32", *CPU, "--batch_size", "2", "--lr", "1e-3", "--epochs", "1",
         "--expansion-step", "1", "2", "3", "--seed", "0"]
RECIPES = {"deit": DEIT, "lvvit": LVVIT, "et": ET, "yolos": YOLOS}


# ---------------------------------------------------------------------------------------------------
# Outcomes and judging
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    cls: str
    reason: str


@dataclasses.dataclass
class Result:
    """One finished command."""

    cmd: List[str]
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err


_PY_WARNING = re.compile(r"(\w+Warning: )|(^\s*warnings\.warn\()")


def error_lines(result: Result) -> List[str]:
    """The non-empty stderr lines, without Python library warnings (a UserWarning and its source line)."""
    lines, skip_next = [], False
    for line in result.err.splitlines():
        if skip_next:
            skip_next = False
            continue
        if _PY_WARNING.search(line):
            skip_next = line.startswith("/") or ".py:" in line  # "file.py:12: UserWarning: ..." then the source
            continue
        if line.strip():
            lines.append(line.strip())
    return lines


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(nothing on stderr)"


TIDY: Dict[str, str] = {}  # long paths -> short names in reasons (the run's temporary folder, the checkout)


def short(text: str, limit: int = 220) -> str:
    for path, name in TIDY.items():
        text = text.replace(path, name)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _matches(line: str, needles: Sequence) -> bool:
    """Every needle is in ``line`` (case-insensitive); a tuple needle matches when any of its parts does."""
    low = line.lower()
    return all(any(part.lower() in low for part in (n if isinstance(n, tuple) else (n,))) for n in needles)


def judge_refusal(result: Result, needles: Sequence = (), accepted: Optional[Outcome] = None,
                  misleading: str = "") -> Outcome:
    """The class of a command that should have been refused up front in one line naming ``needles``.

    rc 0 -> ``accepted`` (default: silent); a traceback, an exit other than 0/2, or an error after
    training started -> traceback; exit 2 in more than one line -> poor; one line that does not name
    the needles -> poor (``misleading`` explains why); else ok.
    """
    if "Traceback (most recent call last)" in result.text:
        return Outcome(TRACEBACK, f"traceback: {short(last_line(result.err))}")
    if result.rc == 0:
        return accepted or Outcome(SILENT, "accepted without a word")
    lines = error_lines(result)
    if result.rc != 2:
        return Outcome(TRACEBACK, f"exit {result.rc}: {short(last_line(result.err))}")
    if STARTED in result.out:
        return Outcome(TRACEBACK, f"late: refused only after training started: {short(lines[-1] if lines else '')}")
    if len(lines) != 1 or "error" not in lines[0]:
        return Outcome(POOR, f"exit 2 with {len(lines)} lines on stderr: {short(lines[0] if lines else '')}")
    if needles and not _matches(lines[0], needles):
        return Outcome(POOR, f"{misleading or 'the message does not name the problem'}: {short(lines[0])}")
    return Outcome(OK, f"refused in one line: {short(lines[0])}")


def judge_ran(result: Result) -> Optional[Outcome]:
    """None when the command ran (exit 0); else its failure class (a crash is a traceback)."""
    if result.rc == 0 and "Traceback (most recent call last)" not in result.text:
        return None
    if result.rc == 2 and "Traceback" not in result.text and STARTED not in result.out:
        lines = error_lines(result)
        return Outcome(POOR if len(lines) != 1 else OK, f"refused: {short(lines[0] if lines else '')}")
    return judge_refusal(result)


def read_log(out: Path) -> List[dict]:
    path = out / "log.txt"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------
# Data writers (no code of the checkout under test: the same files for both checkouts)
# ---------------------------------------------------------------------------------------------------
def write_images(root: Path, train: int = 4, val: int = 2, classes: int = 3, size: int = 32,
                 names: Optional[Dict[int, List[str]]] = None, seed: int = 0) -> Path:
    """ImageNet layout root/{train,val}/class<c>/<i>.png; class c is brighter by c. ``names``: file
    names of a train class instead of 0.png, 1.png, ..."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            files = (names or {}).get(c) if split == "train" else None
            for name in files or [f"{i}.png" for i in range(count)]:
                Image.fromarray((rng.random((size, size, 3)) * 90 + 80 * c).astype(np.uint8)).save(folder / name)
    return root


def label_tensor(classes: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """One token-label file in the published format: fp16 (2, 5, side, side), top-5 logits and indices."""
    logits = torch.randn(classes, side, side, generator=generator)
    values, indices = logits.topk(min(5, classes), dim=0)
    pad = 5 - values.shape[0]
    values = torch.cat([values, values[-1:].expand(pad, -1, -1)])
    indices = torch.cat([indices, indices[-1:].expand(pad, -1, -1)])
    return torch.stack([values, indices.float()]).half()


def write_labels(images: Path, labels: Path, side: int = 4, classes: int = 3, seed: int = 0) -> Path:
    """labels/<class>/<stem>.pt for every train image (stem: the name up to its first '.')."""
    generator = torch.Generator().manual_seed(seed)
    for image in sorted((images / "train").rglob("*.png")):
        path = labels / image.parent.name / f"{image.name.split('.')[0]}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(label_tensor(classes, side, generator), path)
    return labels


def write_coco(root: Path, edit: Optional[Callable[[str, dict], None]] = None, splits=(("train", 8), ("val", 4)),
               seed: int = 0) -> Path:
    """The tests' tiny COCO layout: 32 x 40 canvases with 1-2 bright squares (category 1 or 2); train
    image 1 has none. ``edit(split, data)`` changes a split's json before it is written."""
    rng = np.random.RandomState(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in splits:
        (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for image_id in range(1, count + 1):
            pixels = rng.randint(0, 30, size=(32, 40, 3)).astype(np.uint8)
            for _ in range(0 if image_id == 1 and split == "train" else rng.randint(1, 3)):
                w, h = rng.randint(6, 14, size=2)
                x, y = rng.randint(0, 40 - w), rng.randint(0, 32 - h)
                category = int(rng.randint(1, 3))
                pixels[y:y + h, x:x + w] = 120 * category
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category,
                             "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0})
            name = f"{image_id:04d}.png"
            Image.fromarray(pixels).save(root / f"{split}2017" / name)
            images.append({"id": image_id, "file_name": name, "width": 40, "height": 32})
        data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
        if edit is not None:
            edit(split, data)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


# ---------------------------------------------------------------------------------------------------
# The context a case runs in
# ---------------------------------------------------------------------------------------------------
class Fixtures:
    """Inputs several cases read (never write), built once per audit run, lazily and thread-safely."""

    def __init__(self, audit: "Audit") -> None:
        self.audit, self.root = audit, audit.tmp / "fixtures"
        self._lock, self._made = threading.RLock(), {}

    def _once(self, name: str, make: Callable[[Path], object]):
        with self._lock:
            if name not in self._made:
                folder = self.root / name
                folder.mkdir(parents=True, exist_ok=True)
                self._made[name] = make(folder)
            return self._made[name]

    def images(self) -> Path:
        return self._once("images", lambda folder: write_images(folder))

    def labels(self) -> Path:
        return self._once("labels", lambda folder: write_labels(self.images(), folder))

    def coco(self) -> Path:
        return self._once("coco", lambda folder: write_coco(folder))

    def yolos_checkpoint(self) -> Path:
        """A tiny YOLOS run of the checkout under test (1 epoch, the default tiny schedule)."""
        def make(folder: Path) -> Path:
            result = self.audit.run([sys.executable, MAIN["yolos"], *YOLOS, "--coco_path", str(self.coco()),
                                     "--output_dir", str(folder / "run")])
            if result.rc != 0:
                raise RuntimeError(f"the YOLOS fixture run failed: {last_line(result.err)}")
            return folder / "run" / "checkpoint.pth"
        return self._once("yolos_run", make)


class Context:
    """What a case gets: its own empty folder, the checkout, the shared inputs and the runners."""

    def __init__(self, audit: "Audit", name: str) -> None:
        self.audit, self.repo, self.fixtures = audit, audit.repo, audit.fixtures
        # a neutral folder name: a message is judged by the words it uses, not by the case's name in a path
        self.tmp = audit.tmp / "cases" / f"c{[c.name for c in CASES].index(name):02d}"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.results: List[Result] = []

    def run(self, cmd: Sequence[str], **kwargs) -> Result:
        result = self.audit.run(cmd, **kwargs)
        self.results.append(result)
        return result

    def main(self, trainer: str, *args, recipe: bool = True, **kwargs) -> Result:
        """``python <trainer's main.py> [tiny recipe] args`` (later flags win over the recipe's)."""
        flags = RECIPES[trainer] if recipe else []
        return self.run([sys.executable, MAIN[trainer], *flags, *map(str, args)], **kwargs)

    def module(self, name: str, *args, **kwargs) -> Result:
        return self.run([sys.executable, "-m", name, *map(str, args)], **kwargs)

    def bash(self, script: str, *args, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> Result:
        return self.run(["bash", script, *map(str, args)], env=env, cwd=cwd)

    def data_args(self, trainer: str) -> List[str]:
        """The trainer's data flag on the shared tiny data."""
        if trainer == "yolos":
            return ["--coco_path", str(self.fixtures.coco())]
        if trainer == "lvvit":
            return ["--data-path", str(self.fixtures.images()), "--token-label", "--token-label-data",
                    str(self.fixtures.labels()), "--token-label-size", "4"]
        return ["--data-path", str(self.fixtures.images())]


class Audit:
    """One audit run over one checkout."""

    def __init__(self, repo: Path, tmp: Path, timeout: int) -> None:
        self.repo, self.tmp, self.timeout = repo, tmp, timeout
        self.fixtures = Fixtures(self)

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1",
                   PYTHONPATH=str(self.repo), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DRY_RUN", "NPROC", "NNODES", "PYTHONSTARTUP"):
            env.pop(key, None)
        env.update(extra or {})
        return env

    def run(self, cmd: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
            timeout: Optional[int] = None) -> Result:
        started = time.monotonic()
        try:
            done = subprocess.run(list(cmd), cwd=cwd or self.repo, env=self.env(env), capture_output=True,
                                  text=True, timeout=timeout or self.timeout, check=False)
            rc, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as expired:
            rc, out = 124, expired.stdout or ""
            err = (expired.stderr or "") + f"\n(killed after {timeout or self.timeout} s)"
            out, err = (out.decode() if isinstance(out, bytes) else out), (err.decode() if isinstance(err, bytes)
                                                                         else err)
        return Result(list(cmd), rc, out, err, time.monotonic() - started)


# ---------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    name: str
    trainer: str
    func: Callable[[Context], Outcome]

    @property
    def doc(self) -> str:
        return " ".join((self.func.__doc__ or "").split())


CASES: List[Case] = []


def case(trainer: str):
    def register(func: Callable[[Context], Outcome]) -> Callable[[Context], Outcome]:
        CASES.append(Case(func.__name__, trainer, func))
        return func
    return register


# -- LV-ViT ------------------------------------------------------------------------------------------
@case("lvvit")
def lvvit_shared_label_stem(ctx: Context) -> Outcome:
    """Two train images whose names share a stem (img.0.png and img.1.png in one class folder) with
    --token-label: both read the label file img.pt (the stem is the name up to its first '.'), so one
    image trains on the other's dense labels. Expected: refused in one line naming the files."""
    images = write_images(ctx.tmp / "data", names={0: ["img.0.png", "img.1.png", "2.png", "3.png"]})
    labels = write_labels(images, ctx.tmp / "labels")
    result = ctx.main("lvvit", "--data-path", images, "--token-label", "--token-label-data", labels,
                      "--token-label-size", 4, "--output_dir", ctx.tmp / "out")
    return judge_refusal(result, needles=["img"], accepted=Outcome(
        SILENT, "accepted: img.0.png and img.1.png both trained on labels/class0/img.pt"))


@case("lvvit")
def lvvit_label_data_without_token_label(ctx: Context) -> Outcome:
    """--token-label-data DIR without --token-label: the published flag that turns the labels on is
    missing, so the run trains on class labels only. Expected: refused, or at least a warning that
    names --token-label; training without labels and saying nothing is silent."""
    out = ctx.tmp / "out"
    result = ctx.main("lvvit", "--data-path", ctx.fixtures.images(), "--token-label-data", ctx.fixtures.labels(),
                      "--token-label-size", 4, "--output_dir", out)
    said = [line for line in result.text.splitlines() if "--token-label" in line and "warning" in line.lower()]
    if result.rc == 0 and said:
        return Outcome(OK, f"trained with a warning: {short(said[0])}")
    return judge_refusal(result, needles=["--token-label"], accepted=Outcome(
        SILENT, "trained on class labels only, without a word about the unused --token-label-data"))


@case("lvvit")
def lvvit_label_map_of_another_size(ctx: Context) -> Outcome:
    """One label file (class1/2.pt, not the first one) holds an 8 x 8 map, the others 4 x 4 (two
    generations mixed). Only the first file is read before training; the odd one meets the others in
    a batch. Expected: refused before training in one line naming the file (a crash mid-epoch is a
    traceback); training through it is acceptable only because roi_align pools any map size."""
    images = write_images(ctx.tmp / "data")
    labels = write_labels(images, ctx.tmp / "labels")
    torch.save(label_tensor(3, 8, torch.Generator().manual_seed(1)), labels / "class1" / "2.pt")
    result = ctx.main("lvvit", "--data-path", images, "--token-label", "--token-label-data", labels,
                      "--token-label-size", 4, "--output_dir", ctx.tmp / "out")
    return judge_refusal(result, needles=["2.pt"], accepted=Outcome(
        OK, "trained: every map pooled to the 4 x 4 grid by roi_align"))


@case("lvvit")
def lvvit_truncated_label_file(ctx: Context) -> Outcome:
    """One label file (class1/2.pt, not the first one) cut to half its bytes (a copy interrupted).
    Expected: refused before training in one line naming the file; an error mid-epoch (after the
    run has started, its folder written) is a late error."""
    images = write_images(ctx.tmp / "data")
    labels = write_labels(images, ctx.tmp / "labels")
    bad = labels / "class1" / "2.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    result = ctx.main("lvvit", "--data-path", images, "--token-label", "--token-label-data", labels,
                      "--token-label-size", 4, "--output_dir", ctx.tmp / "out")
    return judge_refusal(result, needles=["2.pt"])


@case("lvvit")
def lvvit_resume_without_token_label(ctx: Context) -> Outcome:
    """Resume a run trained with --token-label without it (the same command, one flag forgotten): the
    rest of the run would train on another loss and data. Expected: refused in one line naming
    --token-label, as a changed --model or --lr is."""
    out = ctx.tmp / "out"
    first = ctx.main("lvvit", *ctx.data_args("lvvit"), "--output_dir", out, "--stop-after-epochs", 1)
    if (failed := judge_ran(first)) is not None:
        return Outcome(failed.cls, f"the first run failed: {failed.reason}")
    result = ctx.main("lvvit", "--data-path", ctx.fixtures.images(), "--output_dir", out,
                      "--resume", out / "checkpoint.pth")
    return judge_refusal(result, needles=["token-label"], accepted=Outcome(
        SILENT, "resumed without token labels: epoch 1 trained on another loss, nothing said"))


@case("lvvit")
def lvvit_resume_with_other_cooldown(ctx: Context) -> Outcome:
    """Resume a run of --epochs 3 --cooldown-epochs 1 with --cooldown-epochs 0 (--epochs unchanged):
    the lr schedule of the run would bend. Expected: refused in one line naming --cooldown-epochs
    (a message about an --epochs value the user never gave is misleading)."""
    out = ctx.tmp / "out"
    first = ctx.main("lvvit", *ctx.data_args("lvvit"), "--output_dir", out, "--epochs", 3, "--cooldown-epochs", 1,
                     "--stop-after-epochs", 1)
    if (failed := judge_ran(first)) is not None:
        return Outcome(failed.cls, f"the first run failed: {failed.reason}")
    result = ctx.main("lvvit", *ctx.data_args("lvvit"), "--output_dir", out, "--epochs", 3, "--cooldown-epochs", 0,
                      "--resume", out / "checkpoint.pth")
    return judge_refusal(result, needles=["cooldown"], misleading="names the total epochs, not --cooldown-epochs",
                         accepted=Outcome(SILENT, "resumed with another cooldown: the lr schedule changed mid-run"))


@case("lvvit")
def lvvit_generate_label_into_existing_folder(ctx: Context) -> Outcome:
    """python -m ToE.lvvit.generate_label --out LABELS where LABELS already holds label files (another
    teacher's). Expected: refused in one line (or an explicit flag needed to replace them); replacing
    them without being asked loses the user's labels."""
    teacher = ctx.tmp / "teacher.pth"
    made = ctx.run([sys.executable, "-c", "import sys, timm, torch, ToE.lvvit; torch.manual_seed(0); "
                    "torch.save(timm.create_model('digits_cnn', num_classes=3).state_dict(), sys.argv[1])",
                    str(teacher)])
    if made.rc != 0:
        return Outcome(TRACEBACK, f"could not build the digits_cnn teacher: {short(last_line(made.err))}")
    labels = ctx.tmp / "labels"
    shutil.copytree(ctx.fixtures.labels(), labels)
    before = {p: p.read_bytes() for p in labels.rglob("*.pt")}
    result = ctx.module("ToE.lvvit.generate_label", "--model", "digits_cnn", "--checkpoint", teacher,
                        "--data-path", ctx.fixtures.images(), "--out", labels, "--img-size", 32, "-b", 4,
                        "--device", "cpu", "--num-workers", 0)
    replaced = [p for p, data in before.items() if not p.exists() or p.read_bytes() != data]
    if replaced:
        return Outcome(LOST, f"{len(replaced)} of {len(before)} existing label files replaced without a flag "
                             f"(exit {result.rc}): {short(last_line(result.text))}")
    return judge_refusal(result, needles=[("exist", "already", "holds")], accepted=Outcome(
        OK, "ran without touching the existing files"))


@case("lvvit")
def lvvit_run_script_on_the_cpu(ctx: Context) -> Outcome:
    """ToE/lvvit/run/imagenet_small_run1.sh on a machine without a GPU: DRY_RUN=1 shows the command
    (the launcher adds --device cpu), then the script runs with tiny overrides after its recipe. The
    recipe's --apex-amp (fp16) refuses the CPU. Expected: the command runs on the CPU (e.g. fp16
    becomes a note), or a one-line refusal that names --apex-amp / the script; a message about
    --amp-dtype float16, a flag the user never gave, is misleading."""
    script = "ToE/lvvit/run/imagenet_small_run1.sh"
    images, labels, out = ctx.fixtures.images(), ctx.fixtures.labels(), ctx.tmp / "out"
    dry = ctx.bash(script, images, labels, out, env={"DRY_RUN": "1"})
    command = dry.out.strip()
    if dry.rc != 0 or not command:
        return Outcome(POOR, f"DRY_RUN=1 printed no command (exit {dry.rc}): {short(last_line(dry.err))}")
    if "--device cpu" not in command:
        return Outcome(SILENT, "the printed command does not pass --device cpu on a machine without a GPU")
    tiny = ["--model", "lvvit_digits", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2", "stem_dim=8",
            "--img-size", 16, "--patch-size", 4, "--token-label-size", 4, "-b", 4, "--epochs", 1,
            "--cooldown-epochs", 0, "--warmup-epochs", 0, "--num_workers", 0, "--no-pin-mem"]
    result = ctx.bash(script, images, labels, out, *tiny)
    if result.rc == 0:
        return Outcome(OK, "the recipe runs on the CPU" + (" (--apex-amp in the command)" if "--apex-amp" in command
                                                           else ""))
    return judge_refusal(result, needles=[("--apex-amp", "imagenet_small_run1")],
                         misleading="the recipe's --apex-amp refuses the CPU, the message names --amp-dtype float16")


@case("lvvit")
def lvvit_aa_policy_labels_cannot_follow(ctx: Context) -> Outcome:
    """--token-label with --aa original (timm's AutoAugment, a DeiT user's usual alternative): the
    label-aware augmentation only knows RandAugment (rand-*), whose geometric ops it mirrors on the
    label maps. Expected: refused in one line naming --aa (a crash is a traceback; training with the
    policy silently dropped or not applied to the maps is silent)."""
    result = ctx.main("lvvit", *ctx.data_args("lvvit"), "--aa", "original", "--output_dir", ctx.tmp / "out")
    return judge_refusal(result, needles=["--aa"], accepted=Outcome(
        SILENT, "accepted --aa original with token labels (the label maps cannot follow AutoAugment's ops)"))


# -- EfficientTrain -------------------------------------------------------------------------------------
@case("et")
def et_patch_size_in_model_kwargs(ctx: Context) -> Outcome:
    """--model vit_tiny_patch16_224 --model-kwargs ... patch_size=4 (instead of --patch-size 4) at
    --input-size 32: the model has 4 px patches, so the et curriculum's first crop is 24 px (36 patch
    tokens). If the planner reads the patch from the model's name (16) it plans crops for 16 px
    patches. Expected: the curriculum and the logged patch tokens follow the model's real patch, or a
    one-line refusal naming patch_size."""
    kwargs = ["--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2", "patch_size=4"]
    at = ET.index("--patch-size")
    base = ET[:at] + ET[at + 2:]  # the recipe without --patch-size 4
    out = ctx.tmp / "out"
    result = ctx.run([sys.executable, MAIN["et"], *base, *kwargs, "--data-path", str(ctx.fixtures.images()),
                      "--output_dir", str(out), "--stop-after-epochs", "1"])
    if result.rc != 0:
        return judge_refusal(result, needles=["patch"])
    log = read_log(out)
    if not log:
        return Outcome(SILENT, "exit 0 but no log.txt")
    crop, tokens = log[0].get("resolution"), log[0].get("patch_tokens")
    expected = (crop // 4) ** 2 if crop else None
    if crop == 24 and tokens == 36:
        return Outcome(OK, "crop 24 px, 36 patch tokens: the curriculum follows the model's 4 px patches")
    return Outcome(SILENT, f"epoch 0 trained at {crop} px with {tokens} patch tokens logged "
                           f"((crop/4)^2 = {expected}); the et crop for 4 px patches is 24 px: planned for patch 16")


@case("et")
def et_segments_without_table(ctx: Context) -> Outcome:
    """--segments 2:16:1 5:32:9 without --curriculum table (the default is et): the table is ignored
    and the et preset trains. Expected: refused in one line naming --segments/--curriculum, or a
    warning that it is ignored; training the preset without a word is silent."""
    out = ctx.tmp / "out"
    result = ctx.main("et", "--data-path", ctx.fixtures.images(), "--segments", "2:16:1", "5:32:9",
                      "--output_dir", out, "--stop-after-epochs", 1)
    said = [line for line in result.text.splitlines() if "--segments" in line and "warning" in line.lower()]
    if result.rc == 0:
        log = read_log(out)
        crop = log[0].get("resolution") if log else None
        if crop == 16:
            return Outcome(OK, "the --segments table was used (epoch 0 at 16 px)")
        if said:
            return Outcome(OK, f"trained the preset with a warning: {short(said[0])}")
        return Outcome(SILENT, f"--segments ignored without a word: epoch 0 trained at {crop} px (et preset), "
                               "not the table's 16 px")
    return judge_refusal(result, needles=[("--segments", "--curriculum")])


@case("et")
def et_global_batch_larger_than_data(ctx: Context) -> Outcome:
    """--global-batch 64 on a train split of 12 images: not one update per epoch. Expected: refused
    in one line naming the batch and the image count (a crash or an epoch of zero updates is not)."""
    out = ctx.tmp / "out"
    result = ctx.main("et", "--data-path", ctx.fixtures.images(), "--global-batch", 64, "--output_dir", out,
                      "--stop-after-epochs", 1)
    log = read_log(out)
    return judge_refusal(result, needles=[("batch", "global")], accepted=Outcome(
        SILENT, f"trained an epoch of no update (log: {short(json.dumps(log[0]) if log else 'none', 120)})"))


@case("et")
def et_mixup_with_odd_segment_batch(ctx: Context) -> Outcome:
    """Mixup/CutMix on, --curriculum table --segments 2:24:1:3 5:32:9 with --batch-size 6
    --global-batch 6: the first segment's per-process batch is 3, odd, and timm's Mixup pairs each
    image with its mirror. --batch-size itself is even. Expected: refused before training in one line
    naming the segment's batch (a failure in the first step is a traceback)."""
    result = ctx.main("et", "--data-path", ctx.fixtures.images(), "--mixup", 0.8, "--cutmix", 1.0,
                      "--curriculum", "table", "--segments", "2:24:1:3", "5:32:9", "--batch-size", 6,
                      "--global-batch", 6, "--output_dir", ctx.tmp / "out", "--stop-after-epochs", 1)
    return judge_refusal(result, needles=[("3", "even", "odd")], accepted=Outcome(
        OK, "trained (the odd batch was handled)"))


@case("et")
def et_resume_with_other_token_drop(ctx: Context) -> Outcome:
    """Resume a --token-drop toe run with --token-drop random (the baseline): the rest of the run
    would train another method. Expected: refused in one line naming --token-drop."""
    out = ctx.tmp / "out"
    first = ctx.main("et", "--data-path", ctx.fixtures.images(), "--output_dir", out, "--stop-after-epochs", 1)
    if (failed := judge_ran(first)) is not None:
        return Outcome(failed.cls, f"the first run failed: {failed.reason}")
    result = ctx.main("et", "--data-path", ctx.fixtures.images(), "--output_dir", out, "--token-drop", "random",
                      "--resume", out / "checkpoint.pth", "--stop-after-epochs", 1)
    return judge_refusal(result, needles=["token-drop"], accepted=Outcome(
        SILENT, "resumed a ToE run as the random-dropout baseline without a word"))


@case("et")
def et_run_script_usage_example(ctx: Context) -> Outcome:
    """The usage examples of ToE/EfficientTrain/run/imagenet_small_run1.sh, as written (its header
    comment, and the 'e.g.' line it prints without arguments), with the data and output folders
    swapped for tiny ones and --check-only added. Expected: each passes the flag checks (a complaint
    about the tiny data set's size is fine); an example the script's own recipe refuses is poor."""
    script = "ToE/EfficientTrain/run/imagenet_small_run1.sh"
    examples = []
    for line in (ctx.repo / script).read_text().splitlines():
        match = re.match(r"#\s+(bash \S*imagenet_small_run1\.sh .*)", line)
        if match:
            examples.append(("header", match.group(1).split("#")[0].replace("[extra main.py args]", "")))
    usage = ctx.bash(script)
    for line in usage.err.splitlines():
        match = re.match(r"\s*e\.g\.\s+(bash .*)", line)
        if match:
            examples.append(("usage", match.group(1)))
    if not examples:
        return Outcome(POOR, "no usage example found in the script's header or its usage message")
    verdicts = []
    for where, example in examples:
        words = shlex.split(example)
        script_path = words[1]
        # 'bash run/X.sh' is meant from the trainer's folder, 'bash ToE/.../X.sh' from the root
        cwd = ctx.repo if (ctx.repo / script_path).is_file() else ctx.repo / "ToE" / "EfficientTrain"
        if not (cwd / script_path).is_file():
            verdicts.append(Outcome(POOR, f"{where} example names {script_path}, found neither from the root nor "
                                          "the trainer's folder"))
            continue
        extra = words[4:]
        result = ctx.run(["bash", script_path, str(ctx.fixtures.images()), str(ctx.tmp / "out"), *extra,
                          "--check-only"], cwd=cwd)
        lines = error_lines(result)
        if result.rc == 0 or (result.rc == 2 and len(lines) == 1 and re.search(r"images, fewer than", lines[0])):
            verdicts.append(Outcome(OK, f"{where} example '{short(example, 80)}' passes its checks"))
        elif "Traceback" in result.text or result.rc != 2:
            verdicts.append(judge_refusal(result))
        else:
            verdicts.append(Outcome(POOR, f"the script's own recipe refuses its {where} example ("
                                          f"{short(' '.join(extra) or 'no extra flags', 40)}): "
                                          f"{short(lines[0] if lines else '', 160)}"))
    worst = max(verdicts, key=lambda o: CLASSES.index(o.cls))
    return worst if worst.cls != OK else Outcome(OK, "; ".join(v.reason for v in verdicts))


# -- YOLOS -------------------------------------------------------------------------------------------------
def _yolos_data_case(ctx: Context, edit: Callable[[str, dict], None], needles: Sequence,
                     accepted: Outcome) -> Outcome:
    root = write_coco(ctx.tmp / "coco", edit)
    result = ctx.main("yolos", "--coco_path", root, "--output_dir", ctx.tmp / "out")
    return judge_refusal(result, needles=needles, accepted=accepted)


@case("yolos")
def yolos_annotation_ids_from_zero(ctx: Context) -> Outcome:
    """Annotation ids 0, 1, 2, ... (a converter that counts from 0). pycocotools' COCOeval marks a
    matched ground truth by its id and 0 means 'unmatched', so the box with id 0 never counts as
    found: AP is scored wrongly. Expected: refused in one line naming the id."""
    def edit(split, data):
        for i, ann in enumerate(data["annotations"]):
            ann["id"] = i
    return _yolos_data_case(ctx, edit, needles=[("id 0", "ids", " id")], accepted=Outcome(
        SILENT, "accepted annotation id 0: pycocotools scores that box as never matched"))


@case("yolos")
def yolos_duplicate_annotation_ids(ctx: Context) -> Outcome:
    """Two val annotations share an id (two files concatenated). pycocotools keeps one of them in its
    id index, so the other box is scored as the first. Expected: refused in one line naming the id."""
    def edit(split, data):
        data["annotations"][1]["id"] = data["annotations"][0]["id"]
    return _yolos_data_case(ctx, edit, needles=[("duplicate", "twice", "same id", "more than once", "repeat")],
                            accepted=Outcome(SILENT, "accepted a repeated annotation id: one box scored in place "
                                                     "of the other"))


@case("yolos")
def yolos_empty_val_split(ctx: Context) -> Outcome:
    """instances_val2017.json with no images. Expected: refused in one line before training; an AP
    of 0 on 0 images reported after training is false."""
    def edit(split, data):
        if split == "val":
            data["images"], data["annotations"] = [], []
    result_outcome = _yolos_data_case(ctx, edit, needles=[("val", "validation")], accepted=Outcome(
        SILENT, "trained and reported AP on an empty val split"))
    return result_outcome


@case("yolos")
def yolos_category_lists_disagree(ctx: Context) -> Outcome:
    """train declares 1 = 'a', 2 = 'b', val declares 1 = 'b', 2 = 'a': the model learns train's ids
    and is scored by val's, so every class is scored against the other's boxes. The classification
    trainers refuse train/val class folders that differ. Expected: refused in one line naming the
    categories."""
    def edit(split, data):
        if split == "val":
            data["categories"] = [{"id": 1, "name": "b"}, {"id": 2, "name": "a"}]
    return _yolos_data_case(ctx, edit, needles=["categor"], accepted=Outcome(
        SILENT, "accepted train and val category lists that disagree"))


@case("yolos")
def yolos_zero_size_boxes(ctx: Context) -> Outcome:
    """A box of width 0 in train and in val. Training drops it without a word; in val it stays a
    ground truth no prediction can match, lowering AP. A negative size is refused already.
    Expected: refused in one line naming the annotation."""
    def edit(split, data):
        data["annotations"][0]["bbox"][2] = 0.0
        data["annotations"][0]["area"] = 0.0
    return _yolos_data_case(ctx, edit, needles=[("size", "zero", "empty")], accepted=Outcome(
        SILENT, "accepted a zero-size box (dropped in training, an unmatched ground truth in val)"))


def _missing_field(ctx: Context, split: str, where: str, field: str) -> Outcome:
    def edit(s, data):
        if s == split:
            data[where][0].pop(field)
    return _yolos_data_case(ctx, edit, needles=[field], accepted=Outcome(
        SILENT, f"accepted a {where[:-1]} without '{field}'"))


@case("yolos")
def yolos_annotation_without_bbox(ctx: Context) -> Outcome:
    """A train annotation without 'bbox'. Expected: refused in one line naming the field."""
    return _missing_field(ctx, "train", "annotations", "bbox")


@case("yolos")
def yolos_annotation_without_area(ctx: Context) -> Outcome:
    """A val annotation without 'area' (COCOeval reads it for the small/medium/large ranges).
    Expected: refused in one line before training, or the area computed from the box; a failure in
    the evaluation after training is a late error."""
    return _missing_field(ctx, "val", "annotations", "area")


@case("yolos")
def yolos_annotation_without_iscrowd(ctx: Context) -> Outcome:
    """A val annotation without 'iscrowd' (COCOeval reads it). Expected: refused in one line before
    training, or taken as 0; a failure in the evaluation after training is a late error."""
    return _missing_field(ctx, "val", "annotations", "iscrowd")


@case("yolos")
def yolos_image_without_file_name(ctx: Context) -> Outcome:
    """A train image entry without 'file_name'. Expected: refused in one line naming the field."""
    return _missing_field(ctx, "train", "images", "file_name")


@case("yolos")
def yolos_sparse_eval_of_another_schedule(ctx: Context) -> Outcome:
    """--eval --sparse-eval --resume CKPT where CKPT was trained with --expansion-step 0 1 2
    --keep-rate 0.25 0.5 1.0 (stopped after epoch 0: stage 1, a quarter of the tokens), evaluated
    with the tiny recipe's default schedule flags (--expansion-step 1 2 3: stage 0 at epoch 0, no
    reduction). Expected: the evaluation reduces as the checkpoint's own schedule did (stage 1), or
    refuses the other schedule; evaluating another stage without a word is silent."""
    out = ctx.tmp / "out"
    first = ctx.main("yolos", "--coco_path", ctx.fixtures.coco(), "--output_dir", out, "--epochs", 2,
                     "--expansion-step", 0, 1, 2, "--keep-rate", 0.25, 0.5, 1.0, "--stop-after-epochs", 1)
    if (failed := judge_ran(first)) is not None:
        return Outcome(failed.cls, f"the first run failed: {failed.reason}")
    result = ctx.main("yolos", "--coco_path", ctx.fixtures.coco(), "--eval", "--sparse-eval", "--resume",
                      out / "checkpoint.pth", "--results-json", ctx.tmp / "dets.json")
    if result.rc != 0:
        return judge_refusal(result, needles=[("expansion", "keep-rate", "schedule")])
    stage = re.search(r"sparse evaluation: .*?stage (\d+)", result.out)
    if stage and stage.group(1) == "1":
        return Outcome(OK, f"evaluated in the checkpoint's stage: {short(stage.group(0))}")
    shown = stage.group(0) if stage else "no 'sparse evaluation' line: all tokens"
    return Outcome(SILENT, f"evaluated with the flags' schedule, not the checkpoint's (stage 1): {short(shown)}")


def _tool_on_folder(ctx: Context, module: str, folder: Path, missing: bool) -> Outcome:
    result = ctx.module(module, folder)
    if missing:
        return judge_refusal(result, needles=[("does not exist", "not found", "no such", "missing")],
                             misleading="the folder does not exist, the message says something else",
                             accepted=Outcome(SILENT, "exit 0 on a folder that does not exist"))
    return judge_refusal(result, needles=[("no log", "no args", "not a", "no run", "empty", "no epoch")],
                         accepted=Outcome(SILENT, "exit 0 on an empty folder"))


@case("yolos")
def yolos_summary_missing_folder(ctx: Context) -> Outcome:
    """python -m ToE.common.summary (YOLOS included) on a folder that does not exist (a typo). Expected: one line saying
    the folder does not exist (exit 2)."""
    return _tool_on_folder(ctx, "ToE.common.summary", ctx.tmp / "run-typo", missing=True)


@case("yolos")
def yolos_summary_empty_folder(ctx: Context) -> Outcome:
    """python -m ToE.common.summary on an empty folder (a run that never finished an epoch). Expected:
    one line saying there is no run (no log.txt/args.yaml) there."""
    (ctx.tmp / "fresh").mkdir()
    return _tool_on_folder(ctx, "ToE.common.summary", ctx.tmp / "fresh", missing=False)


@case("yolos")
def yolos_figure_missing_folder(ctx: Context) -> Outcome:
    """python -m ToE.yolos.figure on a folder that does not exist. Expected: one line saying the folder
    does not exist (exit 2)."""
    return _tool_on_folder(ctx, "ToE.yolos.figure", ctx.tmp / "run-typo", missing=True)


@case("yolos")
def yolos_figure_empty_folder(ctx: Context) -> Outcome:
    """python -m ToE.yolos.figure on an empty folder. Expected: one line saying there is no run there."""
    (ctx.tmp / "fresh").mkdir()
    return _tool_on_folder(ctx, "ToE.yolos.figure", ctx.tmp / "fresh", missing=False)


@case("yolos")
def yolos_results_json_into_missing_folder(ctx: Context) -> Outcome:
    """--eval --resume CKPT --results-json NEW/dets.json where NEW does not exist yet. Expected: the
    folder is created and the json written (as --output_dir is), or a one-line refusal before the
    evaluation; a crash after the evaluation loses its work."""
    target = ctx.tmp / "new" / "deeper" / "dets.json"
    result = ctx.main("yolos", "--coco_path", ctx.fixtures.coco(), "--eval", "--resume",
                      ctx.fixtures.yolos_checkpoint(), "--results-json", target)
    if result.rc == 0 and target.is_file():
        return Outcome(OK, "folder created, detections written")
    if result.rc == 0:
        return Outcome(SILENT, "exit 0 but no results json written")
    return judge_refusal(result, needles=["results-json"])


# -- every trainer ---------------------------------------------------------------------------------------
def _aa_rand_zz(ctx: Context, trainer: str) -> Outcome:
    """--aa rand-zz: timm's RandAugment parser skips the unknown part 'zz' and builds rand-m10 with
    default settings, so a typo trains with another augmentation. Expected: refused in one line naming
    --aa (YOLOS has no --aa: an unknown-flag error is right)."""
    result = ctx.main(trainer, *ctx.data_args(trainer), "--aa", "rand-zz", "--output_dir", ctx.tmp / "out",
                      "--stop-after-epochs", 1)
    return judge_refusal(result, needles=[("--aa", "rand-zz")], accepted=Outcome(
        SILENT, "accepted --aa rand-zz (timm skips 'zz': trains timm's default RandAugment m10)"))


RUN_SCRIPTS = {"deit": "ToE/deit/run/imagenet_tiny_run1.sh", "lvvit": "ToE/lvvit/run/imagenet_small_run1.sh",
               "et": "ToE/EfficientTrain/run/imagenet_tiny_run1.sh", "yolos": "ToE/yolos/run/coco_tiny_run1.sh"}


def _overwrite_through_script(ctx: Context, trainer: str) -> Outcome:
    """bash <run script> DATA OUT --overwrite, OUT holding an unfinished run of the same recipe. The
    scripts add --auto-resume (running the same command again continues the run); with --overwrite
    the user asked to start over. DRY_RUN=1 shows whether the command holds both; then the trainer
    runs with the flags the command would pass. Expected: the old run is replaced (fresh start) or
    the two flags are refused in one line; resuming the old run is silent."""
    script = RUN_SCRIPTS[trainer]
    data = ctx.fixtures.coco() if trainer == "yolos" else ctx.fixtures.images()
    out = ctx.tmp / "out"
    positional = [data, ctx.fixtures.labels(), out] if trainer == "lvvit" else [data, out]
    if trainer == "yolos":
        positional.append(ctx.tmp / "init.pth")
    dry = ctx.bash(script, *positional, "--overwrite", env={"DRY_RUN": "1"})
    command = shlex.split(dry.out.strip()) if dry.rc == 0 else []
    if not command:
        return Outcome(POOR, f"DRY_RUN=1 printed no command (exit {dry.rc}): {short(last_line(dry.err))}")
    both = "--auto-resume" in command and "--overwrite" in command
    data_args = ctx.data_args(trainer)
    first = ctx.main(trainer, *data_args, "--output_dir", out, "--epochs", 2, "--stop-after-epochs", 1)
    if (failed := judge_ran(first)) is not None:
        return Outcome(failed.cls, f"the first run failed: {failed.reason}")
    log = out / "log.txt"
    marked = [dict(r, audit_marker=1) for r in read_log(out)]
    log.write_text("".join(json.dumps(r) + "\n" for r in marked))
    flags = [f for f in ("--auto-resume", "--overwrite") if f in command]
    result = ctx.main(trainer, *data_args, "--output_dir", out, "--epochs", 2, *flags)
    if result.rc != 0:
        return judge_refusal(result, needles=[("--overwrite", "--auto-resume")])
    kept_old = any(r.get("audit_marker") for r in read_log(out))
    if kept_old:
        return Outcome(SILENT, f"the command holds {' and '.join(flags)}; the old run was resumed, --overwrite "
                               "ignored without a word")
    return Outcome(OK, f"the command holds {' and '.join(flags)}; the old run was replaced" +
                   ("" if both else " (the script did not add --auto-resume)"))


for _trainer in ("lvvit", "et", "yolos", "deit"):
    def _aa(ctx: Context, trainer: str = _trainer) -> Outcome:
        return _aa_rand_zz(ctx, trainer)

    def _ow(ctx: Context, trainer: str = _trainer) -> Outcome:
        return _overwrite_through_script(ctx, trainer)

    _aa.__name__, _aa.__doc__ = f"{_trainer}_aa_rand_zz", _aa_rand_zz.__doc__
    _ow.__name__, _ow.__doc__ = f"{_trainer}_overwrite_through_run_script", _overwrite_through_script.__doc__
    case(_trainer)(_aa)
    case(_trainer)(_ow)


@case("tools")
def flops_patch_larger_than_image(ctx: Context) -> Outcome:
    """python -m ToE.flops --model vit_tiny_patch16_224 --input-size 8 (16 px patches on an 8 px image:
    no patch fits). Expected: refused in one line naming the sizes; a priced report of 0 patch tokens
    is false."""
    result = ctx.module("ToE.flops", "--model", "vit_tiny_patch16_224", "--input-size", 8, "--analytic-only")
    return judge_refusal(result, needles=[("patch", "input-size")], accepted=Outcome(
        SILENT, "priced a model whose patch is larger than the image: "
                + short(next((line for line in result.out.splitlines() if "patch tokens" in line), ""), 120)))


@case("tools")
def flops_lvvit_model(ctx: Context) -> Outcome:
    """python -m ToE.flops --model lvvit_s (the LV-ViT trainer's model; --help says 'timm model name, a
    VisionTransformer'). LV-ViT has a convolutional stem and a dense aux head the ViT formula does not
    price. Expected: priced right (the counted figures, with a note that the analytic formula misses
    the stem and the dense head, or both agreeing within 5 %), or a one-line refusal that says the
    calculator does not price LV-ViT; 'unknown model' for the project's own model is misleading."""
    result = ctx.module("ToE.flops", "--model", "lvvit_s", "--epochs", 3, "--expansion-step", 0, 1, 2,
                        "--keep-rate", 0.4, 0.7, 1.0, "--initialization-keep-rate", 0.2, timeout=300)
    if result.rc != 0:
        outcome = judge_refusal(result, needles=[("lv-vit", "lvvit")])
        if outcome.cls == OK and "unknown model" in outcome.reason.lower():
            return Outcome(POOR, "misleading: the project's own model is called unknown (the calculator does not "
                                 f"import ToE.lvvit): {outcome.reason.split(': ', 1)[-1]}")
        return outcome
    table = [[c.strip() for c in row.strip().strip("|").split("|")] for row in result.out.splitlines()
             if row.startswith("|") and not row.startswith("|---")]
    ratios = []
    if table and "GFLOPs counted" in table[0] and "GFLOPs analytic" in table[0]:
        counted, analytic = table[0].index("GFLOPs counted"), table[0].index("GFLOPs analytic")
        ratios = [float(row[counted]) / float(row[analytic]) for row in table[1:]]
    shown = ", ".join(f"{r:.2f}" for r in ratios) or "n/a"
    if ratios and all(abs(r - 1) < 0.05 for r in ratios):
        return Outcome(OK, "priced; counted and analytic agree within 5 %")
    note = [line for line in result.out.splitlines() if re.search(r"lv-?vit", line, re.I) and "note" in line.lower()]
    if ratios and note:
        return Outcome(OK, f"priced by counting (counted/analytic per stage {shown}) with a note: "
                           f"{short(note[0], 160)}")
    return Outcome(SILENT, f"priced LV-ViT with the ViT formula without a word (counted/analytic per stage: {shown})")


# -- lost: lost ----------------------------------------------------------------------------
# (cases of the group "lost" go here)


# -- recipes: recipes ----------------------------------------------------------------------------
# (cases of the group "recipes" go here)


# -- combos: combos ----------------------------------------------------------------------------
# (cases of the group "combos" go here)


# -- writes: writes ----------------------------------------------------------------------------
# (cases of the group "writes" go here)


# -- scripts: scripts ----------------------------------------------------------------------------
# (cases of the group "scripts" go here)


# -- messages: messages ----------------------------------------------------------------------------
# (cases of the group "messages" go here)


# ---------------------------------------------------------------------------------------------------
# Runner and report
# ---------------------------------------------------------------------------------------------------
def git_commit(repo: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        # the audit's own files do not make the audited code dirty
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!bench/audit.py", ":!bench/results/audit.*"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def run_case(audit: Audit, item: Case) -> dict:
    ctx = Context(audit, item.name)
    started = time.monotonic()
    try:
        outcome = item.func(ctx)
    except Exception as error:  # noqa: BLE001 - a bug of the audit (or a fixture) must not stop the others
        outcome = Outcome("error", f"the audit case itself failed: {error.__class__.__name__}: {error}")
        traceback.print_exc()
    last = ctx.results[-1] if ctx.results else None
    tidy = lambda text: text.replace(str(audit.tmp), "$TMP").replace(str(audit.repo) + "/", "")  # noqa: E731
    return {"case": item.name, "trainer": item.trainer, "class": outcome.cls, "reason": tidy(outcome.reason),
            "seconds": round(time.monotonic() - started, 1),
            "rc": last.rc if last else None,
            "command": short(tidy(" ".join(shlex.quote(str(a)) for a in last.cmd)), 400) if last else "",
            "stderr_tail": tidy(last.err[-600:]) if last else ""}


def load_records(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def merge(old: List[dict], new: List[dict], label: str, only: bool) -> List[dict]:
    """The stored records with this run's: a full run replaces its label, ``--only`` its cases."""
    replaced = {r["case"] for r in new}
    kept = [r for r in old if r["label"] != label or (only and r["case"] not in replaced)]
    records = kept + new
    order = {c.name: i for i, c in enumerate(CASES)}
    return sorted(records, key=lambda r: (r["label"] != "before", order.get(r["case"], 999)))


def write_markdown(records: List[dict], path: Path) -> None:
    labels = [label for label in ("before", "after") if any(r["label"] == label for r in records)]
    labels += sorted({r["label"] for r in records} - set(labels))
    by = {(r["label"], r["case"]): r for r in records}
    meta = {label: next(r for r in records if r["label"] == label) for label in labels}
    lines = ["# Audit: the trainers tried as a careless or unlucky user would", "",
             "Written by `python bench/audit.py` (the cases, their expectations and the judging are in its "
             "docstrings). Classes: **ok** (done as asked, or refused in one line naming the problem, exit 2), "
             "**poor** (exit 2 but not one line naming the problem, or a misleading message), **traceback** "
             "(a Python traceback, or an error only after training had started), **silent** (accepted, but "
             "computed something other than asked or reported something false), **lost** (user data deleted "
             "or replaced).", ""]
    for label in labels:
        m = meta[label]
        lines.append(f"- {label}: `{m['repo']}` at {m['commit']}, run {m['date']} ({m['audit_seconds']} s wall, "
                     f"{m['jobs']} jobs)")
    lines.append("")
    lines += ["## Counts", ""]
    header = "| trainer | cases | " + " | ".join(f"{c} {label}" for c in CLASSES for label in labels) + " |"
    lines += [header, "|" + "---|" * (2 + len(CLASSES) * len(labels))]
    recorded = {r["case"] for r in records}
    trainers = [t for t in TRAINERS if any(c.trainer == t and c.name in recorded for c in CASES)]
    for trainer in trainers + ["all"]:
        names = [c.name for c in CASES if (trainer == "all" or c.trainer == trainer) and c.name in recorded]
        cells = []
        for cls in CLASSES:
            for label in labels:
                count = sum(1 for n in names if by.get((label, n), {}).get("class") == cls)
                cells.append(str(count))
        title = "**all**" if trainer == "all" else TRAINER_TITLES[trainer]
        lines.append(f"| {title} | {len(names)} | " + " | ".join(cells) + " |")
    lines.append("")
    for trainer in trainers:
        lines += [f"## {TRAINER_TITLES[trainer]}", "", "| case | " + " | ".join(labels) + " | reason (" +
                  labels[-1] + ") |", "|" + "---|" * (2 + len(labels))]
        for c in [c for c in CASES if c.trainer == trainer and c.name in recorded]:
            classes = [by.get((label, c.name), {}).get("class", "-") for label in labels]
            reason = by.get((labels[-1], c.name), {}).get("reason", "")
            lines.append(f"| `{c.name}` | " + " | ".join(classes) + f" | {reason.replace('|', '/')} |")
        lines.append("")
        for c in [c for c in CASES if c.trainer == trainer and c.name in recorded]:
            lines.append(f"- `{c.name}`: {c.doc}")
            for label in labels:
                record = by.get((label, c.name))
                if record:
                    lines.append(f"  - {label}: **{record['class']}**: {record['reason'].replace('|', '/')}")
        lines.append("")
    path.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=HERE, help="the checkout to audit (default: this one)")
    parser.add_argument("--label", default=None,
                        help="name of this checkout in the results (default: 'after' for this checkout, else "
                             "'before')")
    parser.add_argument("--only", nargs="+", default=None, metavar="CASE", help="run these cases only")
    parser.add_argument("--groups", nargs="+", default=None, choices=TRAINERS, metavar="GROUP",
                        help=f"run the cases of these groups only ({', '.join(TRAINERS)})")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default: 2)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per command (default: 300)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of audit.jsonl and audit.md")
    parser.add_argument("--report", action="store_true", help="only rewrite audit.md from audit.jsonl")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = parser.parse_args(argv)
    jsonl, markdown = args.results / "audit.jsonl", args.results / "audit.md"
    if args.list:
        for c in CASES:
            print(f"{c.trainer:6s} {c.name}")
        return
    if args.report:
        write_markdown(load_records(jsonl), markdown)
        print(f"wrote {markdown}")
        return
    repo = args.repo.resolve()
    if not (repo / "ToE").is_dir():
        parser.error(f"--repo {repo} is not a checkout of this project (no ToE/ folder)")
    label = args.label or ("after" if repo == HERE else "before")
    chosen = CASES
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in CASES})
        if unknown:
            parser.error(f"unknown case(s): {', '.join(unknown)} (see --list)")
        chosen = [c for c in CASES if c.name in args.only]
    if args.groups:
        chosen = [c for c in chosen if c.trainer in args.groups]
    tmp = Path(tempfile.mkdtemp(prefix="audit-"))
    audit = Audit(repo, tmp, args.timeout)
    TIDY.update({str(tmp): "$TMP", str(repo) + "/": ""})
    started = time.monotonic()
    common = {"label": label, "repo": str(repo), "commit": git_commit(repo),
              "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "jobs": args.jobs}
    print(f"auditing {repo} ({common['commit']}) as '{label}': {len(chosen)} cases, {args.jobs} at a time; "
          f"temporary folder {tmp}", flush=True)
    records = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_case, audit, c): c for c in chosen}
        for future in concurrent.futures.as_completed(futures):
            record = {**common, **future.result()}
            records.append(record)
            print(f"  {record['class']:9s} {record['case']} ({record['seconds']} s): {short(record['reason'], 150)}",
                  flush=True)
    wall = round(time.monotonic() - started, 1)
    for record in records:
        record["audit_seconds"] = wall
    if args.only or args.groups:  # keep the full run's wall time in the header
        previous = [r for r in load_records(jsonl) if r["label"] == label]
        for record in records:
            record["audit_seconds"] = previous[0]["audit_seconds"] if previous else wall
    args.results.mkdir(parents=True, exist_ok=True)
    all_records = merge(load_records(jsonl), records, label, bool(args.only or args.groups))
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in all_records))
    write_markdown(all_records, markdown)
    counts = {cls: sum(1 for r in records if r["class"] == cls) for cls in (*CLASSES, "error")}
    print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v) + f" in {wall} s; wrote {jsonl} and "
          f"{markdown}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
