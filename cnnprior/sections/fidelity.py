"""Section `fidelity` (always run): how close each method's map is to the stored target map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from cnnprior import cams, metrics
from cnnprior.baselines import BaselineChoice, grayscale
from cnnprior.report import Report, Table
from cnnprior.sections.base import EvalContext, Section
from cnnprior.sections.relevance import prior_labels

COLUMNS = (("l1", "L1 ↓", "min", ".3f"), ("r", "r ↑", "max", ".3f"), ("ssim", "SSIM ↑", "max", ".3f"))


def fidelity_means(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Mean L1, Pearson r and SSIM (NaN when the maps are smaller than SSIM's 11x11 window)."""
    return {"l1": float(metrics.l1(pred, target).mean()), "r": float(metrics.pearson(pred, target).mean()),
            "ssim": float(metrics.ssim_or_nan(pred, target).mean())}


def intensity_rows(image: Tensor, choice: BaselineChoice | None) -> dict[str, Tensor]:
    """The intensity baseline under the generators' validation choice of sign; without one, both signs (choosing
    the sign on the evaluated data would select a baseline on test)."""
    gray = grayscale(image)
    if choice is None:
        return {"intensity (gray)": gray, "intensity (1 - gray)": 1.0 - gray}
    if choice.image_inverted:
        return {"intensity (1 - gray, val)": 1.0 - gray}
    return {"intensity (gray, val)": gray}


def fidelity_rows(ctx: EvalContext) -> dict[str, Tensor]:
    """The maps scored: each GAN's, each prior alone, the mean of the priors, the image intensity."""
    d, pf = ctx.data, ctx.pf
    labels = prior_labels(pf.meta, pf.n)
    rows: dict[str, Tensor] = {g.label: g.maps for g in ctx.gans}
    for k in range(pf.n):
        rows[labels[k].split(":")[0]] = d["priors"][:, k:k + 1]
    rows["mean of priors"] = d["priors"].mean(1, keepdim=True)
    choices = [BaselineChoice.from_dict((g.meta.get("priors_meta") or {}).get("baselines")) for g in ctx.gans]
    rows.update(intensity_rows(d["image"], next((c for c in choices if c is not None), None)))
    return rows


class FidelitySection(Section, name="fidelity", title="Fidelity to the target map", order=1, selectable=False):
    """Mean L1, r and SSIM of every method's map against the stored target."""

    def run(self, ctx: EvalContext) -> dict:
        return {name: fidelity_means(m, ctx.data["target"]) for name, m in fidelity_rows(ctx).items()}

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        m = ctx.pf.meta
        report.p(f"Mean over the **N = {ctx.count} images**; the target is the stored {cams.title(m.get('method'))} "
                 f"map of `{m.get('target_layer')}` (priors.target: {m.get('target')}). Best per column in bold.")
        report.table(Table.of_metrics("method", results, COLUMNS))
