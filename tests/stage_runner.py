"""A training stage run through the Python API in a child process (alone or under torchrun), with the fault
injection and weight dump the resume tests pass as the stage's callbacks:

    python -m tests.stage_runner --config CONFIG --stage classifier|gan [--resume] [--kill-at N] [--dump DIR]

`--kill-at N` SIGKILLs this process right after global step N is trained (before that step's checkpoint);
`--dump DIR` writes each rank's final weight hashes (the stage's on_finish summary) to DIR/rank<k>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from cnnprior.cnn.train import train_cnn
from cnnprior.core.config import load_config
from cnnprior.core.errors import cli_main
from cnnprior.gan.train import run_gan_stage

__all__ = ["kill_at", "main", "write_summary"]

STAGES = {"classifier": train_cnn, "gan": run_gan_stage}


def kill_at(step: int):
    """on_step: SIGKILL this process right after global step `step` is trained."""

    def on_step(done: int) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def write_summary(folder: Path):
    """on_finish: write the rank's summary as folder/rank<rank>.json."""

    def on_finish(rank: int, summary: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{rank}.json").write_text(json.dumps(summary))

    return on_finish


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.stage_runner")
    p.add_argument("--config", required=True)
    p.add_argument("--stage", required=True, choices=tuple(STAGES))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--dump", type=Path)
    args = p.parse_args(argv)
    STAGES[args.stage](load_config(args.config), resume=args.resume,
                       on_step=kill_at(args.kill_at) if args.kill_at else None,
                       on_finish=write_summary(args.dump) if args.dump else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
