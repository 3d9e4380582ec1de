"""Errors of bad input (a file, a key, a value) and the command-line wrapper that reports them.

The library raises `UserError`, a `ValueError`: a Python caller catches it as one (or as `UserError`) and sees
a one-line message. Only the command-line entry points, wrapped in `cli_main`, turn it into that line on stderr
and exit code 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

__all__ = ["cli_main", "EXIT_USER_ERROR", "F", "UserError"]

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., int])


class UserError(ValueError):
    """Bad input from the user (file, key, value), described in one line. A `ValueError`, so a library caller
    needs no project type to catch it; a CLI wrapped in `cli_main` reports it as one line and exit code 2."""


def cli_main(func: F) -> F:
    """Wrap a CLI entry point: UserError -> one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper  # type: ignore[return-value]
