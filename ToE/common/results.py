"""The results toolkit: one reader of a run's records, one set of statistics over seeds, and one
launcher of repeated runs. The run summary (``ToE.common.summary``) and every bench (``bench/``)
use these, and nothing else reads a run folder or pairs runs by seed.

- A run folder: ``log.txt`` (one JSON line per finished epoch) and ``args.yaml`` (the resolved
  flags), read by ``read_log`` / ``read_args``; a missing, empty or damaged file is one
  ``UserError`` line. ``run_numbers`` condenses a finished run to what a bench tabulates.
- Statistics: ``median_steady`` (an epoch-time median without the start-up epoch), ``mean_std``,
  ``mean_se``, ``paired_by_seed`` (differences or ratios of two configurations, seed by seed),
  ``paired_ratios`` (the same within timing rounds), ``robust_seconds`` and ``slow_epochs``.
- Repeated runs: ``run_repeated`` trains every (configuration, seed), seed-major with the
  configuration order rotated from seed to seed (``rotated``), keeps each run as one JSON line of a
  ``.jsonl`` file as soon as it finishes, and skips the runs that file already holds (resumable).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from ToE.common.errors import UserError

__all__ = ["RECORD_KEYS", "read_log", "read_args", "run_numbers", "median_steady", "mean_std", "mean_se",
           "paired_by_seed", "paired_ratios", "robust_seconds", "slow_epochs", "rotated", "read_runs",
           "append_run", "run_repeated"]

# what every ToE trainer writes for each epoch (YOLOS adds patch_tokens and AP in place of top-1)
RECORD_KEYS = ("epoch", "stage", "kept_tokens", "epoch_seconds", "test_acc1")


# ---------------------------------------------------------------------------------------------
# one run's records
# ---------------------------------------------------------------------------------------------
def _check_folder(output_dir: str) -> None:
    if not os.path.isdir(output_dir):
        raise UserError(f"{output_dir} does not exist. Pass the --output_dir of a run")


def read_log(output_dir: str, keys: Sequence[str] = RECORD_KEYS) -> List[Dict]:
    """The epoch records of ``output_dir/log.txt`` (each with ``keys``); a missing, empty or damaged
    file is a UserError naming the file or the line."""
    _check_folder(output_dir)
    path = os.path.join(output_dir, "log.txt")
    if not os.path.isfile(path):
        raise UserError(f"no log.txt in {output_dir}: no epoch has finished there. Pass the --output_dir of a run, "
                        "or run the summary once an epoch has finished")
    records = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {number} is damaged (not JSON). Delete that line, or resume the run "
                                "so it rewrites its log") from None
            missing = [key for key in keys if not isinstance(record, dict) or key not in record]
            if missing:
                raise UserError(f"{path} line {number} lacks {', '.join(missing)}: not a log written by a ToE "
                                "trainer. Pass the --output_dir of a ToE run")
            records.append(record)
    if not records:
        raise UserError(f"{path} holds no finished epoch yet. Run the summary once an epoch has finished")
    return records


def read_args(output_dir: str, keys: Sequence[str] = ("model", "input_size")) -> Dict:
    """The run's resolved arguments (``args.yaml``, holding ``keys``); otherwise one UserError line."""
    _check_folder(output_dir)
    path = os.path.join(output_dir, "args.yaml")
    if not os.path.isfile(path):
        raise UserError(f"no args.yaml in {output_dir}: not the output folder of a ToE run. Pass a run's --output_dir")
    try:
        with open(path) as handle:
            args = yaml.safe_load(handle)
    except yaml.YAMLError:
        raise UserError(f"{path} is damaged (not YAML). Restore it from the checkpoint's 'args'") from None
    if not isinstance(args, dict) or any(key not in args for key in keys):
        raise UserError(f"{path} does not hold this kind of run's arguments (no {' or '.join(keys)}). Pass the "
                        "--output_dir of a run of this trainer")
    return args


def run_numbers(output_dir: str, epochs: Optional[int] = None) -> Optional[Dict[str, object]]:
    """A run's numbers for a bench table: the last epoch's metrics (top-1 and EMA top-1, or AP,
    AP50, AP75 for detection), the best top-1, the training seconds (evaluation excluded: the sum,
    the per-stage-median total ``robust_seconds`` and the ``slow_epochs``) and the per-epoch series.
    None when the folder holds no log or, with ``epochs``, fewer epochs than that (unfinished)."""
    if not os.path.isfile(os.path.join(output_dir, "log.txt")):
        return None
    records = read_log(output_dir, ("epoch", "epoch_seconds"))
    if epochs is not None and len(records) != epochs:
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
def median_steady(values: Sequence[float]) -> float:
    """The median epoch time without the first epoch (start-up costs) where more than two remain."""
    values = list(values)
    return statistics.median(values[1:] if len(values) > 2 else values)


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
    """
    runs = [run for run in read_runs(runs_path) if keep(run)]
    done = {(run["config"], run["seed"]) for run in runs}
    for index, seed in enumerate(seeds):
        for config in rotated(list(configs), index):
            if (config, seed) in done:
                continue
            log(f"[bench] {config} seed {seed}")
            run = run_one(config, seed)
            runs.append(run)
            append_run(runs_path, run)
    return runs
