"""torchrun that ends with the trainer's own exit code when the trainer has said why it stopped.

    python ToE/common/torchrun.py [torchrun's flags] MAIN_PY [main.py flags]

torchrun (``torch.distributed.run``) reports any non-zero exit of a process as a crash: a
ChildFailedError traceback and exit 1. A clean preemption, where every process wrote its part of
the checkpoint and exits 3 (``preemption.EXIT_PREEMPTED``) after rank 0's one-line ``stopped:``,
then reads as a failure, and a scheduler script cannot tell it from one; a user error met after
the start (a full disk: exit 2 after rank 0's ``error:`` line, the others losing their connection,
exit 1) gets the same report under its one line. This runs torchrun in this process with the same
flags and, when the processes ended that way, exits 3 (or 2) without torchrun's report. Any other
failure keeps torchrun's report and exit code. The run scripts (``ToE/common/launch.sh``) and
``run/slurm.sh`` start torchrun through it.

It also forwards SIGUSR1 (the stop signal a scheduler sends before the time limit) to the training
processes: torchrun starts each in a session of its own and does not pass the signal on, so where
only torchrun's process group is signalled (Slurm's pgid process tracking, ``kill -USR1`` of the
launcher) they would not see it. Where they are signalled directly as well (cgroup tracking), the
second signal changes nothing: a stop is a flag that is set once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Iterable, List, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ToE.common.preemption import EXIT_PREEMPTED  # noqa: E402

EXIT_USER_ERROR = 2  # errors.run_main: one line "error: ...", told by the process that met it
# what torchrun sends the processes still running once one has ended (they are stopped, not failed)
CLOSED = (-signal.SIGTERM, -signal.SIGKILL)
# the exits that may accompany a told one: the same, or a process that lost its peers (exit 1) or was closed
ACCOMPANY = {EXIT_PREEMPTED: {EXIT_PREEMPTED, *CLOSED}, EXIT_USER_ERROR: {EXIT_USER_ERROR, 1, *CLOSED}}
# torchrun's own log lines about such an ending (held back until the outcome is known)
AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"
HELD_MESSAGES = ("failed (exitcode: %s)", "Sending process %s closing signal")


def told_exit(exitcodes: Iterable[int]) -> Optional[int]:
    """The exit code the job ends with when its processes' ``exitcodes`` (every failed one) are a
    stop the trainer has told in one line: 3 (preempted) or 2 (user error) with only the exits that
    go with it; None for anything else (torchrun's report stays)."""
    codes = set(exitcodes)
    for code, accompanying in ACCOMPANY.items():
        if code in codes and codes <= accompanying:
            return code
    return None


class _HoldBack(logging.Filter):
    """Holds torchrun's "failed (exitcode ...)" and "closing signal" records back, to drop them after
    a told stop or to let them through after anything else."""

    def __init__(self) -> None:
        super().__init__()
        self.held: List[logging.LogRecord] = []
        self.passing = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.passing or not any(str(record.msg).startswith(text) for text in HELD_MESSAGES):
            return True
        self.held.append(record)
        return False

    def release(self, logger: logging.Logger) -> None:
        self.passing = True
        for record in self.held:
            logger.handle(record)
        self.held.clear()


def children(parent: int) -> List[int]:
    """The processes whose parent is ``parent`` (read from /proc; none where there is no /proc)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:  # ended meanwhile
            continue
        # "pid (command) state ppid ...": the command may hold spaces and parentheses
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(parent):
            found.append(int(entry))
    return found


def forward_to_workers(signum: int, frame=None) -> None:
    """Send ``signum`` to the process group of each process this one started (torchrun's workers,
    each the leader of its own session, with their DataLoader workers); a child in this process's
    own group gets it alone (the group would include this process)."""
    own = os.getpgrp()
    for pid in children(os.getpid()):
        try:
            group = os.getpgid(pid)
            if group != own:
                os.killpg(group, signum)
            else:
                os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):  # ended meanwhile
            pass


def main(argv: Optional[List[str]] = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, forward_to_workers)
    logger = logging.getLogger(AGENT_LOGGER)
    hold = _HoldBack()
    logger.addFilter(hold)
    try:
        torchrun(argv)
    except ChildFailedError as error:
        code = told_exit(failure.exitcode for failure in error.failures.values())
        if code is not None:
            hold.held.clear()  # the trainer has told it in one line
            sys.exit(code)
        raise
    finally:
        hold.release(logger)
        logger.removeFilter(hold)


if __name__ == "__main__":
    main()
