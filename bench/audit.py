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
import signal
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

from ToE.common.errors import UserError
from ToE.common.log import read_log
from ToE.gpu_check import write_coco
from ToE.trainers import TRAINERS

HERE = Path(__file__).resolve().parents[1]
RESULTS = HERE / "bench" / "results"
CLASSES = ("ok", "poor", "traceback", "silent", "lost")
OK, POOR, TRACEBACK, SILENT, LOST = CLASSES
# groups of cases: a trainer (the newer ones first, DeiT last), the tools, or (issue 27's hardening) the root a
# case belongs to
ROOTS = ("lost", "recipes", "combos", "writes", "scripts", "messages")
NEWER_FIRST = tuple(sorted(TRAINERS, key=lambda name: name == "deit"))
GROUPS = (*NEWER_FIRST, "tools", *ROOTS)
TRAINER_TITLES = {**{name: trainer.title for name, trainer in TRAINERS.items()},
                  "tools": "Tools (FLOP calculator)",
                  "lost": "Lost data (builders, one writer per output folder)",
                  "recipes": "Recipe values (-c FILE.yaml through the flags' own checks)",
                  "combos": "Feature combinations (VPT, LV-ViT, attach, summary)",
                  "writes": "Interrupted and failing writes (what was saved, signals, full disk)",
                  "scripts": "Scripts (demo, Slurm, label generation)",
                  "messages": "Messages that name the real problem and the fix"}
MAIN = {name: trainer.main for name, trainer in TRAINERS.items()}  # relative to the checkout under audit
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
    log = read_log(out, missing_ok=True)
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
        log = read_log(out, missing_ok=True)
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
    log = read_log(out, missing_ok=True)
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
    root = write_coco(ctx.tmp / "coco", edit=edit)
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


RUN_SCRIPTS = {name: f"ToE/{TRAINERS[name].folder}/run/{script}" for name, script in {
    "deit": "imagenet_tiny_run1.sh", "lvvit": "imagenet_small_run1.sh", "et": "imagenet_tiny_run1.sh",
    "yolos": "coco_tiny_run1.sh"}.items()}


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
    marked = [dict(r, audit_marker=1) for r in read_log(out, missing_ok=True)]
    log.write_text("".join(json.dumps(r) + "\n" for r in marked))
    flags = [f for f in ("--auto-resume", "--overwrite") if f in command]
    result = ctx.main(trainer, *data_args, "--output_dir", out, "--epochs", 2, *flags)
    if result.rc != 0:
        return judge_refusal(result, needles=[("--overwrite", "--auto-resume")])
    kept_old = any(r.get("audit_marker") for r in read_log(out, missing_ok=True))
    if kept_old:
        return Outcome(SILENT, f"the command holds {' and '.join(flags)}; the old run was resumed, --overwrite "
                               "ignored without a word")
    return Outcome(OK, f"the command holds {' and '.join(flags)}; the old run was replaced" +
                   ("" if both else " (the script did not add --auto-resume)"))


for _trainer in NEWER_FIRST:
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
def _files(root: Path) -> Dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) with its bytes: what the user had."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.is_dir() else {}


def _damage(before: Dict[str, bytes], root: Path) -> Optional[Outcome]:
    """LOST when a file of ``before`` is gone or changed under ``root``; SILENT when files were only added."""
    after = _files(root)
    gone = [name for name in before if name not in after]
    changed = [name for name in before if name in after and after[name] != before[name]]
    if gone or changed:
        return Outcome(LOST, f"{len(gone)} of the user's {len(before)} files deleted, {len(changed)} replaced "
                             f"(e.g. {(gone + changed)[0]})")
    added = [name for name in after if name not in before]
    if added:
        return Outcome(SILENT, f"{len(added)} files written into the user's folder (e.g. {added[0]})")
    return None


def _builder_over(ctx: Context, folder: Path, module: str, *flags) -> Outcome:
    """``python -m module --out folder``: refused in one line naming the folder, every file intact."""
    before = _files(folder)
    result = ctx.module(module, "--out", folder, *flags)
    damage = _damage(before, folder)
    if damage is not None:
        return damage
    return judge_refusal(result, needles=[str(folder)], accepted=Outcome(
        SILENT, f"exit 0 but the folder is as it was: {short(last_line(result.out), 120)}"))


