"""Run outputs a user can plot: JSON lines per epoch, TensorBoard events, the resolved arguments."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import yaml

from .errors import UserError


def check_output_dir(path: str) -> None:
    """Create ``path`` and make sure files can be written there; a user error otherwise ("" = no outputs)."""
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")  # one per process: they check at once
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise UserError(f"cannot write to output folder {path} ({error.strerror}). "
                        "Pass an --output_dir you can write to") from None


class RunLog:
    """Appends one JSON line per epoch to ``log.txt`` and mirrors numbers to TensorBoard."""

    def __init__(self, output_dir: str, enabled: bool = True) -> None:
        self.enabled = enabled and bool(output_dir)
        self.path = os.path.join(output_dir, "log.txt") if output_dir else ""
        self.writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                    self.writer.add_scalar(key, value, step if step is not None else record.get("epoch", 0))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_args(args: Dict[str, Any], output_dir: str) -> None:
    """Write the resolved arguments next to the outputs (args.yaml), as timm does."""
    with open(os.path.join(output_dir, "args.yaml"), "w") as handle:
        yaml.safe_dump(args, handle, sort_keys=False)
