"""A run folder read back for the run summary (``ToE.common.summary``) and the tools beside the
trainers: the resolved flags (``args.yaml``, ``read_args``), the keys every epoch record holds
(``RECORD_KEYS``; the records themselves are read by ``ToE.common.log.read_log``, beside their
writer) and the epoch-time median the summary compares stages with (``median_steady``). A missing,
empty or damaged file is one ``UserError`` line.

What only the benches use (a run's numbers for a table, statistics over seeds, repeated runs) is
``bench/common.py``.
"""

from __future__ import annotations

import os
import statistics
from typing import Dict, Sequence

import yaml

from ToE.common.errors import UserError

__all__ = ["RECORD_KEYS", "read_args", "median_steady"]

# what every ToE trainer writes for each epoch (YOLOS adds patch_tokens and AP in place of top-1)
RECORD_KEYS = ("epoch", "stage", "kept_tokens", "epoch_seconds", "test_acc1")


def _check_folder(output_dir: str) -> None:
    if not os.path.isdir(output_dir):
        raise UserError(f"{output_dir} does not exist. Pass the --output_dir of a run")


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


def median_steady(values: Sequence[float]) -> float:
    """The median epoch time without the first epoch (start-up costs) where more than two remain."""
    values = list(values)
    return statistics.median(values[1:] if len(values) > 2 else values)