def _background(ctx: Context, trainer: str, *args) -> subprocess.Popen:
    """A training of the checkout under test running in the background (its output discarded)."""
    return subprocess.Popen([sys.executable, MAIN[trainer], *RECIPES[trainer], *map(str, args)], cwd=ctx.repo,
                            env=ctx.audit.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> bool:
    """Whether ``path`` appeared while ``process`` still runs."""
    deadline = time.monotonic() + seconds
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return path.exists() and process.poll() is None


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def _epochs_once(out: Path) -> Optional[Outcome]:
    """LOST when log.txt holds an epoch twice (two writers) or is unreadable."""
    try:
        epochs = [r.get("epoch") for r in read_log(out, missing_ok=True)]
    except UserError:  # a damaged line
        return Outcome(LOST, "log.txt was garbled by two writers")
    if len(epochs) != len(set(epochs)):
        return Outcome(LOST, f"two writers: log.txt holds epochs {epochs}")
    return None


@case("lost")
def lost_digits_over_photo_folder(ctx: Context) -> Outcome:
    """python -m ToE.common.digits --out ~/photos (a folder of the user's pictures in year folders,
    mistaken for where the data should go). Expected: refused in one line naming the folder, every
    picture intact; deleting it as "an older build" loses them."""
    photos = ctx.tmp / "photos"
    for year in ("2023", "2024"):
        (photos / year).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(photos / year / f"IMG_{i}.jpg")
    return _builder_over(ctx, photos, "ToE.common.digits", "--size", 8)


@case("lost")
def lost_digits_det_over_real_coco(ctx: Context) -> Outcome:
    """python -m ToE.yolos.digits_det --out the user's own COCO-layout data set (train2017/,
    val2017/, annotations/instances_*.json). Expected: refused in one line naming the folder, the
    annotations and images intact; writing its own annotation files over them loses the labels."""
    coco = write_coco(ctx.tmp / "coco")
    return _builder_over(ctx, coco, "ToE.yolos.digits_det")


@case("lost")
def lost_digits_over_other_tools_stamp(ctx: Context) -> Outcome:
    """python -m ToE.common.digits --shift --out a data folder that another tool stamped with its own
    .complete file (a download finished on some date). Expected: refused in one line, untouched: only
    the builder's own stamp (another size) marks a folder it may replace."""
    data = write_images(ctx.tmp / "downloaded", train=2, val=1, classes=2, size=8)
    (data / ".complete").write_text("downloaded 2024-05-01\n")
    return _builder_over(ctx, data, "ToE.common.digits", "--size", 8, "--shift")


@case("lost")
def lost_two_deit_runs_at_once(ctx: Context) -> Outcome:
    """The same DeiT command (20 epochs, --auto-resume) submitted twice at once on one --output_dir
    (a job array slot resubmitted, a second terminal). Expected: one trains, the other is refused in
    one line naming the first's pid; two writers log every epoch twice and overwrite each other's
    checkpoints (lost)."""
    out = ctx.tmp / "out"
    flags = [*ctx.data_args("deit"), "--output_dir", out, "--epochs", 20, "--auto-resume"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(lambda _: ctx.main("deit", *flags), range(2))
    if (damage := _epochs_once(out)) is not None:
        return damage
    ran = [r for r in (first, second) if r.rc == 0]
    refused = [r for r in (first, second) if r.rc != 0]
    if len(ran) != 1:
        return Outcome(TRACEBACK if refused else SILENT,
                       f"{len(ran)} of the two runs trained: {short(last_line(refused[0].err)) if refused else ''}")
    epochs = [r.get("epoch") for r in read_log(out, missing_ok=True)]
    if epochs != list(range(20)):
        return Outcome(LOST, f"log.txt holds epochs {epochs}")
    return judge_refusal(refused[0], needles=["in use", "pid"])


@case("lost")
def lost_check_only_while_et_trains(ctx: Context) -> Outcome:
    """What the run scripts do before torchrun: --check-only on an --output_dir an EfficientTrain run is
    writing right now. Expected: refused in one line naming the running process ("check passed" sends
    a second writer into the folder)."""
    out = ctx.tmp / "out"
    flags = [*ctx.data_args("et"), "--output_dir", out, "--epochs", 300]
    first = _background(ctx, "et", *flags)
    try:
        if not _wait_for(out / "log.txt", first):
            return Outcome("error", "the background training did not start")
        result = ctx.main("et", *flags, "--auto-resume", "--check-only")
        return judge_refusal(result, needles=["in use", f"pid {first.pid}"], accepted=Outcome(
            SILENT, f"check passed on a folder another run is writing: {short(last_line(result.out), 120)}"))
    finally:
        _stop(first)


@case("lost")
def lost_overwrite_while_yolos_trains(ctx: Context) -> Outcome:
    """YOLOS training in one terminal; the user, thinking it died, starts it again in another with
    --overwrite on the same --output_dir. Expected: refused in one line naming the running process,
    its checkpoint and log intact; clearing the folder under a live run loses its checkpoint."""
    out = ctx.tmp / "out"
    flags = [*ctx.data_args("yolos"), "--output_dir", out, "--epochs", 300]
    first = _background(ctx, "yolos", *flags)
    try:
        if not _wait_for(out / "checkpoint.pth", first):
            return Outcome("error", "the background training did not write a checkpoint")
        first.send_signal(signal.SIGSTOP)  # frozen while the second command runs: its files stay as they are
        before = {name: (out / name).read_bytes() for name in ("checkpoint.pth", "log.txt", "args.yaml")}
        result = ctx.main("yolos", *flags, "--overwrite", "--stop-after-epochs", 1)
        first.send_signal(signal.SIGCONT)
        kept = {name: (out / name).read_bytes() if (out / name).exists() else None for name in before}
        if kept != before:
            return Outcome(LOST, "the live run's " + ", ".join(n for n in before if kept[n] != before[n])
                           + " deleted or replaced" + ("" if result.rc else " (the second run trained)"))
        return judge_refusal(result, needles=["in use", f"pid {first.pid}"])
    finally:
        _stop(first)


@case("lost")
def lost_lvvit_resume_after_kill9(ctx: Context) -> Outcome:
    """An LV-ViT run killed with kill -9 (out of memory, a node lost) after its first checkpoint,
    then the same command with --auto-resume. Expected: it continues from the checkpoint, every epoch
    logged once: whatever the dead run left behind (a lock file) must not block it."""
    out = ctx.tmp / "out"
    flags = [*ctx.data_args("lvvit"), "--output_dir", out, "--epochs", 40, "--auto-resume"]
    first = _background(ctx, "lvvit", *flags)
    if not _wait_for(out / "checkpoint.pth", first):
        _stop(first)
        return Outcome("error", "the background training did not write a checkpoint")
    _stop(first)
    result = ctx.main("lvvit", *flags, "--stop-after-epochs", 1)
    if (failed := judge_ran(result)) is not None:
        return Outcome(failed.cls if failed.cls != OK else POOR, f"refused after a kill -9: {failed.reason}")
    if (damage := _epochs_once(out)) is not None:
        return damage
    epochs = [r.get("epoch") for r in read_log(out, missing_ok=True)]
    if epochs != list(range(len(epochs))) or len(epochs) < 2:
        return Outcome(SILENT, f"log.txt holds epochs {epochs} after the resume")
    return Outcome(OK, f"resumed after kill -9 (epochs {epochs[0]}-{epochs[-1]} logged once each)")


# -- recipes: recipes ----------------------------------------------------------------------------
# (cases of the group "recipes" go here)
def _with_recipe_file(ctx: Context, trainer: str, text: str, *args, needles: Sequence, silent: str,
                      misleading: str = "", check_only: bool = True) -> Outcome:
    """Run ``trainer``'s tiny recipe with a recipe file holding ``text`` (its keys are not on the tiny
    command line, so the file's values are the ones in force) and judge the refusal."""
    path = ctx.tmp / "recipe.yaml"
    path.write_text(text)
    result = ctx.main(trainer, *ctx.data_args(trainer), "-c", path, *args, "--output_dir", ctx.tmp / "out",
                      *(["--check-only"] if check_only else []))
    return judge_refusal(result, needles=needles, accepted=Outcome(SILENT, silent), misleading=misleading)


@case("recipes")
def recipes_drop_path_of_one(ctx: Context) -> Outcome:
    """DeiT with a recipe file holding drop_path: 1.0 (meant 0.1; --drop-path 1.0 on the command line is
    refused: the rate must be in [0, 1)). A file's value is an argparse default, which argparse does not
    check. Expected: refused in one line naming drop_path, as on the command line."""
    return _with_recipe_file(ctx, "deit", "drop_path: 1.0\n", needles=["drop_path"],
                             misleading="names a flag the user did not pass, not the file's key",
                             silent="accepted drop_path 1.0 from the file: every residual branch is dropped")


@case("recipes")
def recipes_mixup_mode_capitalised(ctx: Context) -> Outcome:
    """EfficientTrain with a recipe file holding mixup_mode: Pair (the flag's choices are batch, pair,
    elem; timm's Mixup treats any other text as 'batch'). Expected: refused in one line naming
    mixup_mode and its choices."""
    return _with_recipe_file(ctx, "et", "mixup_mode: Pair\n", needles=["mixup_mode", "pair"],
                             silent="accepted mixup_mode Pair from the file (timm mixes per batch)")


@case("recipes")
def recipes_amp_dtype_shorthand(ctx: Context) -> Outcome:
    """LV-ViT with a recipe file holding amp_dtype: fp16 (PyTorch's own spelling is float16; the flag's
    choices are auto, bfloat16, float16, float32). Expected: refused in one line naming amp_dtype and
    the choices, before any work."""
    return _with_recipe_file(ctx, "lvvit", "amp_dtype: fp16\n", needles=["amp_dtype", "float16"],
                             silent="accepted amp_dtype fp16 from the file")


@case("recipes")
def recipes_seed_left_empty(ctx: Context) -> Outcome:
    """YOLOS with a recipe file holding 'seed:' with no value (YAML reads null; a template with the
    value left to fill in). Expected: refused in one line naming seed (it needs a value)."""
    return _with_recipe_file(ctx, "yolos", "seed:\n", needles=["seed"], silent="accepted seed null from the file")


@case("recipes")
def recipes_key_repeated_after_an_edit(ctx: Context) -> Outcome:
    """A recipe file edited by appending a line: hflip: 0.5, smoothing: 0.1, then hflip: 0.0 further
    down (PyYAML keeps the last value without a word). Expected: refused in one line naming the key and
    both lines."""
    return _with_recipe_file(ctx, "deit", "hflip: 0.5\nsmoothing: 0.1\nhflip: 0.0\n", needles=["hflip", "twice"],
                             silent="accepted: hflip written twice, the second value used without a word")


@case("recipes")
def recipes_second_config_file(ctx: Context) -> Outcome:
    """EfficientTrain given two recipe files, --config=a.yaml --config=b.yaml (a user layering a site
    file and an experiment file, as some frameworks allow). The second replaced the first without a
    word. Expected: both read in a stated order, or refused in one line."""
    first, second = ctx.tmp / "a.yaml", ctx.tmp / "b.yaml"
    first.write_text("hflip: 0.0\n")
    second.write_text("smoothing: 0.2\n")
    result = ctx.main("et", *ctx.data_args("et"), f"--config={first}", f"--config={second}", "--output_dir",
                      ctx.tmp / "out", "--check-only")
    return judge_refusal(result, needles=["--config"], accepted=Outcome(
        SILENT, "accepted two --config files: the first (hflip: 0.0) dropped without a word"))


@case("recipes")
def recipes_config_flag_truncated(ctx: Context) -> Outcome:
    """DeiT with --con FILE (a truncated --config; argparse's prefix matching took it for --config but
    the recipe loader only looks for -c/--config, so the file was never read). The file holds a key that
    is no flag, so reading it would refuse. Expected: refused in one line (an unknown flag, or the file's
    bad key); accepted means the file was silently ignored."""
    path = ctx.tmp / "recipe.yaml"
    path.write_text("not_a_flag: 1\n")
    result = ctx.main("deit", *ctx.data_args("deit"), "--con", path, "--output_dir", ctx.tmp / "out",
                      "--check-only")
    return judge_refusal(result, needles=[("--con", "not_a_flag")], accepted=Outcome(
        SILENT, "accepted --con FILE: the file was never read"))


@case("recipes")
def recipes_model_kwargs_partly_overridden(ctx: Context) -> Outcome:
    """A recipe file with model_kwargs {embed_dim: 32, depth: 2, num_heads: 2} and --model-kwargs
    num_heads=4 on the command line (to try 4 heads). Expected: the recipe's mapping with num_heads
    changed, {embed_dim: 32, depth: 2, num_heads: 4}, in args.yaml; replacing the whole mapping trains
    timm's default 192-wide, 12-deep model instead."""
    flags = list(DEIT)
    at = flags.index("--model-kwargs")
    del flags[at:at + 4]
    path = ctx.tmp / "recipe.yaml"
    path.write_text("model_kwargs: {embed_dim: 32, depth: 2, num_heads: 2}\n")
    out = ctx.tmp / "out"
    result = ctx.run([sys.executable, MAIN["deit"], *flags, *ctx.data_args("deit"), "-c", str(path),
                      "--model-kwargs", "num_heads=4", "--output_dir", str(out), "--epochs", "1"])
    if (failed := judge_ran(result)) is not None:
        return failed
    import yaml

    kwargs = yaml.safe_load((out / "args.yaml").read_text()).get("model_kwargs")
    if kwargs == {"embed_dim": 32, "depth": 2, "num_heads": 4}:
        return Outcome(OK, f"merged: model_kwargs {kwargs}")
    return Outcome(SILENT, f"trained with model_kwargs {kwargs}: the recipe's other arguments dropped")


# -- combos: combos ----------------------------------------------------------------------------
# (cases of the group "combos" go here)
def _vit_weights(ctx: Context, classes: int = 10) -> Path:
    """A tiny ViT state dict (the DEIT recipe's model, another class count than the data's 3) to --finetune."""
    import timm

    path = ctx.tmp / "vit.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=classes, img_size=16, patch_size=4, embed_dim=32,
                                 depth=2, num_heads=2).state_dict(), path)
    return path


