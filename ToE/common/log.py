"""Run outputs a user can plot: JSON lines per epoch, TensorBoard events, the resolved arguments."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Sequence

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
RUN_OUTPUTS = RUN_FILES + ("args.yaml", "tensorboard", "log_steps.txt")


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
    history = [name for name in os.listdir(path) if re.fullmatch(r"checkpoint-\d+\.pth", name)]  # --checkpoint-hist
    for name in (*RUN_OUTPUTS, *history):
        target = os.path.join(path, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)


class RunLog:
    """Appends one JSON line per epoch to ``log.txt`` and one per ``--log-interval`` steps to
    ``log_steps.txt`` (loss, lr, gradient norm, images/s, as timm logs them), and mirrors the
    numbers to TensorBoard (epochs under ``tensorboard/``, steps under ``tensorboard/steps`` with the
    images trained so far as the x axis).

    ``first_epoch``/``first_step``: where this process starts (a mid-epoch resume: the step it
    stopped after). A resumed run first drops the records from there on from both files and from
    TensorBoard: a kill between the log write and the checkpoint write leaves records the checkpoint
    does not hold, and training them again must not log them twice.
    """

    def __init__(self, output_dir: str, enabled: bool = True, first_epoch: int = 0, first_step: int = 0,
                 first_image: int = 0) -> None:
        self.enabled = enabled and bool(output_dir)
        self.path = os.path.join(output_dir, "log.txt") if output_dir else ""
        self.steps_path = os.path.join(output_dir, "log_steps.txt") if output_dir else ""
        self.writer = self.step_writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            if first_epoch > 0 or first_step > 0:
                self._truncate(self.path, lambda record: record.get("epoch", -1) < first_epoch)
                self._truncate(self.steps_path, lambda record: (record.get("epoch", -1), record.get("step", 0))
                               <= (first_epoch, first_step))
            # purge_step: TensorBoard hides events of steps >= first_epoch written before a kill
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"),
                                        purge_step=first_epoch if first_epoch > 0 else None)
            self.step_writer = SummaryWriter(os.path.join(output_dir, "tensorboard", "steps"),
                                             purge_step=first_image + 1 if first_image > 0 else None)

    @staticmethod
    def _truncate(path: str, keep) -> None:
        if not os.path.isfile(path):
            return
        with open(path) as handle:
            lines = [line for line in handle if line.strip()]
        kept = []
        for line in lines:
            try:
                if keep(json.loads(line)):
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:  # a line cut by a kill: drop it
                continue
        if len(kept) != len(lines):
            with replacing(path) as tmp, open(tmp, "w") as handle:
                handle.writelines(kept)

    def write(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        """One epoch's record (``step``: its x in TensorBoard, the epoch by default)."""
        self._append(self.path, self.writer, record, step if step is not None else record.get("epoch", 0))

    def write_step(self, record: Dict[str, Any], image: int) -> None:
        """One logged step's record; ``image``: the images trained so far (the x in TensorBoard)."""
        self._append(self.steps_path, self.step_writer, record, image)

    def _append(self, path: str, writer, record: Dict[str, Any], x: int) -> None:
        if not self.enabled:
            return
        with writing(path), open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step"):
                    writer.add_scalar(key, value, x)
            writer.flush()

    def close(self) -> None:
        for writer in (self.writer, self.step_writer):
            if writer is not None:
                writer.close()


# The epoch's console line, built from its record: these keys in this order and form; every other number
# of the record (a trainer's own metric) follows by name, so a new metric reaches the console too.
CONSOLE_FORMAT = (
    ("stage", "stage {}"), ("kept_tokens", None), ("train_loss", "loss {:.4f}"), ("epoch_seconds", "{:.1f} s"),
)
CONSOLE_HIDDEN = {"epoch", "patch_tokens", "lr", "updates", "train_steps", "train_images", "test_images",
                  "test_loss", "test_acc5", "segment", "resolution", "magnitude", "aa", "batch", "accum",
                  "global_batch"}


def console_line(record: Dict[str, Any], evaluation: str, hidden=frozenset()) -> str:
    """``epoch E: stage S, K of P patch tokens, loss L, T s, <evaluation>, <other metrics>``.

    ``evaluation``: the task's words for its evaluation (``top-1 97.31 %``); ``hidden``: further
    keys the task already said in it."""
    parts = []
    for key, form in CONSOLE_FORMAT:
        if key == "kept_tokens" and "kept_tokens" in record:
            parts.append(f"{record['kept_tokens']:g} of {record['patch_tokens']:g} patch tokens")
        elif key in record and form is not None:
            parts.append(form.format(record[key]))
    parts.append(evaluation)
    shown = {key for key, _ in CONSOLE_FORMAT} | CONSOLE_HIDDEN | set(hidden)
    for key, value in record.items():
        if key in shown or key.startswith("best_") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return f"epoch {record['epoch']}: " + ", ".join(parts)


def save_args(args: Dict[str, Any], output_dir: str) -> None:
    """Write the resolved arguments next to the outputs (args.yaml), as timm does."""
    with replacing(os.path.join(output_dir, "args.yaml")) as tmp, open(tmp, "w") as handle:
        yaml.safe_dump(args, handle, sort_keys=False)


def read_log(output_dir: str, keys: Sequence[str] = (), missing_ok: bool = False) -> List[Dict[str, Any]]:
    """The epoch records of ``output_dir/log.txt`` (what ``RunLog`` writes: one JSON line each), each
    holding ``keys``: the one reader of a run's log (the summary, the benches, the GPU check).

    A missing folder or log, a log without a record, a damaged line (not JSON) or a record without
    ``keys`` is a UserError naming the file (and the line) and the fix. ``missing_ok``: a folder
    without a log, or a log without a record, gives [] (a run that has not finished an epoch)."""
    path = os.path.join(output_dir, "log.txt")
    if not os.path.isfile(path):
        if missing_ok:
            return []
        if not os.path.isdir(output_dir):
            raise UserError(f"{output_dir} does not exist. Pass the --output_dir of a run")
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
            if missing or not isinstance(record, dict):
                what = f"lacks {', '.join(missing)}" if missing else "is not a record (a JSON object)"
                raise UserError(f"{path} line {number} {what}: not a log written by a ToE trainer. Pass the "
                                "--output_dir of a ToE run")
            records.append(record)
    if not records and not missing_ok:
        raise UserError(f"{path} holds no finished epoch yet. Run the summary once an epoch has finished")
    return records
