"""One writer per output folder: a lock that survives crashes and names the process that holds it.

Two trainings writing one ``--output_dir`` (the same job submitted twice with ``--auto-resume``, a
second terminal) would both append every epoch to ``log.txt`` and overwrite each other's
checkpoints. So the process that writes a run's outputs (rank 0 under torchrun) holds an
exclusive ``flock`` on ``OUTPUT/.toe.lock`` from before its first write (the ``--overwrite``
clearing, ``args.yaml``) to its end, and writes into the file who it is (pid, host, start time,
command line); a second process is refused in one line that names the holder.

Why ``flock`` on a file that stays: the kernel releases the lock when its process ends, however
it ends (``kill -9``, out of memory; on NFS, where Linux emulates ``flock`` with byte-range locks,
the server's lock recovery), so a lock file left behind by a dead run never blocks. Deleting the
file at the end would let a process that opened it just before lock a file nobody else sees;
it is hidden, not a run output (``--overwrite`` keeps it) and does not make a folder "hold a run".

    python -m ToE.common.lock OUTPUT [--flag DEMO_OUT]   # exit 2, refused in one line, while a run writes OUTPUT

(for scripts that must not touch a folder in use: run/demo.sh before it replaces an old demo's folder).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
from typing import Dict, Iterator, Optional

from .errors import UserError, run_main

LOCK_FILE = ".toe.lock"
_HELD: Dict[str, "OutputLock"] = {}  # folder (real path) -> the lock this process holds on it


def _writer() -> bool:
    """Whether this process writes the run's outputs: rank 0 of torchrun (RANK), or a lone process."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _holder(path: str) -> str:
    """Who holds the lock, as written into its file by the holder ("another process" if unreadable)."""
    try:
        with open(path) as handle:
            info = json.loads(handle.read() or "{}")
        command = " ".join(str(info.get("command", "?")).split())  # one line, whatever the command held
        command = command if len(command) <= 160 else command[:157] + "..."
        return f"pid {info['pid']} on {info['host']} since {info['since']} (command {command})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


class OutputLock:
    """The lock of the output folder ``folder`` ("" = no folder, or not the writing process: a no-op).

    ``claim()`` takes it when the folder exists (a run that creates its folder later claims it
    then); ``check()`` only looks (``--check-only``); ``release()`` gives it back. A process holds
    one lock per folder: a newer claim in the same process takes over an older one (a Run built in
    this process and never run to its end, as tests and tools do, still holds its lock).
    """

    def __init__(self, folder: str, flag: str = "--output_dir") -> None:
        self.folder = folder if folder and _writer() else ""
        self.flag = flag  # what the user sets to pick another folder (the refusal names it)
        self.path = os.path.join(self.folder, LOCK_FILE) if self.folder else ""
        self.fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def _key(self) -> str:
        return os.path.realpath(self.folder)

    def claim(self) -> bool:
        """Take the lock; True when taken by this call (False: already held, no folder yet, or no-op).

        A UserError names the holder when another process has it."""
        if not self.folder or self.held or not os.path.isdir(self.folder):
            return False
        earlier = _HELD.pop(self._key(), None)
        if earlier is not None:
            earlier.release()
        while True:
            fd = self._open(os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno in (errno.EAGAIN, errno.EACCES):
                    raise self._in_use() from None
                # a file system without locks (ENOLCK: NFS without a lock manager) must not stop the run
                print(f"warning: cannot lock the output folder {self.folder} ({error.strerror}): a second run "
                      "started on it would not be refused", file=sys.stderr, flush=True)
                self.folder = ""  # said once: no further tries
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was replaced between open and lock (someone deleted it): lock the new one
        since = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip()
        argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "command": shlex.join(argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        _HELD[self._key()] = self
        return True

    def check(self) -> None:
        """Refuse (UserError naming the holder) when another process holds the lock; hold nothing."""
        if not self.folder or not os.path.isfile(self.path) or self._key() in _HELD:
            return
        try:
            fd = self._open(os.O_RDWR)
        except UserError:
            fd = self._open(os.O_RDONLY)  # another user's lock file: a shared lock needs reading only
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: two checks at once do not refuse each other
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise self._in_use() from None
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def released_on_error(self) -> Iterator["OutputLock"]:
        """Give the lock back when the block fails (a run refused during its set-up): its process may
        go on (a caller in the same process, a test) and must not keep the folder in use."""
        try:
            yield self
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the lock back (the file stays; its holder's name is cleared)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        if _HELD.get(self._key()) is self:
            del _HELD[self._key()]
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing releases the flock

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags, 0o666)
        except OSError as error:
            raise UserError(f"cannot open the lock file {self.path} ({error.strerror}). Pass an --output_dir "
                            "you can write to") from None

    def _in_use(self) -> UserError:
        return UserError(f"output folder {self.folder} is in use by {_holder(self.path)}. Wait for it to finish "
                         f"or pick another {self.flag}")


def holder(folder: str) -> Optional[str]:
    """Who holds the lock of the output folder ``folder`` (as in the refusal: pid, host, start, command),
    or None when no process does: for readers such as the run summary, which must not advise resuming
    a run that is still training. Takes nothing and never raises."""
    path = os.path.join(folder, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: no run of this code has written here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        return _holder(path) if error.errno in (errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a run's --output_dir")
    parser.add_argument("--flag", default="--output_dir", help="what the refusal tells to change (default: "
                        "--output_dir; run/demo.sh: DEMO_OUT)")
    args = parser.parse_args()
    OutputLock(args.output_dir, args.flag).check()


if __name__ == "__main__":
    run_main(main)
