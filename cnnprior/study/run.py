"""`run_study`: train every (arm, seed) run of a study config (resumable), score its milestones on val and the
val-chosen one on test, and write the report folder; and its command line,

    python -m cnnprior.study --config configs/study_fashion.yaml [--jobs K] [--overwrite] [--set key=value]
    cnnprior study --config ...                                   (the same)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from cnnprior.core.errors import UserError, cli_main
from cnnprior.core.provenance import record_start
from cnnprior.core.runtime import Log
from cnnprior.core.schema import describe_keys
from cnnprior.core.stage import StepCallback
from cnnprior.study.config import StudyConfig, load_study_config
from cnnprior.study.report import write_report
from cnnprior.study.runs import Run, plan_runs, train_runs
from cnnprior.study.score import score_runs, study_json

__all__ = ["build_parser", "main", "run_study"]


def run_study(config: str | Path | StudyConfig, jobs: int = 1, overwrite: bool = False, log: Log = print,
              on_step: Callable[[Run], StepCallback | None] | None = None, train_only: bool = False) -> Path | None:
    """Run a study: train (or resume, or skip the finished) runs, score them, write the report folder; its path.

    Args:
        config: a study YAML path or a loaded `StudyConfig`.
        jobs: runs trained side by side (child processes with one thread each); 1 = one after another in this
            process (with the config's `threads`).
        overwrite: replace an existing report folder, and retrain run folders made by another config (finished
            runs of this config are never retrained).
        log: where progress lines go.
        on_step: run -> its step callback (jobs 1 only; tests stop a run with it).
        train_only: train and stop (no scoring, no report): None is returned.
    """
    record_start()
    cfg = config if isinstance(config, StudyConfig) else load_study_config(config)
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: must be >= 1")
    if cfg.out_dir.exists() and not overwrite and not train_only:
        raise UserError(f"{cfg.out_dir}: a study report exists; use --overwrite to replace it (finished runs are "
                        f"kept, not retrained), or another `out:` folder")
    t0 = time.time()
    runs = plan_runs(cfg)
    counts = train_runs(cfg, runs, jobs=jobs, overwrite=overwrite, log=log, on_step=on_step)
    trained = time.time() - t0
    log(f"study: {len(runs)} runs ({counts['done']} finished earlier, {counts['resume']} resumed, {counts['new']} "
        f"new) in {trained:.0f}s")
    if train_only:
        return None
    arms = score_runs(cfg, runs, log)
    result = study_json(cfg, arms)
    result["runtime_s"] = {"train": trained, "score": time.time() - t0 - trained}
    result["runs"] = counts
    notes = [f"runs: {counts['done']} finished earlier (skipped), {counts['resume']} resumed, {counts['new']} "
             f"trained from the start, in {trained:.0f} s (jobs {jobs})"]
    if len({m["precision"] for a in result["arms"].values() for m in a["milestones"]}) > 1:
        notes.append("warning: the arms trained in different precisions")
    dest = write_report(cfg, result, arms, notes, overwrite)
    log(f"study: wrote {dest}/report.md ({time.time() - t0:.0f}s)")
    return dest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cnnprior.study", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Train arms x seeds to budget milestones, score every milestone on val "
                                            "and the val-chosen one on test, write a report with learning curves and "
                                            "margins at equal samples and equal training FLOPs (docs/study.md).",
                                epilog="config keys (override with --set key=value):\n" + describe_keys(StudyConfig))
    p.add_argument("--config", required=True, help="study YAML (see configs/study_*.yaml)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained side by side, one thread each (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace the report folder and run folders of another "
                                                            "config (finished runs of this config are kept)")
    p.add_argument("--train-only", action="store_true", help="train the runs and stop (no scores, no report)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study config value (repeatable)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    """`python -m cnnprior.study`."""
    args = build_parser().parse_args(argv)
    cfg = load_study_config(args.config, args.overrides)
    run_study(cfg, jobs=args.jobs, overwrite=args.overwrite, train_only=args.train_only)
    return 0
