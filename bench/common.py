"""What the benches share: what every bench records beside its numbers, how it starts a trainer on a
recipe file, a finished run's numbers, the statistics over seeds and the launcher of repeated runs.

- The machine and the code: ``describe_machine``, ``git_commit`` (``archive_commit`` in a tree that
  ``git archive`` exported).
- Recipes and trainers: ``demo_config``, ``recipe``, ``trainer_command`` (a recipe file plus flags),
  ``run_trainer``.
- A run folder: ``run_numbers`` condenses a finished run (its ``log.txt``, read by
  ``ToE.common.log.read_log``) to what a bench tabulates.
- Statistics: ``mean_std``, ``mean_se``, ``paired_by_seed`` (differences or ratios of two
  configurations, seed by seed), ``paired_ratios`` (the same within timing rounds), ``robust_seconds``
  and ``slow_epochs``.
- Repeated runs: ``run_repeated`` trains every (configuration, seed), seed-major with the
  configuration order rotated from seed to seed (``rotated``), keeps each run as one JSON line of a
  ``.jsonl`` file as soon as it finishes, and skips the runs that file already holds (resumable).
  ``StopRequest``: SIGTERM (``kill PID``) stops a bench between runs: the runs in flight finish and
  are kept, no other starts, and the bench exits 3 like a preempted trainer.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ToE.common.config import config_path, load_config, recipe_command
from ToE.common.log import read_log

__all__ = ["describe_machine", "git_commit", "archive_commit", "demo_config", "recipe", "trainer_command",
           "run_trainer", "run_numbers", "mean_std", "mean_se", "paired_by_seed", "paired_ratios", "robust_seconds",
           "slow_epochs", "rotated", "read_runs", "append_run", "run_repeated", "StopRequest"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# "$Format:%h$" in the repository; ``git archive`` writes the commit in its place (export-subst in
# .gitattributes), so a bench run from an exported tree (no .git) still records its commit.
ARCHIVE_COMMIT = os.path.join(ROOT, "bench", "ARCHIVE_COMMIT")


def load_average() -> Optional[List[float]]:
    """The machine's load average (1, 5, 15 min), rounded; None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe_machine() -> Dict[str, object]:
    """CPU model, core count, memory, torch version and threads: what a table's reader needs."""
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu_model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                             cpu_model)
    except OSError:
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as handle:
            memory_gib = round(int(handle.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    info = {"cpu_model": cpu_model, "cpu_count": os.cpu_count(), "memory_gib": memory_gib,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def git_commit() -> Optional[str]:
    """The checked-out commit (short hash, "+changes" if the tree differs from it); in a tree that
    ``git archive`` exported, the archived commit ("<hash> (git archive)"); else None."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return archive_commit()
    return commit + ("+changes" if dirty else "")


def archive_commit(path: str = ARCHIVE_COMMIT) -> Optional[str]:
    """The commit ``git archive`` wrote into ``path`` ("<hash> (git archive)"); None where the file
    is missing or still holds its placeholder (a checkout, not an export)."""
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return None if not text or "$Format" in text else f"{text} (git archive)"


def demo_config(trainer: str) -> str:
    """The demo recipe of ``trainer`` (deit, lvvit, et, yolos): ``ToE/<trainer>/configs/demo.yaml``."""
    return config_path(trainer, "demo")


def recipe(trainer: str, config: Optional[str] = None) -> Dict[str, object]:
    """The values of a recipe file (default: the trainer's demo), keyed by flag destination."""
    return load_config(config or demo_config(trainer))


def trainer_command(trainer: str, config: Optional[str], *overrides: object) -> List[str]:
    """``python ToE/<trainer>/main.py --config CONFIG OVERRIDES...``: a variant of a recipe is the
    recipe file plus flags on the command line, so no bench holds a copy of a recipe's values."""
    return recipe_command(trainer, "demo", *map(str, overrides), python=sys.executable,
                          config=config or demo_config(trainer))


def run_trainer(command: Sequence[str], out_dir: str, threads: Optional[int] = None) -> float:
    """Run a trainer command to its end (its output kept in ``out_dir/stdout.txt``); the wall seconds.
    A failure raises RuntimeError with the end of the trainer's output."""
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    completed = subprocess.run(list(command), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    wall = time.perf_counter() - start
    with open(os.path.join(out_dir, "stdout.txt"), "w") as handle:
        handle.write(completed.stdout)
    if completed.returncode != 0:
        raise RuntimeError(f"trainer failed (exit {completed.returncode}): {' '.join(command)}\n"
                           + completed.stdout[-3000:])
    return wall


# ---------------------------------------------------------------------------------------------
# a finished run's numbers
# ---------------------------------------------------------------------------------------------
def run_numbers(output_dir: str, epochs: Optional[int] = None) -> Optional[Dict[str, object]]:
    """A run's numbers for a bench table: the last epoch's metrics (top-1 and EMA top-1, or AP,
    AP50, AP75 for detection), the best top-1, the training seconds (evaluation excluded: the sum,
    the per-stage-median total ``robust_seconds`` and the ``slow_epochs``) and the per-epoch series.
    None when the folder holds no log or, with ``epochs``, fewer epochs than that (unfinished)."""
    records = read_log(output_dir, ("epoch", "epoch_seconds"), missing_ok=True)
    if not records or epochs is not None and len(records) != epochs:
        return None
    last = records[-1]
    seconds = [float(r["epoch_seconds"]) for r in records]
    stages = [r.get("stage", 0) for r in records]
    numbers: Dict[str, object] = {"epochs_logged": len(records), "train_seconds": sum(seconds),
                                  "robust_train_seconds": robust_seconds(seconds, stages),
                                  "slow_epochs": slow_epochs(seconds, stages), "epoch_seconds": seconds}
    if "test_acc1" in last:
        numbers.update(acc1=float(last["test_acc1"]), ema_acc1=last.get("ema_acc1"),
                       best_acc1=max(float(r["test_acc1"]) for r in records),
                       acc1_per_epoch=[float(r["test_acc1"]) for r in records])
    for key in ("test_AP", "test_AP50", "test_AP75"):
        if key in last:
            numbers[key[len("test_"):]] = float(last[key])
    return numbers


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def mean_std(values: Iterable[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_se(values: Iterable[float]) -> Tuple[float, Optional[float]]:
    """Mean and standard error (sample std / sqrt(n)); the error is None for fewer than 2 values."""
    values = list(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return statistics.fmean(values), se


def paired_by_seed(runs: Sequence[Dict[str, object]], config: str, reference: str,
                   combine: Callable[[Dict[str, object], Dict[str, object]], float]) -> List[Tuple[int, float]]:
    """(seed, combine(run of ``config``, run of ``reference`` with that seed)) for each seed both have,
    in seed order: a difference (``lambda a, b: a["acc1"] - b["acc1"]``) or a ratio."""
    references = {r["seed"]: r for r in runs if r["config"] == reference}
    return sorted((r["seed"], combine(r, references[r["seed"]]))
                  for r in runs if r["config"] == config and r["seed"] in references)


def paired_ratios(reference: Sequence[float], other: Sequence[float]) -> List[float]:
    """reference[i] / other[i] for every round i: the speedup of ``other`` within each timing round."""
    return [r / o for r, o in zip(reference, other)]


def slow_epochs(epoch_seconds: Sequence[float], stages: Sequence[int], factor: float = 1.25) -> int:
    """Epochs that took over ``factor`` times their stage's median epoch (the same work, slower)."""
    medians = {stage: statistics.median([t for t, s in zip(epoch_seconds, stages) if s == stage])
               for stage in set(stages)}
    return sum(t > factor * medians[s] for t, s in zip(epoch_seconds, stages))


def robust_seconds(epoch_seconds: Sequence[float], stages: Sequence[int]) -> float:
    """Training seconds with each epoch counted at its stage's median epoch time: every epoch of a
    stage does the same work, so a few epochs slowed by the machine do not move the total."""
    total = 0.0
    for stage in sorted(set(stages)):
        mine = [t for t, s in zip(epoch_seconds, stages) if s == stage]
        total += statistics.median(mine) * len(mine)
    return total


# ---------------------------------------------------------------------------------------------
# repeated runs
# ---------------------------------------------------------------------------------------------
def rotated(items: Sequence[str], start: int) -> List[str]:
    """``items`` starting at index ``start`` (mod their number): round r of a bench runs rotated(configs, r)."""
    start %= len(items)
    return list(items[start:]) + list(items[:start])


def read_runs(path: str) -> List[Dict[str, object]]:
    """The runs kept in a ``.jsonl`` file (lines with a "config"; a header line without is skipped)."""
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [row for row in rows if isinstance(row, dict) and "config" in row]


def append_run(path: str, run: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(run) + "\n")


class StopRequest:
    """Whether a bench should start no more runs: set by SIGTERM while it is in use as a context
    manager (main thread only, as Python requires), or by the caller (e.g. when a run fails).

    SIGTERM is the way to stop a bench started in the background, which ignores Ctrl-C (a shell
    starts ``cmd &`` with SIGINT ignored): ``kill PID`` lets the runs in flight finish and be kept,
    starts no other, and ``finish(left)`` then raises ``Preempted`` (exit 3, as a preempted trainer)
    with the command's rerun in mind: the same command trains only what is missing."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.event = threading.Event()
        self.signal: Optional[int] = None
        self._previous = None

    def is_set(self) -> bool:
        return self.event.is_set()

    def set(self) -> None:
        self.event.set()

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.log(f"[bench] {signal.Signals(signum).name}: the runs in flight finish and are kept, no other starts")
        self.signal = signum
        self.event.set()

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def finish(self, left: int) -> None:
        """Raise ``Preempted`` when a signal stopped the bench with ``left`` runs not started."""
        if self.signal is not None and left:
            from ToE.common.errors import Preempted

            raise Preempted(f"{signal.Signals(self.signal).name} received: {left} runs not started; run the same "
                            f"command again to train them (the finished runs are kept)")


def run_repeated(configs: Sequence[str], seeds: Sequence[int], run_one: Callable[[str, int], Dict[str, object]],
                 runs_path: str, keep: Callable[[Dict[str, object]], bool] = lambda run: True,
                 log: Callable[[str], None] = print) -> List[Dict[str, object]]:
    """Train every configuration with every seed through ``run_one(config, seed)`` (a dict with at
    least "config" and "seed"), and return all runs in the order they ran.

    Seed-major (every configuration with the first seed, then with the next, ...) with the order of
    the configurations rotated from seed to seed (the i-th seed starts at configuration i mod n),
    so drift of the machine and the place in the order hit every configuration alike. Each run is
    appended to ``runs_path`` as one JSON line the moment it finishes; the runs already there for
    which ``keep(run)`` holds count as done and are not trained again (an interrupted bench resumes).
    SIGTERM lets the run in progress finish, then raises ``Preempted`` (``StopRequest``).
    """
    runs = [run for run in read_runs(runs_path) if keep(run)]
    done = {(run["config"], run["seed"]) for run in runs}
    jobs = [(config, seed) for index, seed in enumerate(seeds) for config in rotated(list(configs), index)
            if (config, seed) not in done]
    with StopRequest(log) as stop:
        for number, (config, seed) in enumerate(jobs):
            if stop.is_set():
                stop.finish(len(jobs) - number)
            log(f"[bench] {config} seed {seed}")
            run = run_one(config, seed)
            runs.append(run)
            append_run(runs_path, run)
    return runs
