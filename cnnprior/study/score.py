"""Scoring a study's runs: every milestone generator on the val prior file, the val-chosen one on test (Pearson r
of each map with its target, per image, as the inference and evaluation reports score it), and the margins
between arms at equal samples and at equal training FLOPs with hierarchical-bootstrap intervals.

Equal training FLOPs: each run's per-image val r is interpolated (linearly in log FLOPs) between its milestones
at common budgets; the budgets of a pair of arms are the milestones' FLOPs of either arm inside the range both
arms' runs cover (no curve is extrapolated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cnnprior.core.budget import Budget
from cnnprior.core.errors import UserError
from cnnprior.core.provenance import provenance
from cnnprior.core.runtime import Log, resolve_device
from cnnprior.explain.scores import fidelity_scores
from cnnprior.gan.checkpoint import load_generator
from cnnprior.maps.ops import generate
from cnnprior.priors.read import read_priors
from cnnprior.study.bootstrap import hierarchical_bootstrap, interpolate_scores
from cnnprior.study.config import StudyConfig
from cnnprior.study.runs import Run

__all__ = ["ArmScores", "equal_flops_margins", "equal_samples_margins", "load_split", "R_COLUMN", "RunScores",
           "score_runs", "study_json", "chosen_margins"]

R_COLUMN = 1  # fidelity_scores columns: L1, r, SSIM


@dataclass
class RunScores:
    """One run's scores: per milestone (ascending) its budget and per-image val r; the chosen milestone's test r."""

    run: Run
    budgets: list[Budget]
    val: np.ndarray  # (M, N_val)
    chosen: int = -1  # index into the milestones
    test: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N_test,)
    params: int = 0

    @property
    def val_mean(self) -> np.ndarray:
        return self.val.mean(1)

    @property
    def flops(self) -> np.ndarray:
        return np.array([b.flops if b.flops is not None else np.nan for b in self.budgets], dtype=np.float64)


@dataclass
class ArmScores:
    """An arm's runs, in seed order."""

    name: str
    milestones: list[int]
    runs: list[RunScores]

    @property
    def seeds(self) -> list[int]:
        return [r.run.seed for r in self.runs]

    def val_at(self, k: int) -> np.ndarray:
        """(seeds, N_val) val r at milestone index k."""
        return np.stack([r.val[k] for r in self.runs])


def load_split(path: str, limit: int) -> dict[str, torch.Tensor]:
    """The first `limit` (0: all) records of a prior file as float tensors (image, priors, target)."""
    pf = read_priors(path)
    count = len(pf) if limit == 0 else min(limit, len(pf))
    if count == 0:
        raise UserError(f"{path}: the prior file holds no samples")
    return pf.tensors(slice(0, count))


def _r(model: torch.nn.Module, data: dict[str, torch.Tensor], batch: int, device: torch.device) -> np.ndarray:
    """Per-image Pearson r of the model's maps with the targets."""
    with torch.no_grad():
        maps = generate(model, data["image"], data["priors"], batch, device)
    return fidelity_scores(maps[:, 0], data["target"][:, 0])[:, R_COLUMN]


def _score_run(run: Run, val: dict, test: dict, batch: int, device: torch.device) -> RunScores:
    budgets, rows, params = [], [], 0
    for m in run.milestones:
        path = run.milestone_path(m)
        if not path.is_file():
            raise UserError(f"{path}: milestone checkpoint missing; rerun the study to finish {run.label}")
        model, meta = load_generator(path, device=device)
        if meta.budget is None:
            raise UserError(f"{path}: the checkpoint records no budget (trained by an older version)")
        budgets.append(meta.budget)
        rows.append(_r(model, val, batch, device))
        params = sum(p.numel() for p in model.parameters())
    scores = RunScores(run, budgets, np.stack(rows), params=params)
    scores.chosen = int(np.argmax(scores.val_mean))  # the first of equal means: the smaller budget
    model, _ = load_generator(run.milestone_path(run.milestones[scores.chosen]), device=device)
    scores.test = _r(model, test, batch, device)
    return scores


def score_runs(cfg: StudyConfig, runs: list[Run], log: Log = print) -> list[ArmScores]:
    """Score every milestone of every run on val and each run's val-chosen milestone on test."""
    device = resolve_device(cfg.device)
    val, test = load_split(cfg.val, cfg.val_limit), load_split(cfg.test, cfg.test_limit)
    arms = []
    for arm in cfg.arms:
        mine = [r for r in runs if r.arm.name == arm.name]
        scored = [_score_run(r, val, test, cfg.batch_size, device) for r in mine]
        for s in scored:
            log(f"study: {s.run.label}: val r {', '.join(f'{v:.3f}' for v in s.val_mean)} at "
                f"{', '.join(map(str, s.run.milestones))} samples; chosen {s.run.milestones[s.chosen]}, test r "
                f"{s.test.mean():.3f}")
        arms.append(ArmScores(arm.name, cfg.milestones_of(arm), scored))
    return arms


