"""User errors: one line that names the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file...). The message says what and how."""


class TrainingStopped(Exception):
    """Training cannot go on (e.g. a non-finite loss); earlier checkpoints are kept."""


def run_main(main: Callable[[], object]) -> None:
    """Run ``main``; turn a UserError into ``error: ...`` on stderr and exit code 2.

    A UserError raised inside a DataLoader worker reaches us re-wrapped with the worker's
    traceback in its text, so only its last line (the original message) is printed.
    """
    try:
        main()
    except UserError as error:
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        message = lines[-1] if lines else "unknown error"
        message = message.removeprefix("ToE.common.errors.UserError: ").removeprefix("UserError: ")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as error:
        print(f"training stopped: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint written is intact; continue with --resume", file=sys.stderr)
        sys.exit(130)
