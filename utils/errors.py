"""User-facing errors: reported as one line, never as a traceback."""
from __future__ import annotations

import errno
import functools
import sys
from typing import Callable


# A full or read-only disk is the user's to fix, not a bug: one line, whichever write hit it.
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only"}


class UserError(Exception):
    """A problem with the user's input: reported as one line, no traceback."""


def report_user_errors(main: Callable) -> Callable:
    """Wrap a script's main so a UserError prints `ERROR: ...` and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"ERROR: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            if e.errno not in DISK_ERRNOS:  # other OS errors are bugs or environment problems: keep the traceback
                raise
            where = f" writing {e.filename}" if e.filename else ""
            print(f"ERROR: {DISK_ERRNOS[e.errno]}{where}; files written before this one are kept", file=sys.stderr)
            sys.exit(2)

    return wrapper
