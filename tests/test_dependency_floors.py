"""Issue 31: the floor of every dependency in pyproject.toml is the oldest version the code runs on.

What this checks, and what it cannot:

- ``FLOORS`` below is the reasoning, one row per runtime dependency: the floor and why (the API of
  the project's code that needs it, or the oldest release that installs on the oldest Python the
  project supports, 3.9, where the APIs are older). pyproject.toml must declare exactly these floors.
- Every runtime dependency is imported by the project's code, and every third-party module the code
  imports is declared (a runtime dependency or an optional extra).
- The APIs the rows name exist in the installed versions (the table names real things).
- ``NEWER_APIS``: APIs known to be newer than some release. Where the code uses one without a
  ``hasattr`` guard on the same line or the line before, the declared floor must be at least the
  release that added it.

It cannot install the floor versions (no network in the tests, and torch 2.4 is a 1 GB wheel): a use
of an API that is newer than its floor and not in ``NEWER_APIS`` goes unnoticed. The timm floor was
checked by hand: 1.0.11 lacks ``timm.optim.list_optimizers``; with timm 1.0.12 the unit tier of the
timm-heavy test modules passes (but one test that calls timm's ``forward_features(attn_mask=)``, an
API of the test, not of the project). The optional extras (dev, dali, hf) have no floors.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT

# name in pyproject -> (floor, why, [(module, dotted attribute) the reason names])
FLOORS = {
    "torch": ("2.4", "torch.amp.is_autocast_available (token_select.py, ToE/yolos/model.py), added in 2.4 "
              "(pytorch PR 124938); torch.amp.GradScaler('cuda') needs 2.3",
              [("torch", "amp.is_autocast_available"), ("torch", "amp.GradScaler")]),
    "torchvision": ("0.19", "the torchvision release built for torch 2.4 (each release pins its torch)",
                    [("torchvision.ops", "box_convert")]),
    "timm": ("1.0.12", "timm.optim.list_optimizers (ToE/common/classification.py): absent in 1.0.11",
             [("timm.optim", "list_optimizers"), ("timm.utils", "ModelEmaV3"),
              ("timm.scheduler", "create_scheduler_v2")]),
    "numpy": ("1.19.3", "numpy.random.default_rng and SeedSequence need 1.17; 1.19.3 is the first release with "
              "wheels for Python 3.9", [("numpy.random", "default_rng"), ("numpy.random", "SeedSequence")]),
    "pillow": ("9.1", "Image.Quantize and Image.Dither (bench/figures.py), added in Pillow 9.1",
               [("PIL.Image", "Quantize.MEDIANCUT"), ("PIL.Image", "Dither.NONE")]),
    "scipy": ("1.5.4", "scipy.optimize.linear_sum_assignment (YOLOS's matcher) is older; 1.5.4 is the first "
              "release with wheels for Python 3.9", [("scipy.optimize", "linear_sum_assignment")]),
    "scikit-learn": ("0.24", "sklearn.datasets.load_digits / load_sample_image(s) are older; 0.24 is the first "
                     "release with wheels for Python 3.9", [("sklearn.datasets", "load_digits")]),
    "pycocotools": ("2.0.6", "COCOeval before 2.0.6 uses numpy.float, removed in NumPy 1.24",
                    [("pycocotools.cocoeval", "COCOeval"), ("pycocotools.coco", "COCO.loadRes")]),
    "tensorboard": ("1.15", "torch.utils.tensorboard refuses older releases", []),
    "tqdm": ("4.15", "tqdm(disable=None): no bar where the output is no terminal (checked in the 4.15.0 wheel)",
             [("tqdm", "tqdm.set_postfix")]),
    "pyyaml": ("5.1", "yaml.safe_dump(sort_keys=False) (ToE/common/log.py), added in PyYAML 5.1",
               [("yaml", "safe_dump")]),
    "matplotlib": ("3.5", "plt.subplots(layout='constrained') (bench/figures.py), added in 3.5",
                   [("matplotlib.figure", "Figure.set_layout_engine")]),
}
# the module each distribution is imported as (tensorboard through torch.utils.tensorboard)
IMPORT_NAMES = {"pillow": "PIL", "scikit-learn": "sklearn", "pyyaml": "yaml", "tensorboard": "torch.utils.tensorboard"}
# third-party modules of the optional extras (pyproject's [project.optional-dependencies])
EXTRA_MODULES = {"nvidia", "transformers", "accelerate", "pytest"}

# (pattern in the code, distribution, the release that added it)
NEWER_APIS = [
    (r"torch\.amp\.is_autocast_available", "torch", "2.4"),
    (r"torch\.amp\.GradScaler", "torch", "2.3"),
    (r"torch\.nn\.utils\.get_total_norm", "torch", "2.6"),
    (r"torch\.nn\.utils\.clip_grads_with_norm_", "torch", "2.6"),
    (r"\blist_optimizers\b", "timm", "1.0.12"),
    (r"\bImage\.(Quantize|Dither|Resampling|Transpose)\b", "pillow", "9.1"),
    (r"layout=\"constrained\"|layout='constrained'", "matplotlib", "3.5"),
    (r"sort_keys\s*=", "pyyaml", "5.1"),
]


def _version(text: str):
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def declared():
    """pyproject's runtime dependencies: {name: floor or None}."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    result = {}
    for requirement in re.findall(r'"([^"]+)"', block):
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        floor = re.search(r">=\s*([0-9][0-9.]*)", requirement)
        result[name] = floor.group(1) if floor else None
    return result