def _lvvit_weights(ctx: Context, classes: int = 10) -> Optional[Path]:
    """A tiny LV-ViT state dict (the LVVIT recipe's model) of ``classes`` classes, built by the checkout."""
    path = ctx.tmp / "lvvit.pth"
    made = ctx.run([sys.executable, "-c", "import sys, timm, torch, ToE.lvvit; torch.manual_seed(0); torch.save("
                    "timm.create_model('lvvit_digits', num_classes=int(sys.argv[2]), embed_dim=32, depth=2, "
                    "num_heads=2, stem_dim=8, img_size=16, patch_size=4).state_dict(), sys.argv[1])", str(path),
                    str(classes)])
    return path if made.rc == 0 else None


# A snippet run in the checkout: attach ToE to each tiny timm model, then one reducing training forward.
_ATTACH_PROBE = r"""
import sys, timm, torch, token_select
name, extra, index = sys.argv[1], eval(sys.argv[2]), int(sys.argv[3])
model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                          num_classes=3, **extra)
try:
    toe = token_select.attach(model, token_select.TokenSelect([0], [0.5], 0.25), block_index=index)
except (ValueError, TypeError) as error:
    print("REFUSED", type(error).__name__, str(error).splitlines()[0]); sys.exit(0)
toe.update_current_stage(0)
seen = []
blocks = list(model.blocks)
for block in blocks:
    block.register_forward_pre_hook(lambda block, args: seen.append(args[0].shape[1]))
model.train()
try:
    model(torch.randn(2, 3, 32, 32)).sum().backward()
except Exception as error:
    print("CRASHED", type(error).__name__, str(error).splitlines()[0]); sys.exit(0)
print("RAN", seen)
"""


def _attach_probe(ctx: Context, models: Sequence[tuple], index: int = 0) -> Outcome:
    """Each (timm name, extra kwargs, what it has) through _ATTACH_PROBE; ok only when every one is refused
    in one line naming the model's class."""
    worst, reasons = OK, []
    for name, extra, what in models:
        result = ctx.run([sys.executable, "-c", _ATTACH_PROBE, name, repr(extra), str(index)])
        line = last_line(result.out) if result.rc == 0 else f"probe failed: {last_line(result.err)}"
        if line.startswith("REFUSED"):
            reasons.append(f"{name}: refused ({short(line.split(' ', 2)[-1], 110)})")
            continue
        cls = TRACEBACK if line.startswith(("CRASHED", "probe failed")) else SILENT
        worst = cls if CLASSES.index(cls) > CLASSES.index(worst) else worst
        said = "the training forward crashed: " if cls == TRACEBACK else "a reducing training step ran (tokens into " \
            "each block): "
        reasons.append(f"{name} ({what}): accepted, {said}{short(line, 90)}")
    return Outcome(worst, "; ".join(reasons))


@case("combos")
def combos_attach_relative_and_rotary_models(ctx: Context) -> Outcome:
    """token_select.attach on a tiny BEiT (relative-position bias) and a tiny vit_base_patch16_rope_224
    (rotary embeddings, timm's Eva class), as a user of the README's "ToE in your own model" would try.
    The README says such models cannot run on a reduced sequence. Expected: attach refuses each in one
    ValueError naming the model and why; accepting it and crashing in the first training step is a
    traceback."""
    return _attach_probe(ctx, [("beit_base_patch16_224", {}, "relative-position bias"),
                               ("vit_base_patch16_rope_224", {}, "rotary embeddings")])


@case("combos")
def combos_attach_class_attention_and_gpsa_models(ctx: Context) -> Outcome:
    """token_select.attach on a tiny CaiT (its class token joins only in the class-attention layers after
    model.blocks) and a tiny ConViT (gated positional self-attention laid over the full grid; its first
    block sees no class token either). Both run a reduced step without an error, on a sequence whose
    first patch the operator keeps as a class token. Expected: refused in one ValueError naming the
    model and why; training on is silent."""
    return _attach_probe(ctx, [("cait_xxs24_224", {"depth_token_only": 1}, "class attention"),
                               ("convit_tiny", {"local_up_to_layer": 1}, "gated positional attention")])


@case("combos")
def combos_attach_block_index_minus_one(ctx: Context) -> Outcome:
    """token_select.attach(model, op, block_index=-1) on a 3-block ViT: Python's "the last one" puts the
    operator after the last block, where nothing trains on the reduced sequence. Expected: refused in
    one ValueError naming block_index and the range; accepted is silent."""
    return _attach_probe(ctx, [("vit_tiny_patch16_224", {}, "block_index=-1")], index=-1)


_PATCH_DROP_PROBE = r"""
import sys, torch
from types import SimpleNamespace
from ToE.deit.main import parse_args
from ToE.common.args import build_token_select
from ToE.common.classification import ClassificationTask
args = parse_args(sys.argv[1:])
task = ClassificationTask.__new__(ClassificationTask)
task.args, task.num_classes, task.device = args, 3, torch.device("cpu")
task.env, task.toe = SimpleNamespace(is_main=True), build_token_select(args)
model = task.build_model().train()
model.patch_drop.prob = 0.5  # as the trainer sets it for a stage keeping half of the 16 patch tokens
seen = []
model.patch_drop.register_forward_hook(lambda module, a, out: seen.append((a[0].detach(), out.detach())))
torch.manual_seed(0)
for _ in range(4):
    model(torch.randn(2, 3, 16, 16))
first = 0
for full, kept in seen:
    for b in range(full.shape[0]):
        rows = [int((full[b] == row).all(dim=1).nonzero()[0]) for row in kept[b, 1:]]
        first += set(range(1, 1 + args.prompt_tokens)) <= set(rows)
print("FIRST", first, "OF", sum(full.shape[0] for full, _ in seen))
"""


