"""User-facing errors: one line, exit code 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

__all__ = ["cli_main", "EXIT_USER_ERROR", "F", "UserError"]

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., int])


class UserError(Exception):
    """Bad input from the user (file, key, value). Reported as one line, exit code 2, no traceback."""


def cli_main(func: F) -> F:
    """Wrap a CLI entry point: UserError -> one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper  # type: ignore[return-value]
