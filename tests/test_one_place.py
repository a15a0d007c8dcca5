"""Each concept in one place (issue 29): the list of trainers (``ToE/trainers.py``) and the reader of
a run's log (``ToE.common.log.read_log``). The scans read the repository's own files as ``git grep``
would; what they forbid is a second copy, so a new trainer or a new log format changes one file."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT

from ToE.common.errors import UserError
from ToE.common.log import read_log
from ToE.trainers import TRAINERS

LIST = "ToE/trainers.py"
HERE = "tests/test_one_place.py"  # its examples of lists are the scan's own test data


# what git ignores or does not hold (.gitignore): environments, caches, data, runs
SKIPPED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist", "data", "runs", "outputs",
           "output", "tensorboard"}


def _files(*suffixes: str, under=("",)):
    """The repository's files ending in ``suffixes`` (under the folders ``under``), paths relative to the root."""
    found = []
    for folder in under:
        for here, dirs, files in os.walk(ROOT / folder):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED and not d.endswith(".egg-info"))
            found += [os.path.relpath(os.path.join(here, f), ROOT) for f in files if f.endswith(suffixes)]
    return sorted(set(found))


def _strings(nodes):
    return [node.value for node in nodes if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def _restates(name: str, value: str) -> bool:
    """Whether ``value``, given for trainer ``name``, restates what the list holds of it (folder, title,
    package, module or main.py)."""
    trainer = TRAINERS[name]
    return value in (trainer.folder, trainer.title, trainer.package, trainer.module, trainer.main) or \
        f"ToE/{trainer.folder}/" in value or value.startswith(f"{trainer.package}.")


def python_lists(source: str):
    """(line, what) for every literal in ``source`` that lists the trainers again: a tuple, list or set
    of all their names (or folders), a dict whose values are all of them, or a dict that maps a trainer
    to what the list already says of it (its folder, title, module, main.py)."""
    names, folders = set(TRAINERS), {trainer.folder for trainer in TRAINERS.values()}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            strings = set(_strings(node.elts))
            if names <= strings or folders <= strings:
                found.append((node.lineno, "a literal holding every trainer"))
        elif isinstance(node, ast.Dict):
            values = set(_strings(node.values))
            if names <= values or folders <= values:
                found.append((node.lineno, "a dict whose values are every trainer"))
            for key, value in zip(node.keys, node.values):
                if (isinstance(key, ast.Constant) and key.value in TRAINERS and isinstance(value, ast.Constant)
                        and isinstance(value.value, str) and _restates(key.value, value.value)):
                    found.append((node.lineno, f"{key.value!r} -> {value.value!r} (in {LIST})"))
    return found


def shell_lists(source: str):
    """(line, text) for every line of shell code (comments left out) that names three or more trainers."""
    words = {name: {name, trainer.folder} for name, trainer in TRAINERS.items()}
    found = []
    for number, line in enumerate(source.splitlines(), start=1):
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        named = [name for name, spelled in words.items()
                 if any(re.search(rf"(?<![\w/.-]){re.escape(word)}(?![\w-])", code) for word in spelled)]
        if len(named) >= 3:
            found.append((number, line.strip()))
    return found


def test_the_trainers_are_listed_once():
    """``git grep`` finds one list of trainers: ToE/trainers.py. ToE.common.config, run/demo.sh, the GPU check,
    the audit and the tests read it; a table of per-trainer data (a tiny recipe each) may be keyed by trainer
    name, but none repeats the names as a list or restates a trainer's folder, module, main.py or title."""
    assert set(TRAINERS) == {"deit", "lvvit", "et", "yolos"}  # the list itself (here, to test the scan)
    problems = []
    for name in _files(".py", ".sh"):
        if name in (LIST, HERE):
            continue
        source = (ROOT / name).read_text()
        found = python_lists(source) if name.endswith(".py") else shell_lists(source)
        problems += [f"{name}:{line}: {what}" for line, what in found]
    assert not problems, "lists of trainers besides " + LIST + ":\n" + "\n".join(problems)


def test_the_scan_finds_the_lists_there_were_before():
    """The scan is not vacuous: the lists issue 29 found (config.py, run/demo.sh, bench/audit.py) are caught."""
    before_py = '''
TRAINERS = {"deit": "deit", "lvvit": "lvvit", "et": "EfficientTrain", "yolos": "yolos"}
GROUPS = ("lvvit", "et", "yolos", "deit", "tools")
MAIN = {"deit": "ToE/deit/main.py", "lvvit": "ToE/lvvit/main.py"}
module = f"ToE.{ {'et': 'EfficientTrain'}.get(trainer, trainer)}.main"
FOLDERS = {"deit": "deit", "lvvit": "lvvit", "EfficientTrain": "et", "yolos": "yolos"}
RECIPES = {"deit": ["--lr", "1"], "lvvit": [], "et": [], "yolos": []}
'''
    lines = {line for line, _ in python_lists(before_py)}
    assert lines == {2, 3, 4, 5, 6}, python_lists(before_py)  # not line 7: per-trainer data keyed by name
    before_sh = '''
# bash run/demo.sh [deit|lvvit|et|yolos]
  deit|lvvit|et|yolos) TRAINER="$1"; shift ;;
declare -A FOLDER=([deit]=deit [lvvit]=lvvit [et]=EfficientTrain [yolos]=yolos)
SCRIPT="$ROOT_DIR/ToE/${FOLDER[$TRAINER]}/run/demo.sh"
'''
    assert [line for line, _ in shell_lists(before_sh)] == [3, 4]


@pytest.mark.e2e  # runs run/demo.sh (to its first check only)
def test_the_list_reads_in_the_shell_before_the_venv_exists():
    """``python3 ToE/trainers.py`` (standard library only) prints "name folder" lines; run/demo.sh builds its
    usage and its check of the trainer from them, before it sets anything up."""
    printed = subprocess.run(["python3", str(ROOT / LIST)], capture_output=True, text=True, check=True,
                             env={"PATH": os.environ["PATH"]}).stdout
    assert [line.split() for line in printed.splitlines()] == [[n, t.folder] for n, t in TRAINERS.items()]
    result = subprocess.run(["bash", str(ROOT / "run" / "demo.sh"), "nosuchtrainer"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: unknown trainer 'nosuchtrainer'. Usage: bash run/demo.sh [{'|'.join(TRAINERS)}] "
                             "[main.py flags]\n")


# -- the log reader -------------------------------------------------------------------------------------------
def _functions_reading_the_log(source: str):
    """(line, name) of the functions that mention log.txt and parse JSON lines themselves."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = [n for n in ast.walk(node) if n is not node and isinstance(n, (ast.FunctionDef,
                                                                                      ast.AsyncFunctionDef))]
            own = [n for n in ast.walk(node) if not any(n in set(ast.walk(f)) for f in inner)]
            mentions = any(isinstance(n, ast.Constant) and isinstance(n.value, str) and "log.txt" in n.value
                           for n in own)
            parses = any(isinstance(n, ast.Attribute) and n.attr == "loads" and isinstance(n.value, ast.Name)
                         and n.value.id == "json" for n in own)
            if mentions and parses:
                found.append((node.lineno, node.name))
    return found


def test_a_run_log_is_read_in_one_place():
    """The summary, the benches, the audit and the GPU check read log.txt through ToE.common.log.read_log,
    beside its writer; no other project code parses its lines."""
    problems = []
    for name in [*_files(".py", under=("ToE", "bench", "examples")), "token_select.py"]:
        if name == "ToE/common/log.py":
            continue
        problems += [f"{name}:{line}: {function}" for line, function in
                     _functions_reading_the_log((ROOT / name).read_text())]
    assert not problems, "log.txt read outside ToE.common.log.read_log:\n" + "\n".join(problems)
    old = 'def read_log(out):\n    path = out / "log.txt"\n    return [json.loads(line) for line in open(path)]\n'
    assert _functions_reading_the_log(old) == [(1, "read_log")]  # the scan finds the readers there were


def _write_log(folder: Path, *lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").write_text("".join(line + "\n" for line in lines))
    return folder


def test_read_log_reads_records_and_names_what_is_wrong(tmp_path):
    records = [{"epoch": 0, "stage": 1, "train_loss": 2.5}, {"epoch": 1, "stage": 2, "train_loss": 2.0}]
    run = _write_log(tmp_path / "run", *map(json.dumps, records), "")
    assert read_log(str(run)) == records == read_log(run, ("epoch", "stage"))
    with pytest.raises(UserError, match=r"line 1 lacks test_acc1: not a log written by a ToE trainer"):
        read_log(run, ("epoch", "test_acc1"))
    with pytest.raises(UserError, match="does not exist"):
        read_log(tmp_path / "none")
    assert read_log(tmp_path / "none", missing_ok=True) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no log.txt in .*empty: no epoch has finished there"):
        read_log(tmp_path / "empty")
    assert read_log(tmp_path / "empty", missing_ok=True) == []
    blank = _write_log(tmp_path / "blank", "")
    with pytest.raises(UserError, match="holds no finished epoch yet"):
        read_log(blank)
    assert read_log(blank, missing_ok=True) == []
    cut = _write_log(tmp_path / "cut", json.dumps(records[0]), '{"epoch": 1, "sta')
    with pytest.raises(UserError, match="line 2 is damaged"):
        read_log(cut, missing_ok=True)
    other = _write_log(tmp_path / "other", "[1, 2]")
    with pytest.raises(UserError, match="line 1 is not a record"):
        read_log(other)


def _project_imports():
    """{module: the project modules it imports (at the top or inside a function)}, read from the source."""
    modules = {"token_select": ROOT / "token_select.py"}
    for path in (ROOT / "ToE").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found |= {target for target in targets if target in modules and target != name}
        graph[name] = found
    return graph


def test_no_import_cycle_and_common_code_imports_no_trainer():
    """Issue 29: lifecycle and args formed a cycle, data and dali another; ToE/common imported DeiT and
    LV-ViT (the GPU check). Imports inside functions count: they are cycles a reader walks too."""
    graph = _project_imports()
    trainers = {f"ToE.{trainer.folder}" for trainer in TRAINERS.values()}
    assert not [(module, target) for module, targets in graph.items() if module.startswith("ToE.common")
                for target in targets if any(target == t or target.startswith(t + ".") for t in trainers)]
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open" and not module.startswith(target + "."):  # a package's own __init__
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
