"""The study's runs: one GAN-stage run per (arm, seed) in `<runs>/<arm>/seed<seed>/`, trained to the arm's last
milestone with its generator saved at every milestone (gan.milestones).

A run is trained by the GAN stage itself (`train.py --stage gan` with the arm's config and overrides, plus the
run's gan.seed, gan.out, gan.milestones and gan.epochs), so it resumes as that stage does: a killed run continues
from its `last` checkpoint (--resume), exactly. `run.json` records what the run is (its resolved config); a
finished run also has `done.json` and is skipped. A run folder whose `run.json` disagrees with the study is never
replaced without --overwrite. `--jobs k` trains k runs side by side as k child processes (`python -m cnnprior
train`, one thread each); with one job the runs are trained in this process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnprior.core.budget import Budget
from cnnprior.core.config import Config, load_config, to_dict
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import Log, atomic_write_text, load_checkpoint
from cnnprior.core.stage import StepCallback
from cnnprior.gan.data import load_gan_data
from cnnprior.gan.train import run_gan_stage
from cnnprior.study.config import Arm, StudyConfig

__all__ = ["FREE_KEYS", "plan_runs", "Run", "train_runs"]

# resolved-config keys a run may change between invocations of the study without becoming another run: where it
# runs, how often it checkpoints, and how far it trains (more milestones continue a finished run)
FREE_KEYS = frozenset({"gan.device", "gan.checkpoint_every", "gan.epochs", "gan.milestones", "data.num_workers",
                       "data.root", "data.homepage", "data.download"})


@dataclass
class Run:
    """One (arm, seed) run: its folder, its `--set` overrides and its resolved config."""

    arm: Arm
    seed: int
    folder: Path
    overrides: list[str]
    cfg: Config
    milestones: list[int]

    @property
    def label(self) -> str:
        return f"{self.arm.name}/seed{self.seed}"

    @property
    def prefix(self) -> Path:
        """gan.out of the run: its checkpoints are <prefix>-last.pt, <prefix>-s<samples>.pt, ..."""
        return self.folder / "g"

    def milestone_path(self, samples: int) -> Path:
        return Path(f"{self.prefix}-s{samples}.pt")

    @property
    def last(self) -> Path:
        return Path(f"{self.prefix}-last.pt")

    @property
    def done_file(self) -> Path:
        return self.folder / "done.json"

    @property
    def id_file(self) -> Path:
        return self.folder / "run.json"

    @property
    def log_file(self) -> Path:
        return self.folder / "train.log"

    def identity(self) -> dict:
        """What makes this run this run: the arm, the seed and the resolved config but its FREE_KEYS."""
        d = to_dict(self.cfg)
        flat = {f"{s}.{k}": v for s, sec in d.items() if isinstance(sec, dict) for k, v in sec.items()}
        flat.update({k: v for k, v in d.items() if not isinstance(v, dict)})
        return {"arm": self.arm.name, "seed": self.seed, "config_file": self.arm.config,
                "config": {k: v for k, v in sorted(flat.items()) if k not in FREE_KEYS}}

    def finished(self) -> bool:
        """done.json is there and every milestone file exists."""
        return self.done_file.is_file() and all(self.milestone_path(m).is_file() for m in self.milestones)

    def state(self) -> str:
        """'done', 'resume' (a `last` checkpoint to continue from) or 'new'."""
        if self.finished():
            return "done"
        return "resume" if self.last.is_file() else "new"


def _epochs_needed(cfg: Config, samples: int) -> int:
    """Epochs of the run's training data that reach `samples` samples."""
    train, _val, _meta = load_gan_data(cfg)
    return max(1, math.ceil(samples / len(train)))


def plan_runs(cfg: StudyConfig) -> list[Run]:
    """Every (arm, seed) run with its resolved config; the epochs cover the arm's last milestone."""
    runs: list[Run] = []
    for arm in cfg.arms:
        ms = cfg.milestones_of(arm)
        epochs = None
        for seed in cfg.seeds:
            folder = cfg.runs_dir / arm.name / f"seed{seed}"
            base = [*arm.set, f"gan.seed={seed}", f"gan.out={folder / 'g'}", f"gan.milestones={ms}"]
            if cfg.device != "auto":
                base.append(f"gan.device={cfg.device}")
            if epochs is None:  # the same data for every seed of an arm
                epochs = _epochs_needed(load_config(arm.config, base), ms[-1])
            overrides = [*base, f"gan.epochs={epochs}"]
            runs.append(Run(arm, seed, folder, overrides, load_config(arm.config, overrides), ms))
    return runs