@case("combos")
def combos_vpt_deep_with_random_drop_baseline(ctx: Context) -> Outcome:
    """The random-drop baseline of a deep VPT run (--vpt deep --prompt-tokens 4 --token-drop random on the
    tiny DeiT), the model built as the trainer builds it and run for 8 images with half of the 16 patch
    tokens kept. Expected: random patch tokens kept (the first 4 patches kept in about 1 image in 26);
    the first 4 patches (one per prompt) kept in every image is silent: PatchDropout counted the prompts,
    which enter only in block 0, as prefix tokens."""
    result = ctx.run([sys.executable, "-c", _PATCH_DROP_PROBE, "--data-path", "unused", *DEIT[:10], "--device",
                      "cpu", "--vpt", "deep", "--prompt-tokens", "4", "--token-drop", "random"])
    if result.rc != 0 or "FIRST" not in result.out:
        return judge_ran(result) or Outcome(TRACEBACK, f"the probe failed: {short(last_line(result.err))}")
    first, total = (int(n) for n in re.findall(r"\d+", last_line(result.out)))
    if first == total:
        return Outcome(SILENT, f"the first 4 patch tokens were kept in all {total} images: PatchDropout keeps the "
                               "prompts' count of patches as if they were prefix tokens")
    return Outcome(OK, f"random patch tokens kept (the first 4 in {first} of {total} images)")


@case("combos")
def combos_lvvit_shallow_vpt(ctx: Context) -> Outcome:
    """LV-ViT with --finetune (an LV-ViT checkpoint of the same class count) and --vpt shallow --prompt-tokens
    2, token labels on. LV-ViT's dense head puts every token after the class token back on the patch
    grid, where prompts have no place. Expected: trained right or refused in one line naming --vpt before
    any work; a crash after training started is a traceback."""
    weights = _lvvit_weights(ctx, classes=3)
    if weights is None:
        return Outcome(TRACEBACK, "could not build the LV-ViT checkpoint with the checkout")
    result = ctx.main("lvvit", *ctx.data_args("lvvit"), "--finetune", weights, "--vpt", "shallow", "--prompt-tokens",
                      2, "--output_dir", ctx.tmp / "out")
    if result.rc == 0:
        return Outcome(OK, "trained")
    return judge_refusal(result, needles=["--vpt"])


@case("combos")
def combos_lvvit_random_drop_baseline(ctx: Context) -> Outcome:
    """LV-ViT with --token-drop random (the shared flag of the random-drop baseline). LV-ViT's forward has
    no PatchDropout step, so the baseline would train every token while log.txt reports the stage's kept
    count. Expected: refused in one line naming --token-drop (or a real random drop); trained on all
    tokens under the label of the baseline is silent."""
    out = ctx.tmp / "out"
    result = ctx.main("lvvit", *ctx.data_args("lvvit"), "--token-drop", "random", "--output_dir", out)
    kept = [r.get("kept_tokens") for r in read_log(out, missing_ok=True)]
    return judge_refusal(result, needles=["--token-drop"], accepted=Outcome(
        SILENT, f"trained; log.txt says kept_tokens {kept} of 16, but LV-ViT never calls PatchDropout: every "
                "token trained"))


@case("combos")
def combos_lvvit_finetune_to_fewer_classes(ctx: Context) -> Outcome:
    """--finetune a 10-class LV-ViT checkpoint (class head and dense aux head) on the 3-class tiny data, as
    DeiT's --finetune does for a new label set. Expected: trains, both heads dropped with the note the
    project prints for a dropped head; refusing a valid checkpoint (the aux head "does not fit") is poor."""
    weights = _lvvit_weights(ctx, classes=10)
    if weights is None:
        return Outcome(TRACEBACK, "could not build the LV-ViT checkpoint with the checkout")
    result = ctx.main("lvvit", *ctx.data_args("lvvit"), "--finetune", weights, "--epochs", 1, "--output_dir",
                      ctx.tmp / "out")
    if (failed := judge_ran(result)) is not None:
        if failed.cls == OK:  # a one-line refusal of a valid checkpoint
            return Outcome(POOR, f"a valid LV-ViT checkpoint was refused: {failed.reason}")
        return failed
    note = next((line for line in result.out.splitlines() if "aux_head" in line and "class count" in line), "")
    if not note:
        return Outcome(SILENT, "trained, but no note that the aux head of another class count was dropped")
    return Outcome(OK, f"trained with: {short(note, 160)}")


@case("combos")
def combos_summary_of_a_deep_vpt_run(ctx: Context) -> Outcome:
    """python -m ToE.common.summary OUT of a deep VPT run (8 prompt tokens per block, the tiny DeiT: 16 patch
    tokens, stage 1 keeping 8). Each block sees 1 + 8 + kept tokens; the FLOP-predicted speed of stage 1
    must count the prompts. Expected: the prediction within 0.02 of the audit's own FLOP count with the
    prompts; the count without them is silent."""
    out = ctx.tmp / "out"
    first = ctx.main("deit", "--data-path", ctx.fixtures.images(), "--finetune", _vit_weights(ctx), "--vpt", "deep",
                     "--prompt-tokens", 8, "--expansion-step", 0, 1, "--keep-rate", 0.5, 1.0, "--output_dir", out)
    if (failed := judge_ran(first)) is not None:
        return Outcome(failed.cls, f"the VPT run failed: {failed.reason}")
    result = ctx.module("ToE.common.summary", out)
    if result.rc != 0:
        return judge_ran(result) or Outcome(TRACEBACK, short(last_line(result.err)))
    row = next((line for line in result.out.splitlines() if line.startswith("| 1 |")), "")
    predicted = float(re.findall(r"([\d.]+)x\s*\|\s*$", row)[0]) if row else float("nan")

    def step(tokens_after: int, prefix: int) -> float:  # one forward of the 2-block, 32-wide ViT, ratio 4
        def block(n: int) -> float:
            return 2.0 * 12 * n * 32 ** 2 + 4.0 * n * n * 32
        return block(16 + prefix) + block(tokens_after + prefix) + 2.0 * 16 * 48 * 32 + 2.0 * 32 * 3

    with_prompts, without = step(16, 9) / step(8, 9), step(16, 1) / step(8, 1)
    if abs(predicted - with_prompts) <= 0.02:
        return Outcome(OK, f"stage 1 predicted {predicted:.2f}x, the count with the prompts {with_prompts:.2f}x")
    return Outcome(SILENT, f"stage 1 predicted {predicted:.2f}x; with the 8 prompts in every block it is "
                           f"{with_prompts:.2f}x (without them {without:.2f}x)")


@case("combos")
def combos_deep_vpt_with_sparse_eval(ctx: Context) -> Outcome:
    """A deep VPT run with --sparse-eval (evaluation on the stage's kept tokens too), then --eval --resume of
    its checkpoint with --sparse-eval. The prompts must pass the operator in evaluation as in training.
    Expected: both run (exit 0) and the evaluation says it ran on the kept tokens; a crash is a traceback."""
    out, weights = ctx.tmp / "out", _vit_weights(ctx)
    flags = ["--data-path", ctx.fixtures.images(), "--finetune", weights, "--vpt", "deep", "--prompt-tokens", 3,
             "--sparse-eval", "--expansion-step", 0, 4, "--keep-rate", 0.5, 1.0]
    first = ctx.main("deit", *flags, "--output_dir", out)
    if (failed := judge_ran(first)) is not None:
        return Outcome(failed.cls, f"the training run failed: {failed.reason}")
    result = ctx.main("deit", *flags, "--eval", "--resume", out / "checkpoint.pth")
    if (failed := judge_ran(result)) is not None:
        return Outcome(failed.cls, f"the evaluation failed: {failed.reason}")
    said = next((line for line in result.out.splitlines() if "sparse evaluation" in line), "")
    return Outcome(OK, f"trained and evaluated: {short(said, 120)}") if said else Outcome(
        SILENT, "evaluated without saying it ran on the kept tokens")


