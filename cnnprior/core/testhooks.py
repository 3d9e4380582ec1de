"""Hooks that only tests switch on, by environment variable: crash a training run at a step, dump final weights.

`CNNPRIOR_TEST_KILL_AT_STEP=N` SIGKILLs the process right after global step N is trained (before that step's
checkpoint), to test resume; `CNNPRIOR_TEST_DUMP_DIR=DIR` makes each rank write its final weight hashes to
DIR/rank<k>.json, to compare runs bit for bit. Unset, both do nothing.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

__all__ = ["DUMP_ENV", "KILL_ENV", "TestHooks"]

KILL_ENV = "CNNPRIOR_TEST_KILL_AT_STEP"
DUMP_ENV = "CNNPRIOR_TEST_DUMP_DIR"


class TestHooks:
    """The hooks as the environment sets them when a run starts."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
        self.dump_dir = os.environ.get(DUMP_ENV) or ""

    def after_step(self, step: int) -> None:
        """Kill this process if the kill hook names this step."""
        if self.kill_at and step == self.kill_at:
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))

    def dump(self, rank: int, values: Callable[[], dict]) -> None:
        """Write values() as DIR/rank<rank>.json if the dump hook is set (values() is computed only then)."""
        if self.dump_dir:
            folder = Path(self.dump_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"rank{rank}.json").write_text(json.dumps(values()))
