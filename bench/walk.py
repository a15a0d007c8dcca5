"""The walk a reader follows from a trainer's main to its first optimizer step (issue 29).

    python -m bench.walk [--trainer deit] [--out bench/results/walk.json]

Runs the trainer's ``cli`` in this process on a tiny model and the digits images (built into a
temporary folder), with a profile hook that records every call of a project function (a file of
this repository, not of the libraries) until the optimizer's first ``step``. Reported: the
project functions called (distinct), the files they live in, the file switches (a call in
another file than the call before it) and how many of those go back to a file already left. It
counts what a reader stepping through the run in a debugger would have to open, in order.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model-kwargs", "embed_dim=48", "depth=2", "num_heads=2", "--patch-size", "4", "--input-size", "32",
        "--batch-size", "16", "--epochs", "2", "--num_workers", "2", "--device", "cpu", "--expansion-step", "0", "1",
        "--keep-rate", "0.5", "1.0"]


class FirstStep(Exception):
    """Raised by the hook at the optimizer's first step: the walk ends there."""


def trace(trainer: str, data: str) -> List[Tuple[str, str]]:
    """The project calls ``(file, function)`` in order, from the trainer's main to the first step."""
    import importlib

    module = importlib.import_module(f"ToE.{trainer}.main")
    root = str(ROOT)
    venv = str(ROOT / ".venv")
    here = str(Path(__file__).resolve())
    calls: List[Tuple[str, str]] = []

    def hook(frame, event, arg):
        if event != "call":
            return
        filename = frame.f_code.co_filename
        if frame.f_code.co_name == "step" and f"{os.sep}torch{os.sep}optim{os.sep}" in filename:
            raise FirstStep
        # functions only: not module or class bodies (imports), not comprehensions
        if filename.startswith(root) and not filename.startswith(venv) and filename != here \
                and frame.f_code.co_flags & inspect.CO_OPTIMIZED and not frame.f_code.co_name.startswith("<"):
            calls.append((os.path.relpath(filename, root), frame.f_code.co_name))

    argv = ["--data-path", data, *TINY]
    sys.setprofile(hook)
    try:
        module.main(module.parse_args(argv))
    except FirstStep:
        pass
    finally:
        sys.setprofile(None)
    return calls


def measure(calls: List[Tuple[str, str]]) -> Dict[str, object]:
    files_in_order: List[str] = []
    switches = back = 0
    left = set()
    for file, _ in calls:
        if files_in_order and file != files_in_order[-1]:
            switches += 1
            left.add(files_in_order[-1])
            if file in left:
                back += 1
        files_in_order.append(file)
    return {"functions": len(set(calls)), "calls": len(calls), "files": len(set(f for f, _ in calls)),
            "switches": switches, "switches_back": back, "files_list": sorted(set(f for f, _ in calls))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", default="deit")
    parser.add_argument("--data", default="", help="an image folder (default: the digits, built in a temp folder)")
    parser.add_argument("--out", default="", help="write the measurement and the call list here (JSON)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data:
            from ToE.common.digits import build_digits

            data = os.path.join(tmp, "digits")
            build_digits(data)
        calls = trace(args.trainer, data)
    result = measure(calls)
    print(f"{args.trainer}: {result['functions']} project functions in {result['files']} files, "
          f"{result['switches']} file switches ({result['switches_back']} back to a file already left) "
          "from main to the first optimizer step")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({**result, "trainer": args.trainer, "calls": calls}, handle, indent=1)


if __name__ == "__main__":
    main()