# -- writes: writes ----------------------------------------------------------------------------
# (cases of the group "writes" go here)
# the trainer's main.py run by a small wrapper that first applies PATCH (Python source): the moment
# of an interruption or a failed write is then exact, in both checkouts
_WRAPPED = """
import os, runpy, signal, sys
{patch}
main = os.path.join(os.getcwd(), {main!r})
sys.argv = [main] + sys.argv[1:]
runpy.run_path(main, run_name="__main__")
"""


def _wrapped(ctx: Context, trainer: str, patch: str, *args) -> Result:
    """``ctx.main`` through a wrapper that applies ``patch`` first."""
    script = ctx.tmp / "wrapper.py"
    script.write_text(_WRAPPED.format(patch=patch, main=MAIN[trainer]))
    return ctx.run([sys.executable, str(script), *RECIPES[trainer], *map(str, args)])


def _on_the_nth_save(name: str, nth: int, act: str) -> str:
    """A patch of torch.save: on the ``nth`` write of ``name`` (checkpoint.pth, best_checkpoint.pth) it
    writes part of the file, then runs ``act`` (e.g. a Ctrl-C: os.kill(os.getpid(), signal.SIGINT))."""
    return f"""
import torch
_save, _calls = torch.save, {{}}
def _partial(obj, file, *args, **kwargs):
    name = os.path.basename(getattr(file, "name", str(file))).removesuffix(".tmp")
    _calls[name] = _calls.get(name, 0) + 1
    if name == {name!r} and _calls[name] == {nth}:
        part = b"PK half a checkpoint"
        file.write(part) if hasattr(file, "write") else open(file, "wb").write(part)
        {act}
    return _save(obj, file, *args, **kwargs)
torch.save = _partial
"""


