"""Run outputs a user can plot: JSON lines per epoch, TensorBoard events, the resolved arguments."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional

import yaml

from .checkpoint import replacing, writing
from .errors import UserError


def check_output_dir(path: str) -> None:
    """Make sure the run can write to ``path`` ("" = no outputs); a user error otherwise.

    Nothing is created here (the run creates the folder when it starts writing, so a run refused
    later, for a bad flag or bad data, leaves no empty folder behind): an existing folder gets a
    probe file, a new one needs a writable nearest existing parent.
    """
    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"output folder {path} is a file. Pass an --output_dir that is a folder")
    try:
        if os.path.isdir(path):
            probe = os.path.join(path, f".write_test.{os.getpid()}")  # one per process: they check at once
            with open(probe, "w"):
                pass
            os.remove(probe)
            return
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
            raise PermissionError(13, "Permission denied")
    except OSError as error:
        raise UserError(f"cannot write to output folder {path} ({error.strerror}). "
                        "Pass an --output_dir you can write to") from None


RUN_FILES = ("checkpoint.pth", "best_checkpoint.pth", "log.txt")  # what says a folder holds a run
RUN_OUTPUTS = RUN_FILES + ("args.yaml", "tensorboard")


def existing_run(path: str) -> List[str]:
    """The files of an earlier run found in ``path`` (empty when there is none)."""
    if not path or not os.path.isdir(path):
        return []
    return [name for name in RUN_FILES if os.path.exists(os.path.join(path, name))]


def check_no_other_run(path: str, resume: str, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds another run's checkpoint or log.

    Allowed: continuing that run (``--resume`` one of its checkpoints) and ``--overwrite``.
    """
    found = existing_run(path)
    if not found or overwrite:
        return
    if resume and os.path.realpath(resume) in {os.path.realpath(os.path.join(path, name)) for name in found}:
        return
    raise UserError(f"output folder {path} holds another run ({', '.join(found)}). Continue it with --resume "
                    f"{os.path.join(path, 'checkpoint.pth')}, start over with --overwrite (deletes it), or pass "
                    "another --output_dir")


def remove_run_outputs(path: str) -> None:
    """Delete a run's checkpoints, log, arguments and TensorBoard events (``--overwrite``)."""
    for name in RUN_OUTPUTS:
        target = os.path.join(path, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)


class RunLog:
    """Appends one JSON line per epoch to ``log.txt`` and mirrors numbers to TensorBoard.

    ``first_epoch``: the epoch this process starts at. A resumed run first drops the records of
    that epoch and later ones from ``log.txt`` and TensorBoard: a kill between the log write and
    the checkpoint write leaves a logged epoch that the checkpoint does not hold, and training it
    again must not log it twice.
    """

    def __init__(self, output_dir: str, enabled: bool = True, first_epoch: int = 0) -> None:
        self.enabled = enabled and bool(output_dir)
        self.path = os.path.join(output_dir, "log.txt") if output_dir else ""
        self.writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            if first_epoch > 0:
                self._truncate(first_epoch)
            # purge_step: TensorBoard hides events of steps >= first_epoch written before a kill
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"),
                                        purge_step=first_epoch if first_epoch > 0 else None)

    def _truncate(self, first_epoch: int) -> None:
        if not os.path.isfile(self.path):
            return
        with open(self.path) as handle:
            lines = [line for line in handle if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("epoch", -1) < first_epoch:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:  # a line cut by a kill: drop it
                continue
        if len(kept) != len(lines):
            with replacing(self.path) as tmp, open(tmp, "w") as handle:
                handle.writelines(kept)

    def write(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        with writing(self.path), open(self.path, "a") as handle:
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
    with replacing(os.path.join(output_dir, "args.yaml")) as tmp, open(tmp, "w") as handle:
        yaml.safe_dump(args, handle, sort_keys=False)
