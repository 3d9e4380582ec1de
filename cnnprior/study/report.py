"""The study's report folder: study.json, the per-image scores (scores.npz, for any later bootstrap), the learning
curves (val r vs samples and vs training FLOPs, mean over seeds with their min-max band) and report.md / .html with
the margin tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cnnprior.core.budget import format_flops
from cnnprior.core.runtime import publish_folder, temp_folder
from cnnprior.evaluate.run import jsonable
from cnnprior.present import viz
from cnnprior.present.report import Estimate, Report, Table
from cnnprior.study.config import StudyConfig
from cnnprior.study.score import ArmScores

__all__ = ["DEFINITIONS", "render_report", "save_scores", "write_report"]

DEFINITIONS = """Runs: each arm (a train.py config and --set overrides) is trained once per seed (gan.seed: the
initial weights and the sample order), from scratch unless its config says gan.init; its generator is saved when
the samples seen reach each milestone (gan.milestones). Samples count every training sample drawn (randomised-copy
samples included); a step is one optimiser update (a GAN step: one D and one G update).
Training FLOPs: one step's FLOPs counted with torch.utils.flop_counter.FlopCounterMode (matrix products and
convolutions, forward and backward; elementwise work and the optimiser not counted) times the steps. Wall seconds:
the run's processes, summed over resumptions, on the threads shown (runs side by side share the machine).
Scores: Pearson r of each generated map with its target over pixels, per image, on the val file (every milestone)
and on the test file (each run's val-chosen milestone only: the one with the highest mean val r, the smaller
budget on ties).
Intervals: 95 % percentile intervals of a hierarchical bootstrap (resamples as configured): each resample draws
each arm's seeds with replacement (independently per arm) and the images with replacement (one draw for both
arms: paired per image), then takes mean(A) - mean(B) over the drawn seeds and images.
Equal samples: both arms at the same milestone. Equal training FLOPs: each run's per-image val r is interpolated
linearly in log FLOPs between its milestones, at the milestones' FLOPs of either arm inside the range all runs of
both arms cover (never extrapolated).
Curves: the mean over seeds of each run's mean val r, with the band from the lowest to the highest seed."""


def save_scores(arms: list[ArmScores], path: Path) -> None:
    """scores.npz: val/<arm>/<seed> (milestones x val images) and test/<arm>/<seed> (test images) per-image r,
    milestones/<arm> and flops/<arm>/<seed>."""
    out: dict[str, np.ndarray] = {}
    for arm in arms:
        out[f"milestones/{arm.name}"] = np.asarray(arm.milestones)
        for r in arm.runs:
            out[f"val/{arm.name}/{r.run.seed}"] = r.val
            out[f"test/{arm.name}/{r.run.seed}"] = r.test
            out[f"flops/{arm.name}/{r.run.seed}"] = r.flops
    np.savez_compressed(path, **out)


def _curves(arms: list[ArmScores], folder: Path) -> list[str]:
    """curve-samples.png and (when every FLOP count is known) curve-flops.png."""
    files = []
    for key, xlabel, file in (("samples", "training samples", "curve-samples.png"),
                              ("flops", "training FLOPs", "curve-flops.png")):
        series = {}
        for arm in arms:
            vals = np.stack([r.val_mean for r in arm.runs])  # (seeds, M)
            if key == "samples":
                xs = np.asarray(arm.milestones, dtype=np.float64)
            else:
                xs = np.mean([r.flops for r in arm.runs], 0)
                if not np.isfinite(xs).all():
                    break
            series[arm.name] = (xs, vals.mean(0), vals.min(0), vals.max(0))
        else:
            viz.band_chart(series, folder / file, f"val r vs {xlabel} (mean over seeds, min-max band)", xlabel,
                           "val r", logx=key == "flops")
            files.append(file)
    return files


def _est(s: dict[str, float]) -> Estimate:
    return Estimate(s["mean"], s["lo"], s["hi"])