def _saved_epoch(out: Path) -> Optional[int]:
    """The epoch OUT/checkpoint.pth holds (None: no readable checkpoint)."""
    try:
        return int(torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - missing or unreadable: none to resume
        return None


def judge_stop(result: Result, out: Path, rc: int, prefix: str) -> Outcome:
    """A run that stopped (Ctrl-C, a stop signal, a failed write) must exit ``rc`` with one line
    starting with ``prefix`` that tells the truth about OUT (the checkpoint and its epoch, or none),
    leave no partial ``.tmp`` and keep a loadable checkpoint."""
    if "Traceback (most recent call last)" in result.text:
        return Outcome(TRACEBACK, f"traceback: {short(last_line(result.err))}")
    lines = error_lines(result)
    if result.rc < 0 or (result.rc > 128 and result.rc != rc):
        return Outcome(POOR, f"killed without a word (exit {result.rc}): {short(lines[-1] if lines else '')}")
    if result.rc != rc:
        return Outcome(TRACEBACK if result.rc == 1 else POOR,
                       f"exit {result.rc}, not {rc}: {short(lines[-1] if lines else '(nothing on stderr)')}")
    if len(lines) != 1 or not lines[0].startswith(prefix):
        return Outcome(POOR, f"{len(lines)} lines on stderr: {short(' | '.join(lines[-3:]))}")
    leftovers = sorted(p.name for p in out.glob("*.tmp")) if out.is_dir() else []
    if leftovers:
        return Outcome(POOR, f"a partial {', '.join(leftovers)} left behind: {short(lines[0])}")
    epoch = _saved_epoch(out)
    if (out / "checkpoint.pth").exists() and epoch is None:
        return Outcome(LOST, f"checkpoint.pth is no longer loadable: {short(lines[0])}")
    says_none = "no checkpoint" in lines[0] or "nothing to resume" in lines[0] or "nothing was saved" in lines[0]
    if epoch is not None and (says_none or "checkpoint.pth" not in lines[0]):
        return Outcome(SILENT, f"checkpoint.pth holds epoch {epoch}, the message says otherwise: {short(lines[0])}")
    if epoch is None and not says_none:
        return Outcome(SILENT, f"no checkpoint on disk, the message names one: {short(lines[0])}")
    return Outcome(OK, f"exit {rc}, one line true to the files: {short(lines[0])}")


@case("writes")
def writes_ctrl_c_while_the_last_checkpoint_is_written(ctx: Context) -> Outcome:
    """LV-ViT, 2 epochs: Ctrl-C lands while checkpoint.pth of the last epoch is written (half the file
    is on disk). Expected: exit 130, one line saying that checkpoint.pth holds epoch 0 and how to
    continue; the old checkpoint.pth intact and no checkpoint.pth.tmp left behind."""
    out = ctx.tmp / "out"
    result = _wrapped(ctx, "lvvit", _on_the_nth_save("checkpoint.pth", 2, "os.kill(os.getpid(), signal.SIGINT)"),
                      *ctx.data_args("lvvit"), "--output_dir", out)
    return judge_stop(result, out, 130, "interrupted")


@case("writes")
def writes_sigusr1_while_the_images_are_checked(ctx: Context) -> Outcome:
    """EfficientTrain: SIGUSR1 (Slurm's warning before the time limit) arrives while the set-up opens
    the first image (nothing trained yet). Expected: one line saying the run was stopped before
    training started and that nothing was saved, exit 3 (the documented preemption code); a process
    that dies without a word (exit 138) leaves the user guessing."""
    out = ctx.tmp / "out"
    patch = """
from PIL import Image
_open, _seen = Image.open, []
def _first_open(*args, **kwargs):
    if not _seen:
        _seen.append(1)
        os.kill(os.getpid(), signal.SIGUSR1)
    return _open(*args, **kwargs)
Image.open = _first_open
"""
    result = _wrapped(ctx, "et", patch, *ctx.data_args("et"), "--output_dir", out)
    return judge_stop(result, out, 3, "stopped")


@case("writes")
def writes_sigterm_while_the_resume_file_is_read(ctx: Context) -> Outcome:
    """YOLOS, a run of 1 epoch continued with --epochs 2 --auto-resume: SIGTERM arrives while the
    set-up reads OUT/checkpoint.pth. Expected: exit 3 and one line saying that checkpoint.pth (epoch 0)
    is there to continue from, the file unchanged; not a silent death (exit 143)."""
    out = ctx.tmp / "out"
    out.mkdir()
    run = ctx.fixtures.yolos_checkpoint().parent
    for name in ("checkpoint.pth", "log.txt", "args.yaml"):
        shutil.copy(run / name, out / name)
    before = (out / "checkpoint.pth").read_bytes()
    patch = """
import torch
_load, _seen = torch.load, []
def _first_load(*args, **kwargs):
    if not _seen:
        _seen.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
    return _load(*args, **kwargs)
torch.load = _first_load
"""
    result = _wrapped(ctx, "yolos", patch, *ctx.data_args("yolos"), "--output_dir", out, "--epochs", 2,
                      "--auto-resume")
    outcome = judge_stop(result, out, 3, "stopped")
    if outcome.cls == OK and (out / "checkpoint.pth").read_bytes() != before:
        return Outcome(LOST, "checkpoint.pth changed although the run stopped before training")
    return outcome


def _small_disk(folder: Path, size: str) -> bool:
    """A tmpfs of ``size`` at ``folder`` (needs root; False where it cannot be mounted)."""
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@case("writes")
def writes_disk_fills_up_before_the_second_checkpoint(ctx: Context) -> Outcome:
    """DeiT on a small disk (a tmpfs, shrunk after epoch 0 to the used space plus 64 kB; where no tmpfs
    can be mounted, torch.save fails with ENOSPC half-way instead): --auto-resume trains epoch 1 and
    cannot write its checkpoint. Expected: one line naming the file, the lack of space and the fix
    (free space or another --output_dir), exit 2, epoch 0's checkpoint.pth intact, no partial file."""
    disk = ctx.tmp / "disk"
    out = disk / "out"
    mounted = _small_disk(disk, "8m")
    try:
        first = ctx.main("deit", *ctx.data_args("deit"), "--output_dir", out, "--stop-after-epochs", 1)
        if (failed := judge_ran(first)) is not None:
            return Outcome(failed.cls, f"the first run failed: {failed.reason}")
        if mounted:
            used = shutil.disk_usage(disk).used
            subprocess.run(["mount", "-o", f"remount,size={used + 64 * 1024}", str(disk)], check=True)
            result = ctx.main("deit", *ctx.data_args("deit"), "--output_dir", out, "--auto-resume")
        else:
            full = "raise OSError(28, 'No space left on device')"
            result = _wrapped(ctx, "deit", _on_the_nth_save("checkpoint.pth", 1, full), *ctx.data_args("deit"),
                              "--output_dir", out, "--auto-resume")
        outcome = judge_stop(result, out, 2, "error")
        if outcome.cls == OK and not _matches(error_lines(result)[0], [("space", "full"), "--output_dir"]):
            return Outcome(POOR, f"does not say the disk is full and what to do: {short(error_lines(result)[0])}")
        return outcome
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@case("writes")
def writes_log_cannot_be_written(ctx: Context) -> Outcome:
    """LV-ViT: log.txt cannot be appended at the end of epoch 0 (an I/O error of a network file system,
    EIO). Expected: one line naming log.txt, the problem and a fix, exit 2, nothing lost; not a
    traceback."""
    out = ctx.tmp / "out"
    patch = """
import builtins
_open = builtins.open
def _failing_open(file, mode="r", *args, **kwargs):
    if str(file).endswith("log.txt") and "a" in mode:
        raise OSError(5, "Input/output error", str(file))
    return _open(file, mode, *args, **kwargs)
builtins.open = _failing_open
"""
    result = _wrapped(ctx, "lvvit", patch, *ctx.data_args("lvvit"), "--output_dir", out)
    outcome = judge_stop(result, out, 2, "error")
    if outcome.cls == OK and "log.txt" not in error_lines(result)[0]:
        return Outcome(POOR, f"does not name log.txt: {short(error_lines(result)[0])}")
    return outcome


@case("writes")
def writes_time_limit_under_torchrun(ctx: Context) -> Outcome:
    """EfficientTrain through its run script with NPROC=2 (torchrun, 2 gloo processes) and --time-limit
    0.05: both processes stop at their first check with a checkpoint and exit 3. Expected: the job
    exits 3 with rank 0's one line (what a scheduler script reads as "preempted, requeue"); torchrun's
    ChildFailedError report and exit 1 read as a crash."""
    out = ctx.tmp / "out"
    result = ctx.bash(RUN_SCRIPTS["et"], ctx.fixtures.images(), out, *RECIPES["et"], "--time-limit", "0.05",
                      "--log-interval", 1, env={"NPROC": "2"})
    if "ChildFailedError" in result.text:
        return Outcome(TRACEBACK, f"torchrun's ChildFailedError report, exit {result.rc}: "
                                  f"{short(next((line for line in error_lines(result) if 'stopped' in line), ''))}")
    return judge_stop(result, out, 3, "stopped")


# -- scripts: scripts ----------------------------------------------------------------------------
# (cases of the group "scripts" go here)
def _shadow_checkout(ctx: Context) -> Optional[Path]:
    """A folder that stands for the checkout (its ToE/, run/, token_select.py and pyproject.toml linked)
    with this audit's .venv: scripts that set up .venv or move to the repository root (run/demo.sh, the
    old generate_labels.sh) then write into this case's folder, never into the checkout. None when the
    checkout's pyproject.toml differs (run/_env.sh would reinstall the shared .venv)."""
    if (ctx.repo / "pyproject.toml").read_bytes() != (HERE / "pyproject.toml").read_bytes():
        return None
    shadow = ctx.tmp / "checkout"
    shadow.mkdir(exist_ok=True)
    for name in ("ToE", "run", "token_select.py", "pyproject.toml"):
        if not (shadow / name).exists():
            (shadow / name).symlink_to(ctx.repo / name)
    if not (shadow / ".venv").exists():
        (shadow / ".venv").symlink_to(Path(sys.executable).parent.parent)  # the venv, not the interpreter's target
    return shadow


def _demo_case(ctx: Context, env: Dict[str, str], cwd: Optional[Path] = None) -> tuple:
    """run/demo.sh --check-only (of a stand-in checkout) with ``env``; (result, checkout) or (None, reason)."""
    shadow = _shadow_checkout(ctx)
    if shadow is None:
        return None, Outcome(POOR, "not run: the checkout's pyproject.toml differs from the audit's .venv")
    return ctx.bash(str(shadow / "run" / "demo.sh"), "--check-only", env=env, cwd=cwd or shadow), shadow


@case("scripts")
def scripts_demo_epochs_negative(ctx: Context) -> Outcome:
    """DEMO_EPOCHS=-2 bash run/demo.sh (a minus typed by mistake; --check-only after it, so a demo that
    takes it ends in seconds). Expected: refused in one line naming DEMO_EPOCHS before anything is set
    up; one that sets up its folder and data first and then fails on what a helper made of the value is
    poor; one that goes on is silent."""
    out = ctx.tmp / "demo"
    result, shadow = _demo_case(ctx, {"DEMO_EPOCHS": "-2", "DEMO_OUT": str(out)})
    if result is None:
        return shadow
    if "Traceback (most recent call last)" in result.text:
        return judge_refusal(result)
    if out.exists():
        if result.rc == 0:
            return Outcome(SILENT, f"went on with DEMO_EPOCHS=-2: made {out.name}/ and ran main.py")
        return Outcome(POOR, f"set up {out.name}/ and the data first, then exit {result.rc}, naming what main.py got "
                             f"instead of DEMO_EPOCHS: {short(last_line(result.err), 140)}")
    return judge_refusal(result, needles=["DEMO_EPOCHS"])


@case("scripts")
def scripts_demo_out_relative_to_the_user(ctx: Context) -> Outcome:
    """From a folder of one's own: DEMO_OUT=results/first bash <checkout>/run/demo.sh (a relative path,
    as for any command). Expected: the demo's folder is ./results/first where the user is; a folder
    made inside the repository instead is silent."""
    user = ctx.tmp / "home"
    user.mkdir()
    result, shadow = _demo_case(ctx, {"DEMO_OUT": "results/first"}, cwd=user)
    if result is None:
        return shadow
    if (user / "results" / "first" / ".toe-demo").is_file():
        return Outcome(OK, "DEMO_OUT read from the user's folder: results/first made there")
    if (shadow / "results" / "first").exists():
        return Outcome(SILENT, "DEMO_OUT=results/first was made in the repository, not where the user ran the demo")
    return judge_refusal(result)


@case("scripts")
def scripts_generate_labels_out_relative(ctx: Context) -> Outcome:
    """From the folder holding one's images: bash <checkout>/ToE/lvvit/run/generate_labels.sh
    $PWD/imgs $PWD/teacher.pth my_labels --model digits_cnn (absolute inputs, a relative OUT). Expected:
    the labels in ./my_labels where the user is; labels written into the repository are silent."""
    shadow = _shadow_checkout(ctx)
    if shadow is None:
        return Outcome(POOR, "not run: the checkout's pyproject.toml differs from the audit's .venv")
    user = ctx.tmp / "home"
    shutil.copytree(ctx.fixtures.images(), user / "imgs")
    made = ctx.run([sys.executable, "-c", "import sys, timm, torch, ToE.lvvit; torch.manual_seed(0); "
                    "torch.save(timm.create_model('digits_cnn', num_classes=3).state_dict(), sys.argv[1])",
                    str(user / "teacher.pth")])
    if made.rc != 0:
        return Outcome(TRACEBACK, f"could not build the digits_cnn teacher: {short(last_line(made.err))}")
    result = ctx.bash(str(shadow / "ToE" / "lvvit" / "run" / "generate_labels.sh"), user / "imgs",
                      user / "teacher.pth", "my_labels", "--model", "digits_cnn", "--img-size", 32, "-b", 4,
                      "--device", "cpu", "--num-workers", 0, cwd=user)
    if (failed := judge_ran(result)) is not None:
        return failed
    here, there = list((user / "my_labels").rglob("*.pt")), list((shadow / "my_labels").rglob("*.pt"))
    if there:
        return Outcome(SILENT, f"{len(there)} label files written into the repository's my_labels/, none where the "
                               "user ran the script")
    return Outcome(OK, f"{len(here)} label files in the user's ./my_labels")


@case("scripts")
def scripts_slurm_gpus_from_cuda_visible_devices(ctx: Context) -> Outcome:
    """DRY_RUN=1 bash run/slurm.sh ToE/deit/main.py ... as in a job of an older Slurm with --gres=gpu:2:
    SLURM_GPUS_ON_NODE unset, CUDA_VISIBLE_DEVICES=0,1, and an nvidia-smi that fails (no driver
    on the node where the script is tested). Expected: 2 processes per node from CUDA_VISIBLE_DEVICES,
    or a one-line refusal that says no GPU was counted and what to set; an exit without a word is a
    crash."""
    fake = ctx.tmp / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/usr/bin/env bash\necho "NVIDIA-SMI has failed because it could not '
                                     'communicate with the NVIDIA driver" >&2\nexit 9\n')
    (fake / "nvidia-smi").chmod(0o755)
    result = ctx.bash("run/slurm.sh", "ToE/deit/main.py", "--data-path", ctx.fixtures.images(), "--output_dir",
                      ctx.tmp / "out", env={"DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": "0,1",
                                            "PATH": f"{fake}:{os.environ['PATH']}"})
    if result.rc == 0:
        words = shlex.split(result.out)
        nproc = words[words.index("--nproc_per_node") + 1] if "--nproc_per_node" in words else "?"
        return Outcome(OK if nproc == "2" else SILENT, f"--nproc_per_node {nproc} for CUDA_VISIBLE_DEVICES=0,1")
    if result.rc != 2 and not error_lines(result):
        return Outcome(TRACEBACK, f"exit {result.rc} without a word (nvidia-smi's failure ended the script)")
    return judge_refusal(result, needles=[("GPU", "GPUS_PER_NODE")])