def _boot(cfg: StudyConfig, a: np.ndarray, b: np.ndarray | None = None) -> dict[str, float]:
    return hierarchical_bootstrap(a, b, resamples=cfg.resamples, seed=cfg.bootstrap_seed)


def equal_samples_margins(cfg: StudyConfig, a: ArmScores, b: ArmScores) -> list[dict[str, Any]]:
    """A - B in val r at each milestone both arms have."""
    out = []
    for m in sorted(set(a.milestones) & set(b.milestones)):
        s = _boot(cfg, a.val_at(a.milestones.index(m)), b.val_at(b.milestones.index(m)))
        out.append({"samples": m, **s})
    return out


def _flop_range(arm: ArmScores) -> tuple[float, float]:
    """The FLOP range every run of the arm covers."""
    return max(float(r.flops[0]) for r in arm.runs), min(float(r.flops[-1]) for r in arm.runs)


def _at(arm: ArmScores, flops: float) -> np.ndarray:
    """(seeds, N_val) val r of the arm's runs interpolated at `flops`."""
    return np.stack([interpolate_scores(r.flops, r.val, flops) for r in arm.runs])


def equal_flops_margins(cfg: StudyConfig, a: ArmScores, b: ArmScores) -> list[dict[str, Any]]:
    """A - B in val r at common training-FLOP budgets (the module docstring); [] when the ranges do not meet or a
    run's FLOPs were not counted."""
    if any(not np.isfinite(r.flops).all() for arm in (a, b) for r in arm.runs):
        return []
    (alo, ahi), (blo, bhi) = _flop_range(a), _flop_range(b)
    lo, hi = max(alo, blo), min(ahi, bhi)
    if lo > hi:
        return []
    grid = sorted({float(f) for arm in (a, b) for f in np.mean([r.flops for r in arm.runs], 0) if lo <= f <= hi}
                  | {lo, hi})
    return [{"flops": f, **_boot(cfg, _at(a, f), _at(b, f))} for f in grid]


def chosen_margins(cfg: StudyConfig, a: ArmScores, b: ArmScores) -> dict[str, Any]:
    """A - B in test r of each run's val-chosen milestone (the best each recipe reaches, as chosen on val)."""
    return _boot(cfg, np.stack([r.test for r in a.runs]), np.stack([r.test for r in b.runs]))


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def study_json(cfg: StudyConfig, arms: list[ArmScores]) -> dict[str, Any]:
    """study.json: per arm its seeds, milestones (samples, train FLOPs, wall s, val r per seed) and the test r of
    each run's val-chosen milestone; the margins of the compared pairs."""
    by_name = {a.name: a for a in arms}
    out: dict[str, Any] = {"format": "cnnprior-study/1", "name": cfg.name, "config": cfg.source_file,
                           "provenance": provenance(cfg.source_file or None),
                           "val": cfg.val, "test": cfg.test, "val_images": int(arms[0].runs[0].val.shape[1]),
                           "test_images": int(arms[0].runs[0].test.shape[0]), "arms": {}, "margins": []}
    for arm in arms:
        spec = cfg.arm(arm.name)
        entry: dict[str, Any] = {"config": spec.config, "set": spec.set, "seeds": arm.seeds,
                                 "params": arm.runs[0].params, "milestones": [], "test": {}}
        for k, m in enumerate(arm.milestones):
            bs = [r.budgets[k] for r in arm.runs]
            entry["milestones"].append({
                "samples": m, "samples_seen": _mean([b.samples for b in bs]), "steps": _mean([b.steps for b in bs]),
                "train_flops": _mean([b.flops for b in bs]), "wall_s": _mean([b.wall_s for b in bs]),
                "threads": bs[0].threads, "precision": bs[0].precision,
                "val_r": {str(r.run.seed): float(r.val_mean[k]) for r in arm.runs},
                "val_r_mean": _boot(cfg, arm.val_at(k))})
        for r in arm.runs:
            entry["test"][str(r.run.seed)] = {"samples": arm.milestones[r.chosen], "r": float(r.test.mean()),
                                              "train_flops": r.budgets[r.chosen].flops,
                                              "wall_s": r.budgets[r.chosen].wall_s}
        entry["test_r_mean"] = _boot(cfg, np.stack([r.test for r in arm.runs]))
        out["arms"][arm.name] = entry
    for a, b in cfg.pairs():
        A, B = by_name[a], by_name[b]
        out["margins"].append({"a": a, "b": b, "equal_samples": equal_samples_margins(cfg, A, B),
                               "equal_flops": equal_flops_margins(cfg, A, B), "test_chosen": chosen_margins(cfg, A, B)})
    return out
