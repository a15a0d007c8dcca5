"""Stopping a run cleanly before a scheduler kills it: on SIGTERM or SIGUSR1 (what Slurm and most
schedulers send before a kill) or before a ``--time-limit``, the training loop ends at the next
check (every ``--log-interval`` steps), writes a checkpoint that records the position inside the
epoch, and exits; ``--auto-resume`` (or ``--resume``) continues with the next batch.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from typing import Dict, Iterator, List, Optional

EXIT_PREEMPTED = 3  # stopped early with a checkpoint: run the same command with --auto-resume to continue
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopSignal(BaseException):
    """A stop signal while the run sets up (data, labels, model, resume file): there is no step to
    finish and nothing new to save, so the run ends at once. A BaseException, like KeyboardInterrupt,
    so that a loader's ``except Exception`` does not take it for a bad file."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``3600``, ``90m``, ``2h``, ``1.5h``, ``HH:MM:SS``, ``MM:SS`` or Slurm's ``D-HH:MM:SS``."""
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text)
    if match:
        return float(match.group(1)) * units[match.group(2) or "s"]
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if match:
        days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
        return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    raise ValueError(f"{text!r} is not a duration (e.g. 3600, 90m, 4h, 3:50:00, 1-00:00:00)")


class StopWatch:
    """Whether training should stop now: a stop signal arrived, or the time limit is near.

    Near means: the time left is less than twice the longest gap seen between two checks plus
    twice the longest checkpoint write, so the stop lands before the limit whatever the step time.
    """

    def __init__(self, time_limit: Optional[float] = None) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + time_limit if time_limit else None
        self.signal: Optional[int] = None
        self.longest_gap = 0.0
        self.longest_save = 0.0
        self._last_check: Optional[float] = None
        self._previous: Dict[int, object] = {}

    def install(self) -> None:
        """Catch the stop signals (main thread only, as Python requires)."""
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    @staticmethod
    @contextlib.contextmanager
    def at_once() -> Iterator[None]:
        """While the run sets up, a stop signal raises StopSignal at once (the trainer says in one
        line what the output folder holds, and exits 3) instead of killing the process without a
        word; the previous handlers come back after. A process forked meanwhile (a DataLoader
        worker) meets the signal as it would have without this handler."""
        owner = os.getpid()
        raised = []

        def handle(signum, frame) -> None:
            if os.getpid() != owner:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            if raised:  # the same stop again (a launcher that forwards it, and the scheduler directly): told once
                return
            raised.append(signum)
            raise StopSignal(signum)

        previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def saved(self, seconds: float) -> None:
        """Record how long a checkpoint write took."""
        self.longest_save = max(self.longest_save, seconds)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if self._last_check is not None:
            self.longest_gap = max(self.longest_gap, now - self._last_check)
        self._last_check = now
        if self.signal is not None:
            return True
        if self.deadline is None:
            return False
        return now + 2.0 * (self.longest_gap + self.longest_save) >= self.deadline

    def reason(self) -> str:
        """Why this process stops (asked after ``should_stop`` said so)."""
        if self.signal is not None:
            return f"{signal.Signals(self.signal).name} received"
        return TIME_LIMIT

    def reasons(self) -> List[float]:
        """This process's stop reasons as a vote, one entry per ``REASONS``: summed over the processes, it
        tells every process why the run stops, whichever process was signalled (``agreed_reason``)."""
        mine = self.reason() if self.should_stop() else None
        return [1.0 if reason == mine else 0.0 for reason in REASONS]


TIME_LIMIT = "the --time-limit is near"
REASONS = tuple(f"{signal.Signals(signum).name} received" for signum in STOP_SIGNALS) + (TIME_LIMIT,)


def agreed_reason(votes) -> Optional[str]:
    """The stop reason of the summed ``StopWatch.reasons`` votes of all processes (the first of ``REASONS``
    any process gave), or None when none stops."""
    return next((reason for reason, count in zip(REASONS, votes) if count > 0), None)