def code_files():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / f for f in files if not f.startswith("tests/") and (ROOT / f).is_file()]


def test_pyproject_declares_the_floors_of_the_table():
    assert declared() == {name: floor for name, (floor, _, _) in FLOORS.items()}


def test_every_dependency_is_used_and_every_import_is_declared():
    imported = set()
    for path in code_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
    for name in FLOORS:
        module = IMPORT_NAMES.get(name, name)
        assert any(m == module or m.startswith(module + ".") for m in imported), f"{name} is never imported"
    top = {m.split(".")[0] for m in imported}
    own = {"ToE", "token_select", "bench", "examples", "helpers"}
    declared_top = {IMPORT_NAMES.get(name, name).split(".")[0] for name in FLOORS}
    stdlib = set(getattr(sys, "stdlib_module_names", ())) or pytest.skip("needs Python 3.10+ for the stdlib list")
    undeclared = sorted(top - own - declared_top - EXTRA_MODULES - stdlib - {"__future__"})
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_the_apis_the_table_names_exist(name):
    floor, _, apis = FLOORS[name]
    installed = importlib.metadata.version(name)
    assert _version(installed) >= _version(floor), f"{name} {installed} is below its floor {floor}"
    for module, attributes in apis:
        value = importlib.import_module(module)
        for attribute in attributes.split("."):
            value = getattr(value, attribute)


def test_the_code_uses_no_api_newer_than_its_floor():
    floors = declared()
    problems = []
    for path in code_files():
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            for pattern, name, added in NEWER_APIS:
                if not re.search(pattern, line) or line.lstrip().startswith("#"):
                    continue
                guarded = "hasattr(" in line or (number > 0 and "hasattr(" in lines[number - 1])
                if not guarded and _version(floors[name]) < _version(added):
                    problems.append(f"{path.relative_to(ROOT)}:{number + 1}: {pattern} needs {name} {added}, "
                                    f"the floor is {floors[name]}")
    assert not problems, "\n".join(problems)


# -- the optional extras: a run says which tests it skipped without them ----------------------------------
BLOCK_EXTRAS = '''
import sys

class _Missing:
    def find_spec(self, name, path=None, target=None):
        if any(name == m or name.startswith(m + ".") for m in ("nvidia.dali", "transformers", "accelerate")):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Missing())
'''
NEEDS_EXTRAS = '''
import pytest

def test_dali():
    pytest.importorskip("nvidia.dali")

@pytest.mark.parametrize("n", [1, 2])
def test_hf(n):
    pytest.importorskip("transformers")

def test_plain():
    pass
'''


@pytest.mark.e2e
def test_a_run_names_the_tests_a_missing_extra_skipped_and_the_command_that_adds_them(tmp_path):
    """tests/conftest.py's terminal summary, in a pytest run (tests/conftest.py beside a test file that
    needs the extras) where the extras cannot be imported."""
    for name in ("conftest.py", "helpers.py"):
        (tmp_path / name).write_text((ROOT / "tests" / name).read_text())
    (tmp_path / "block_extras.py").write_text(BLOCK_EXTRAS)
    (tmp_path / "test_needs_extras.py").write_text(NEEDS_EXTRAS)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env["PYTHONPATH"] = f"{tmp_path}:{ROOT}"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "block_extras", "-p",
                             "no:cacheprovider", "--rootdir", str(tmp_path), "test_needs_extras.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("3 skipped for a missing optional extra (dali: test_needs_extras.py; hf: test_needs_extras.py (2)). "
            'Add them with: .venv/bin/pip install -e ".[dali,hf]"') in result.stdout, result.stdout