@case("scripts")
def scripts_slurm_resume_from_another_run(ctx: Context) -> Outcome:
    """A Slurm job that continues another run's checkpoint in a new folder: run/slurm.sh ToE/deit/main.py
    --resume FIRST/checkpoint.pth --output_dir SECOND (DRY_RUN=1 shows the command; the trainer then
    checks it with --check-only), and the same job requeued (SLURM_RESTART_COUNT=1) once SECOND holds
    its own checkpoint. Expected: the job passes its checks, and the requeued start continues
    SECOND/checkpoint.pth; a refused job is poor, a requeue back to FIRST (losing the job's progress)
    silent."""
    first, second = ctx.tmp / "first", ctx.tmp / "second"
    made = ctx.main("deit", *ctx.data_args("deit"), "--output_dir", first, "--stop-after-epochs", 1)
    if (failed := judge_ran(made)) is not None:
        return Outcome(failed.cls, f"the first run failed: {failed.reason}")
    flags = [*ctx.data_args("deit"), "--output_dir", second, "--resume", first / "checkpoint.pth"]
    env = {"DRY_RUN": "1", "GPUS_PER_NODE": "1", "SLURM_JOB_ID": "11"}

    def command(extra_env: Dict[str, str]) -> Optional[List[str]]:
        dry = ctx.bash("run/slurm.sh", "ToE/deit/main.py", *flags, env={**env, **extra_env})
        words = shlex.split(dry.out) if dry.rc == 0 else []
        return words[words.index("ToE/deit/main.py") + 1:] if "ToE/deit/main.py" in words else None

    start = command({})
    if start is None:
        return Outcome(POOR, "DRY_RUN=1 printed no command")
    check = ctx.main("deit", *start, "--check-only")
    if check.rc != 0:
        outcome = judge_refusal(check)
        return Outcome(POOR if outcome.cls == OK else outcome.cls,
                       f"the job is refused at its start (the script added {' '.join(start[len(flags):]) or '-'}):"
                       f" {outcome.reason}")
    resumed = ctx.main("deit", *start, "--stop-after-epochs", 1)  # the job's first start: epoch 1 in SECOND
    if (failed := judge_ran(resumed)) is not None:
        return Outcome(failed.cls, f"the job's first start failed: {failed.reason}")
    requeued = command({"SLURM_RESTART_COUNT": "1"})
    if requeued is None:
        return Outcome(POOR, "DRY_RUN=1 printed no command for the requeued start")
    if "--resume" in requeued:
        return Outcome(SILENT, "the requeued start resumes FIRST/checkpoint.pth again: the job's own epochs in SECOND "
                               "are trained over")
    return Outcome(OK, f"first start: {' '.join(start[len(flags) - 2:])}; requeued: "
                       f"{' '.join(requeued[len(flags) - 2:])}")


@case("scripts")
def scripts_run_script_dry_run_on(ctx: Context) -> Outcome:
    """DRY_RUN=on bash ToE/EfficientTrain/run/imagenet_tiny_run1.sh DATA OUT --check-only (on, as in
    many tools' switches). Expected: the command printed (on taken for 1), or a one-line refusal naming
    DRY_RUN; the real command run instead of a dry run is silent."""
    result = ctx.bash("ToE/EfficientTrain/run/imagenet_tiny_run1.sh", ctx.fixtures.images(), ctx.tmp / "out",
                      "--check-only", env={"DRY_RUN": "on"})
    printed = [line for line in result.out.splitlines() if line.strip()]
    if result.rc == 0 and len(printed) == 1 and "main.py" in printed[0]:
        return Outcome(OK, "DRY_RUN=on printed the command")
    if result.rc == 2 and any("DRY_RUN" in line for line in error_lines(result)):
        return judge_refusal(result, needles=["DRY_RUN"])
    return Outcome(SILENT, f"DRY_RUN=on ran the real command (exit {result.rc}: "
                           f"{short(last_line(result.text), 120)})")


@case("scripts")
def scripts_yolos_script_init_forgotten(ctx: Context) -> Outcome:
    """DRY_RUN=1 bash ToE/yolos/run/coco_small_run1.sh COCO OUT --epochs 3 (INIT_CHECKPOINT forgotten).
    Expected: refused in one line naming the missing INIT_CHECKPOINT; a printed command that takes
    --epochs for the init checkpoint is silent."""
    result = ctx.bash("ToE/yolos/run/coco_small_run1.sh", ctx.fixtures.coco(), ctx.tmp / "out", "--epochs", 3,
                      env={"DRY_RUN": "1"})
    if result.rc == 0:
        words = shlex.split(result.out)
        init = words[words.index("--init-checkpoint") + 1] if "--init-checkpoint" in words else "?"
        return Outcome(SILENT, f"printed a command with --init-checkpoint {init}")
    return judge_refusal(result, needles=["INIT_CHECKPOINT"])


