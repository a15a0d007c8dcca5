"""Shared pytest fixtures and the two test tiers.

The tiers: a test that starts a training process (a subprocess running a trainer's main.py,
torchrun, a launcher or demo script, a wrapper around main.py) or takes seconds in-process
(training, torch.compile, 224 px models) carries the ``e2e`` marker; every other test is a unit test.

    bash run/test.sh                # everything
    bash run/test.sh -m "not e2e"   # the unit tier, under a minute on 2 CPU cores
    bash run/test.sh -m e2e         # the end-to-end tier

A test without the marker that starts a trainer or launcher subprocess fails with a message
that says so (``_guard_unit_tests`` below), so the unit tier cannot silently grow slow.
Helpers that test modules import (the tiny recipe, the data generators, ``run_main``) are in
``helpers.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest
from helpers import write_images

E2E = "e2e"

# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny DeiT ImageFolder (``helpers.write_images``), generated once per module.
    Modules whose trainer needs another layout define their own ``data``."""
    return write_images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 10-class tiny ViT on 8 px images (a 2 x 2 grid): the checkpoint ``--finetune`` starts from in
    the tests (another class count than ``data``'s 3; the fine-tuning resamples the grid to 4 x 4)."""
    import timm
    import torch

    out = tmp_path_factory.mktemp("pre")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=8, embed_dim=32, depth=2, num_heads=2,
                              patch_size=4)
    torch.save({"model": model.state_dict()}, out / "checkpoint.pth")
    return out / "checkpoint.pth"


# -- the unit-tier guard ----------------------------------------------------------------------

# ``-m ToE.<trainer>.main`` or ``-m torch.distributed.run``
_TRAINER_MODULE = re.compile(r"^(ToE\.[\w.]+\.main|torch\.distributed\.run)$")


def starts_training(args) -> bool:
    """Whether a subprocess command line runs a trainer: its main.py (directly, as a module or
    through a wrapper script written by the test), torchrun, or a shell launcher (run scripts,
    demo, Slurm)."""
    if isinstance(args, (str, bytes, os.PathLike)):
        args = shlex.split(os.fsdecode(args))
    argv = [os.fsdecode(a) for a in args]
    for i, arg in enumerate(argv):
        name = os.path.basename(arg)
        if name in ("torchrun", "main.py") or name.endswith(".sh"):
            return True
        if i > 0 and argv[i - 1] == "-m" and _TRAINER_MODULE.match(arg):
            return True
        if i > 0 and name.endswith(".py") and os.path.basename(argv[0]).startswith("python"):
            return True  # a script run by Python: a wrapper around main.py
    return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _guard_unit_tests(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _guard_unit_tests(item):
        return (yield)


class _guard_unit_tests:
    """While a unit test (no ``e2e`` marker) and its fixtures run, a subprocess that would start
    a training process fails the test instead, naming the marker it lacks."""

    def __init__(self, item):
        self.item = item

    def __enter__(self):
        self.original = None
        if self.item.get_closest_marker(E2E) is not None:
            return self
        original, nodeid = subprocess.Popen.__init__, self.item.nodeid

        def checked_init(popen, *args, **kwargs):
            command = args[0] if args else kwargs.get("args")
            if starts_training(command):
                pytest.fail(f"{nodeid} starts a training process ({command!r}) but is not marked "
                            f"@pytest.mark.{E2E}", pytrace=False)
            original(popen, *args, **kwargs)

        self.original = original
        subprocess.Popen.__init__ = checked_init
        return self

    def __exit__(self, *exc_info):
        if self.original is not None:
            subprocess.Popen.__init__ = self.original
        return False


# -- the optional extras ----------------------------------------------------------------------

# the module a test skips without (pytest.importorskip's "could not import 'X'") -> the extra that installs it
_EXTRA_OF = {"nvidia.dali": "dali", "nvidia": "dali", "transformers": "hf", "accelerate": "hf"}


def pytest_terminal_summary(terminalreporter):
    """After the run: which tests were skipped because an optional extra (pyproject's dali, hf) is not
    installed, and the one command that adds them, so that a fresh clone's run says what it left out."""
    missing = {}  # extra -> {test file: skips}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr or "")
        found = re.search(r"could not import '([\w.]+)'", reason)
        extra = _EXTRA_OF.get(found.group(1)) if found else None
        if extra:
            where = report.nodeid.split("::")[0] or str(report.location[0] if report.location else "?")
            files = missing.setdefault(extra, {})
            files[where] = files.get(where, 0) + 1
    if not missing:
        return
    said = "; ".join(f"{extra}: " + ", ".join(f"{name}" + (f" ({count})" if count > 1 else "")
                                              for name, count in sorted(files.items()))
                     for extra, files in sorted(missing.items()))
    total = sum(sum(files.values()) for files in missing.values())
    terminalreporter.write_sep("-", "optional extras not installed")
    terminalreporter.write_line(f"{total} skipped for a missing optional extra ({said}). Add them with: "
                                f'.venv/bin/pip install -e ".[{",".join(sorted(missing))}]"')
