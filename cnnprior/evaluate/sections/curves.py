"""Section `curves` (always shown): each generator's validation metrics per training epoch, from its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnprior.evaluate.sections.base import EvalContext, Section
from cnnprior.present import viz
from cnnprior.present.report import Report

__all__ = ["CurvesSection", "history_chart", "SERIES"]

SERIES = (("val_r", "val r"), ("val_l1", "val L1"), ("val_ssim", "val SSIM"))


def history_chart(g: Any, folder: Path) -> str | None:
    """Draw curve-<variant>.png from the checkpoint's history into `folder`; its file name, or None without one."""
    hist = [h for h in g.meta.get("history") or [] if isinstance(h, dict) and "epoch" in h]
    if not hist:
        return None
    series = {label: [float(h[key]) for h in hist] for key, label in SERIES if all(key in h for h in hist)}
    if not series:
        return None
    file = f"curve-{g.key}.png"
    viz.line_chart([int(h["epoch"]) for h in hist], series, folder / file, f"{g.label} validation per epoch",
                   "epoch", "value")
    return file


class CurvesSection(Section, name="curves", title="Training curves", order=6, selectable=False, in_metrics=False):
    """The training curves stored in the generator checkpoints (nothing is computed).

    in_metrics: the histories are already under metrics.json's `gans`.
    """

    def run(self, ctx: EvalContext) -> None:
        return None

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        curves = False
        for g in ctx.gans:
            file = history_chart(g, folder)
            if file:
                report.img(file, f"{g.label} validation metrics per epoch")
                curves = True
            else:
                ctx.notes.append(f"{g.label}: its checkpoint holds no per-epoch validation history")
        if not curves:
            report.p("No training history in the checkpoints.")
