"""The skeleton of a training stage (the classifier's and the GAN's loops run on it): its output files, refusing
to replace them without --overwrite, resuming from the full-state `last` file, writing files from rank 0 only, and
the callbacks a caller passes in (`on_step` after every trained step, `on_finish` at the end).

A stage's run, on every rank of a torchrun job (or alone)::

    outputs = Outputs(paths, kind="GAN", state="GAN checkpoint", key="gan.out", stale=("last", "best"))
    with joined(device_name) as (ctx, device):           # core/distributed.py
        stage = Stage(outputs, ctx, device, log, checkpoint_every, on_step, on_finish)
        saved = stage.begin(resume, overwrite, load)     # None, or the checked `last` state to continue from
        stage.write_config(cfg)
        ... for each step: train it; if stage.step_done(step, mid_epoch): stage.save("last", lambda: state)
        stage.finish(lambda: weight_hashes)

`step_done` is the one call every trained step makes: what a stage counts per step belongs there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnprior.core.config import Config, save_config
from cnnprior.core.distributed import Dist, from_main
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import Log, atomic_torch_save

__all__ = ["FinishCallback", "Outputs", "Stage", "StepCallback"]

StepCallback = Callable[[int], Any]  # on_step(global step): right after the step is trained, before its checkpoint
# on_finish(rank, summary): at the end of the run, on every rank; summary = the stage's final weight hashes and step
FinishCallback = Callable[[int, dict], Any]


@dataclass(frozen=True)
class Outputs:
    """A stage's output files and the words its one-line errors use for them.

    `paths` holds at least `last` (the full state --resume continues from) and `yaml` (the resolved config);
    `kind` names the outputs ("<kind> outputs exist"), `state` the `last` file ("no <state> to resume from"), `key`
    the config key that moves them elsewhere, `restart` what --overwrite does; `stale` are the files a fresh run
    removes first, so that an old run's state is never resumed nor kept as this run's.
    """

    paths: dict[str, Path]
    kind: str
    state: str
    key: str
    restart: str = "start over"
    stale: tuple[str, ...] = ("last",)

    def prepare(self, resume: bool, overwrite: bool, load: Callable[[Path], dict]) -> dict | None:
        """Resume: `load(last)` (it loads and checks the state against the config) -> the state. Otherwise refuse
        existing outputs without `overwrite`, remove the stale ones, and return None."""
        last = self.paths["last"]
        if resume:
            if not last.is_file():
                raise UserError(f"{last}: no {self.state} to resume from; drop --resume to start a new run")
            return load(last)
        existing = [p for p in self.paths.values() if p.exists()]
        if existing and not overwrite:
            raise UserError(f"{existing[0]}: {self.kind} outputs exist; use --resume to continue, --overwrite to "
                            f"{self.restart}, or another {self.key}")
        for key in self.stale:
            self.paths[key].unlink(missing_ok=True)
        return None


class Stage:
    """One run of a training stage in this process: its place in the job, its outputs, its log (rank 0's only) and
    the caller's callbacks."""

    def __init__(self, outputs: Outputs, ctx: Dist, device: torch.device, log: Log, checkpoint_every: int = 0,
                 on_step: StepCallback | None = None, on_finish: FinishCallback | None = None) -> None:
        self.outputs, self.ctx, self.device = outputs, ctx, device
        self.log: Log = log if ctx.main else (lambda _msg: None)
        self.checkpoint_every = checkpoint_every
        self.on_step, self.on_finish = on_step, on_finish

    @property
    def paths(self) -> dict[str, Path]:
        return self.outputs.paths

    def begin(self, resume: bool, overwrite: bool, load: Callable[[Path], dict]) -> dict | None:
        """Outputs.prepare on rank 0; its result (or its UserError) on every rank."""
        return from_main(self.ctx, lambda: self.outputs.prepare(resume, overwrite, load))

    def write_config(self, cfg: Config) -> None:
        """The resolved config beside the outputs (rank 0)."""
        if self.ctx.main:
            save_config(cfg, self.paths["yaml"])

    def step_done(self, step: int, mid_epoch: bool) -> bool:
        """Called once per trained step (global count `step`): runs on_step; whether a mid-epoch `last` is due
        (every `checkpoint_every` steps; the epoch's end saves its own)."""
        if self.on_step is not None:
            self.on_step(step)
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0 and mid_epoch

    def save(self, key: str, state: Callable[[], dict]) -> None:
        """Atomically write `state()` as output `key` (rank 0 only; `state` is not called elsewhere)."""
        if self.ctx.main:
            atomic_torch_save(state(), self.paths[key])

    def finish(self, summary: Callable[[], dict]) -> None:
        """Hand on_finish this rank and `summary()` (computed only when there is an on_finish)."""
        if self.on_finish is not None:
            self.on_finish(self.ctx.rank, summary())
