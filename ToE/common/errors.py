"""User errors: one line that names the problem and the fix, exit code 2, no traceback.

Under torchrun every process runs the same set-up, so an error in the flags or the data is met
by all of them at once: only rank 0 prints it. An error met by one process alone (an unreadable
image in its shard, a non-finite loss) is printed by that process; the others then lose their
connection to it in the next collective call and end quietly (exit 1), and torchrun stops the
job. So a failed job shows its cause once, not once per process.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file...). The message says what and how."""


class TrainingStopped(Exception):
    """Training cannot go on (e.g. a non-finite loss); earlier checkpoints are kept."""


class TrainingInterrupted(Exception):
    """Ctrl-C (or SIGINT) during a run; the message says what was saved and how to continue."""


class Preempted(Exception):
    """Stopped early on a scheduler's signal or a time limit, after writing a checkpoint."""


class LocalError(UserError):
    """A user error met by this process only (e.g. an unreadable image in its shard): every
    process that meets it prints it, as the others cannot know it."""


class WriteFailed(UserError):
    """A run output (checkpoint, log, args.yaml) could not be written: a full disk, a read-only or
    vanished folder. Told in one line like a user error, as the user can fix it; what was written
    before stays intact (the trainer adds what the output folder holds)."""


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective call failing because another process already died."""
    # (the process group is already destroyed by the time the error reaches run_main)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    names = {cls.__name__ for cls in type(error).__mro__}
    if "DistError" in names or "DistBackendError" in names or "DistNetworkError" in names:
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe",
                                  "timed out", "socket"))


def _one_line(error: BaseException) -> str:
    # A UserError raised inside a DataLoader worker reaches us re-wrapped with the worker's
    # traceback in its text, so only its last line (the original message) is printed.
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    message = lines[-1] if lines else "unknown error"
    for prefix in ("ToE.common.errors.UserError: ", "ToE.common.errors.LocalError: ", "UserError: ",
                   "LocalError: "):
        message = message.removeprefix(prefix)
    return message


def run_main(main: Callable[[], object]) -> None:
    """Run ``main``; turn a UserError into ``error: ...`` on stderr and exit code 2."""
    try:
        main()
    except UserError as error:
        # an error in the flags or the data layout is met by every process alike: rank 0 tells
        # it; one met inside this process's shard (a DataLoader worker's, or a LocalError) is
        # known to this process only
        local = isinstance(error, LocalError) or "DataLoader worker" in str(error)
        if local or _rank() == 0:
            print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as error:
        # every process stops together (the non-finite check is summed over them): rank 0 tells it
        if _rank() == 0:
            print(f"training stopped: {error}", file=sys.stderr)
        sys.exit(1)
    except Preempted as error:
        from ToE.common.preemption import EXIT_PREEMPTED

        if _rank() == 0:
            print(f"stopped: {error}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except TrainingInterrupted as error:
        if _rank() == 0:
            print(f"interrupted: {error}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        if _rank() == 0:
            print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - a peer's failure is quiet; anything else keeps its traceback
        if _peer_failure(error):
            # another process failed first and printed why; this one only lost its connection
            sys.exit(1)
        raise
