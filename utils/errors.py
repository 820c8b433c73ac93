"""User-facing errors: reported as one line, never as a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable


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

    return wrapper