def render_report(cfg: StudyConfig, result: dict[str, Any], figures: list[str], notes: list[str]) -> Report:
    """report.md's content from study.json's data."""
    rep = Report(f"cnnprior study: {cfg.name}")
    arms = result["arms"]
    rep.p(f"{len(arms)} arms x {len(cfg.seeds)} seeds ({', '.join(map(str, cfg.seeds))}); val `{cfg.val}` "
          f"({result['val_images']} images), test `{cfg.test}` ({result['test_images']} images); config "
          f"`{cfg.source_file}`.")
    rep.h("Arms")
    rows = [[name, f"`{a['config']}`", " ".join(a["set"]) or "–", f"{a['params']:,}",
             a["milestones"][0]["precision"], a["milestones"][0]["threads"]] for name, a in arms.items()]
    rep.table(Table.plain(["arm", "config", "overrides", "parameters", "precision", "threads"], rows))
    rep.h("Learning curves")
    for f in figures:
        rep.img(f, f.removesuffix(".png"))
    rep.h("Milestones (val)")
    rep.p("Mean val r over seeds [95 % hierarchical bootstrap interval]; FLOPs and wall seconds: mean over seeds.")
    rows = []
    for name, a in arms.items():
        for m in a["milestones"]:
            rows.append([name, m["samples"], format_flops(m["train_flops"]), m["wall_s"], _est(m["val_r_mean"]),
                         " ".join(f"{v:.3f}" for v in m["val_r"].values())])
    rep.table(Table(["arm", "samples", "train FLOPs", "wall s", "val r", "val r per seed"], rows,
                    [None] * 6, [None, ",d", None, ",.0f", ".3f", None]))
    rep.h("Test (each run's val-chosen milestone)")
    rows = [[name, " ".join(str(t["samples"]) for t in a["test"].values()), _est(a["test_r_mean"]),
             " ".join(f"{t['r']:.3f}" for t in a["test"].values())] for name, a in arms.items()]
    rep.table(Table(["arm", "chosen samples per seed", "test r", "test r per seed"], rows, [None, None, "max", None],
                    [None, None, ".3f", None]))
    rep.h("Margins")
    rep.p("A − B, mean [95 % hierarchical bootstrap interval over seeds and images]; the equal-samples and "
          "equal-FLOPs rows are on val (fixed budgets: no selection), the last table on test (each run's val-chosen "
          "milestone).")
    for key, title, col, fmt in (("equal_samples", "At equal samples (val r)", "samples", ",d"),
                                 ("equal_flops", "At equal training FLOPs (val r, interpolated)", "flops", None)):
        rows = [[f"{mg['a']} − {mg['b']}", format_flops(row[col]) if col == "flops" else row[col], _est(row)]
                for mg in result["margins"] for row in mg[key]]
        rep.h(title, 3)
        if rows:
            rep.table(Table(["A − B", col, "Δ r"], rows, [None] * 3, [None, fmt, "+.3f"]))
        else:
            rep.p("No common budget.")
    rep.h("At each run's val-chosen milestone (test r)", 3)
    rows = [[f"{mg['a']} − {mg['b']}", _est(mg["test_chosen"])] for mg in result["margins"]]
    rep.table(Table(["A − B", "Δ test r"], rows, [None, None], [None, "+.3f"]))
    rep.h("Notes")
    rep.ul(notes or ["none"])
    rep.h("Definitions")
    rep.pre(DEFINITIONS)
    return rep


def write_report(cfg: StudyConfig, result: dict[str, Any], arms: list[ArmScores], notes: list[str],
                 overwrite: bool) -> Path:
    """Build the report folder under a temporary name and publish it as cfg.out_dir (an existing one is replaced
    only with `overwrite`; the caller checked that earlier)."""
    final = cfg.out_dir
    tmp = temp_folder(final)
    try:
        figures = _curves(arms, tmp)
        save_scores(arms, tmp / "scores.npz")
        (tmp / "study.json").write_text(json.dumps(jsonable(result), indent=1, allow_nan=False) + "\n",
                                        encoding="utf-8")
        rep = render_report(cfg, result, figures, notes)
        (tmp / "report.md").write_text(rep.markdown(), encoding="utf-8")
        (tmp / "report.html").write_text(rep.html(tmp), encoding="utf-8")
        if final.exists() and overwrite:
            shutil.rmtree(final)
        return publish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