def _check_identity(run: Run, overwrite: bool, log: Log) -> None:
    """A run folder made by another study config is refused (or, with --overwrite, removed)."""
    if not run.folder.exists():
        return
    saved = json.loads(run.id_file.read_text(encoding="utf-8")) if run.id_file.is_file() else None
    if saved == run.identity():
        return
    if saved is None and not any(run.folder.iterdir()):
        return
    if not overwrite:
        what = "was made by another study config" if saved is not None else "holds files of an unknown run"
        diff = "" if saved is None else ", ".join(
            k for k in sorted(set(saved["config"]) | set(run.identity()["config"]))
            if saved["config"].get(k) != run.identity()["config"].get(k))[:200]
        raise UserError(f"{run.folder}: {what}{f' (differs in {diff})' if diff else ''}; use --overwrite to retrain "
                        f"it, or another `runs:` folder")
    log(f"study: {run.label}: --overwrite: removing {run.folder} (another config)")
    shutil.rmtree(run.folder)


def _check_passed_milestones(run: Run) -> None:
    """A milestone added after a run passed it can never be written by resuming: one line saying so."""
    missing = [m for m in run.milestones if not run.milestone_path(m).is_file()]
    if not missing or not run.last.is_file():
        return
    budget = Budget.from_dict(load_checkpoint(run.last, "GAN").get("budget"))
    passed = [m for m in missing if budget is not None and m <= budget.samples]
    if passed:
        raise UserError(f"{run.folder}: milestone(s) {', '.join(map(str, passed))} were added after the run had "
                        f"seen {budget.samples} samples; remove the folder to retrain it, or drop them")


def _mark_done(run: Run, summary: dict[str, Any]) -> None:
    atomic_write_text(run.done_file, json.dumps({"arm": run.arm.name, "seed": run.seed,
                                                 "milestones": run.milestones, "summary": summary,
                                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))


def _in_process(run: Run, threads: int, log: Log, on_step: StepCallback | None) -> None:
    state = run.state()
    log(f"study: {run.label}: {'resuming' if state == 'resume' else 'training'} ({', '.join(run.overrides)})")
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        out = run_gan_stage(run.cfg, resume=state == "resume", overwrite=state == "new",
                            log=lambda m: log(f"[{run.label}] {m}"), on_step=on_step)
    finally:
        torch.set_num_threads(before)
    _mark_done(run, {k: out[k] for k in ("best_epoch", "epochs", "step")})


def _command(run: Run) -> list[str]:
    state = run.state()
    sets = [x for o in run.overrides for x in ("--set", o)]
    return [sys.executable, "-m", "cnnprior", "train", "--config", run.arm.config, "--stage", "gan", *sets,
            "--resume" if state == "resume" else "--overwrite"]


def _child_env(threads: int) -> dict[str, str]:
    """This environment with `threads` per library and this cnnprior first on the path (the child runs this code)."""
    n = str(max(1, threads))
    here = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    return dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, PYTHONPATH=path)


def _side_by_side(todo: list[Run], jobs: int, threads: int, log: Log, poll: float = 0.5) -> list[str]:
    """Train `todo` as child processes, `jobs` at a time; the failed runs' labels."""
    waiting, running, failed = list(todo), [], []
    while waiting or running:
        while waiting and len(running) < jobs:
            run = waiting.pop(0)
            log(f"study: {run.label}: {'resuming' if run.state() == 'resume' else 'training'} in a child process "
                f"(log {run.log_file})")
            fh = open(run.log_file, "a", encoding="utf-8")  # noqa: SIM115 (closed when the child ends)
            running.append((run, fh, subprocess.Popen(_command(run), stdout=fh, stderr=subprocess.STDOUT,
                                                      env=_child_env(threads))))
        time.sleep(poll)
        for item in list(running):
            run, fh, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            fh.close()
            if proc.returncode == 0:
                _mark_done(run, {"returncode": 0})
                log(f"study: {run.label}: finished")
            else:
                failed.append(f"{run.label} (exit {proc.returncode}; see {run.log_file})")
    return failed


def train_runs(cfg: StudyConfig, runs: list[Run], jobs: int = 1, overwrite: bool = False, log: Log = print,
               on_step: Callable[[Run], StepCallback | None] | None = None) -> dict[str, int]:
    """Train every run that is not finished (resuming the killed ones); counts of done / resumed / new runs.

    `on_step(run)` may give a run (trained in this process: jobs 1) a step callback (tests stop a run with it)."""
    for run in runs:
        _check_identity(run, overwrite, log)
        _check_passed_milestones(run)
    counts = {"done": 0, "resume": 0, "new": 0}
    todo = []
    for run in runs:
        state = run.state()
        counts[state] += 1
        if state == "done":
            log(f"study: {run.label}: finished earlier, skipped")
            continue
        run.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.id_file, json.dumps(run.identity(), indent=1, default=str))
        todo.append(run)
    if jobs <= 1:
        for run in todo:
            _in_process(run, cfg.threads, log, on_step(run) if on_step else None)
        return counts
    failed = _side_by_side(todo, jobs, 1, log)
    if failed:
        raise UserError(f"study: {len(failed)} run(s) failed: {'; '.join(failed)}; rerun the study to resume them")
    return counts
