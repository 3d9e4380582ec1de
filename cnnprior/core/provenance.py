"""Where a report came from: the command line, the commit and whether the tree differed from it.

Every report folder (evaluation `metrics.json`, `study.json`, `zoo.json`) records `provenance()` so that a number in
the docs can be traced to the command, config and code that made it (`docs/render.py` checks the citations).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

__all__ = ["command_line", "git_state", "provenance", "record_start"]

_ROOT = Path(__file__).resolve().parents[2]


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, as a user would type it (`python -m x ...`, `python train.py ...`)."""
    args = list(argv if argv is not None else getattr(sys, "orig_argv", sys.argv))
    if args and Path(args[0]).name.startswith("python"):
        args[0] = "python"
    return shlex.join(args)


def git_state(root: Path | None = None) -> dict[str, object]:
    """{'commit': HEAD or None, 'dirty': tracked files differ from HEAD (None without git)} of the repository."""
    root = root or _ROOT

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


_START: dict[str, object] | None = None


def record_start() -> None:
    """Note the repository's state now, when a run starts: a report written hours later records the code the run
    loaded, not edits made to the tree meanwhile."""
    global _START
    if _START is None:
        _START = git_state()


def provenance(config_file: str | None = None, argv: list[str] | None = None) -> dict[str, object]:
    """The command, the config file it read, the commit and the dirty flag (as at `record_start`, else now): the
    `provenance` entry of a report."""
    from cnnprior.core.version import __version__

    return {"command": command_line(argv), "config": config_file, **(_START or git_state()),
            "version": __version__}