@case("scripts")
def scripts_summary_of_a_training_run(ctx: Context) -> Outcome:
    """python -m ToE.common.summary OUT while an EfficientTrain run still trains there (after its first
    epoch). Expected: the summary says the run is in progress and gives no advice to resume it
    (resuming now makes a second writer of OUT); 'UNFINISHED ... continue with --resume' is false."""
    out = ctx.tmp / "out"
    # (epochs of a fraction of a second: many, so that it still trains while the summary runs; it is stopped after)
    cmd = [sys.executable, MAIN["et"], *ET, "--epochs", 2000, *ctx.data_args("et"), "--output_dir", out]
    process = subprocess.Popen(list(map(str, cmd)), cwd=ctx.repo, env=ctx.audit.env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        if not _wait_for(out / "log.txt", process):
            return Outcome(TRACEBACK, f"the training ended before its first epoch was logged (exit {process.poll()})")
        time.sleep(0.5)
        result = ctx.module("ToE.common.summary", out)
    finally:
        _stop(process)
    if result.rc != 0:
        return judge_refusal(result)
    status = result.out.splitlines()[0] if result.out else ""
    if "--resume" in status or "--auto-resume" in status:
        return Outcome(SILENT, f"advises resuming a run that is training: {short(status, 160)}")
    if re.search(r"in progress|still training", status, re.I):
        return Outcome(OK, short(status, 200))
    return Outcome(SILENT, f"does not say the run is still training: {short(status, 160)}")


# -- messages: messages ----------------------------------------------------------------------------
# (cases of the group "messages" go here)
def _messages_tiny_run(ctx: Context, name: str, *extra) -> Path:
    """A finished 1-epoch tiny DeiT run of the checkout under test; its checkpoint.pth."""
    out = ctx.tmp / name
    result = ctx.main("deit", *ctx.data_args("deit"), "--output_dir", out, "--epochs", 1, *extra)
    if result.rc != 0:
        raise RuntimeError(f"the fixture run {name} failed: {last_line(result.err)}")
    return out / "checkpoint.pth"


def _messages_gif(path: Path) -> Path:
    """Rewrite an image as a GIF under its .png name: PIL (the torch path) reads it, DALI's decoder does not."""
    Image.open(path).convert("RGB").save(path, format="GIF")
    return path


@case("messages")
def messages_resume_published_deit_layout(ctx: Context) -> Outcome:
    """--resume weights.pth where the file is DeiT's published layout {"model": state dict} (pretrained
    weights, no optimizer or epoch). A DeiT user resumes or fine-tunes with such files. Expected: refused in
    one line saying these are pretrained weights and pointing to --finetune; a KeyError is a traceback."""
    checkpoint = _messages_tiny_run(ctx, "pre")
    weights = ctx.tmp / "deit_layout.pth"
    torch.save({"model": torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]}, weights)
    result = ctx.main("deit", *ctx.data_args("deit"), "--output_dir", ctx.tmp / "out", "--resume", weights)
    return judge_refusal(result, needles=["--finetune"], misleading="does not point to --finetune")


@case("messages")
def messages_finetune_from_a_vpt_run(ctx: Context) -> Outcome:
    """--finetune OUT/checkpoint.pth where OUT is a --vpt deep run (its checkpoint holds the prompts and the
    head only; the backbone is the run's own --finetune). Expected: one line that says it is a VPT run's
    checkpoint and names its backbone (and --resume to continue it); "holds no ViT weights" misleads."""
    backbone = _messages_tiny_run(ctx, "pre")
    vpt = _messages_tiny_run(ctx, "vpt", "--finetune", backbone, "--vpt", "deep", "--prompt-tokens", 2)
    result = ctx.main("deit", *ctx.data_args("deit"), "--output_dir", ctx.tmp / "out", "--finetune", vpt)
    return judge_refusal(result, needles=["vpt", str(backbone)],
                         misleading="does not say it is a VPT checkpoint tuned on its backbone")


@case("messages")
def messages_finetune_distilled_same_classes(ctx: Context) -> Outcome:
    """--finetune a distilled DeiT (3 classes) into a plain ViT of the same 3 classes. Expected: fine-tuned,
    with notes that are true (the distillation token and head are dropped); a note that the head 'has
    another class count' is false."""
    import timm

    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3, img_size=16,
                              patch_size=4, embed_dim=32, depth=2, num_heads=2)
    weights = ctx.tmp / "distilled.pth"
    torch.save({"model": model.state_dict()}, weights)
    result = ctx.main("deit", *ctx.data_args("deit"), "--output_dir", ctx.tmp / "out", "--epochs", 1,
                      "--finetune", weights)
    if (failed := judge_ran(result)) is not None:
        return failed
    notes = [line for line in result.out.splitlines() if line.startswith("note: --finetune")]
    if any("class count" in note for note in notes):
        return Outcome(SILENT, f"a false note (the class count is 3 in both): {short(notes[0], 160)}")
    said = [note for note in notes if "distill" in note]
    return Outcome(OK, f"fine-tuned; {short(said[0], 160)}" if said else "fine-tuned without a false note")


@case("messages")
def messages_dali_bad_train_image_in_batch(ctx: Context) -> Outcome:
    """--data-backend dali with one train image (not the first of its batch) a GIF under a .png name. The
    train split is read as it trains, so the failure comes in epoch 0. Expected: one line naming that file;
    a message naming the batch's first file points at a good image."""
    data = write_images(ctx.tmp / "data")
    bad = _messages_gif(data / "train" / "class1" / "2.png")
    result = ctx.main("deit", "--data-path", data, "--output_dir", ctx.tmp / "out", "--data-backend", "dali",
                      "--batch-size", 12, "--epochs", 1)
    lines = [line for line in error_lines(result) if line.startswith("error:")]
    if "Traceback" in result.text or result.rc != 2 or len(lines) != 1:
        return judge_refusal(result)
    if str(bad) in lines[0]:
        return Outcome(OK, f"refused, naming the file: {short(lines[0])}")
    return Outcome(POOR, f"names another file than the bad one: {short(lines[0])}")


@case("messages")
def messages_dali_val_image_pil_reads(ctx: Context) -> Outcome:
    """--data-backend dali with a val image that is a GIF under a .png name: PIL reads it (the up-front val
    check passes) but DALI cannot decode it. Expected: refused before training in one line naming the file;
    failing after a whole epoch is late."""
    data = write_images(ctx.tmp / "data")
    bad = _messages_gif(data / "val" / "class2" / "1.png")
    result = ctx.main("deit", "--data-path", data, "--output_dir", ctx.tmp / "out", "--data-backend", "dali",
                      "--epochs", 1)
    return judge_refusal(result, needles=[str(bad)], misleading="does not name the bad file")


@case("messages")
def messages_dali_run_stderr(ctx: Context) -> Outcome:
    """A working 2-epoch run with --data-backend dali on the CPU (RandAugment on). Expected: nothing on stderr
    but the run's own warnings; library noise repeated every epoch buries real errors."""
    result = ctx.main("deit", *ctx.data_args("deit"), "--output_dir", ctx.tmp / "out", "--data-backend", "dali")
    if (failed := judge_ran(result)) is not None:
        return failed
    noise = [line for line in result.err.splitlines() if line.strip() and not line.startswith("warning: ")]
    if noise:
        return Outcome(POOR, f"{len(noise)} lines of library output on stderr in a run that works: "
                             f"{short(noise[0], 150)}")
    return Outcome(OK, "a working run with nothing on stderr but its own warnings")


@case("messages")
def messages_flops_json_into_folder(ctx: Context) -> Outcome:
    """python -m ToE.flops --json DIR (an existing folder, not a file name). Expected: refused in one line
    before the count; a traceback after the whole count loses the work."""
    result = ctx.module("ToE.flops", "--model", "vit_tiny_patch16_224", "--input-size", 32, "--json", ctx.tmp,
                        "--analytic-only")
    outcome = judge_refusal(result, needles=["--json"])
    if outcome.cls == OK and result.out.strip():
        return Outcome(POOR, f"refused only after the report was printed: {outcome.reason}")
    return outcome


@case("messages")
def messages_gpu_check_out_is_a_file(ctx: Context) -> Outcome:
    """python -m ToE.gpu_check --out FILE (an existing file, e.g. a typo for its folder). Expected:
    refused in one line naming --out, the file intact."""
    target = ctx.tmp / "notes.txt"
    target.write_text("mine")
    result = ctx.module("ToE.gpu_check", "--out", target, "--only", "operator")
    if target.read_text() != "mine":
        return Outcome(LOST, "the file given to --out was changed")
    return judge_refusal(result, needles=["--out"])


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
    header = "| group | cases | " + " | ".join(f"{c} {label}" for c in CLASSES for label in labels) + " |"
    lines += [header, "|" + "---|" * (2 + len(CLASSES) * len(labels))]
    recorded = {r["case"] for r in records}
    trainers = [t for t in GROUPS if any(c.trainer == t and c.name in recorded for c in CASES)]
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
    parser.add_argument("--groups", nargs="+", default=None, choices=GROUPS, metavar="GROUP",
                        help=f"run the cases of these groups only ({', '.join(GROUPS)})")
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
