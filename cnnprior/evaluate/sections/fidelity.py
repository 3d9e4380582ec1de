"""Section `fidelity` (always run): how close each method's map is to the stored target map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from cnnprior.evaluate.sanity import ci_row, margin_row
from cnnprior.evaluate.sections.base import EvalContext, Section
from cnnprior.evaluate.sections.relevance import prior_labels
from cnnprior.gan.models.base import L1_SUFFIX
from cnnprior.maps import metrics
from cnnprior.maps.baselines import BaselineChoice, baseline_maps, grayscale
from cnnprior.maps.baselines import label as baseline_label
from cnnprior.present.report import Estimate, Report, Table
from cnnprior.priors import cams

__all__ = [
    "baseline_choice", "best_baseline", "best_learned", "COLUMNS", "fidelity_per_image", "fidelity_rows", "FidelitySection",
    "intensity_rows", "margin_table", "MEAN_OF_PRIORS"
]

COLUMNS = (("l1", "L1 ↓", "min", ".3f"), ("r", "r ↑", "max", ".3f"), ("ssim", "SSIM ↑", "max", ".3f"))
MEAN_OF_PRIORS = "mean of priors"


def fidelity_per_image(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """L1, Pearson r and SSIM per image, (B,) each (SSIM NaN when the maps are smaller than its 11x11 window)."""
    return {"l1": metrics.l1(pred, target), "r": metrics.pearson(pred, target),
            "ssim": metrics.ssim_or_nan(pred, target)}


def intensity_rows(image: Tensor, choice: BaselineChoice | None) -> dict[str, Tensor]:
    """The intensity baseline under the generators' validation choice of sign; without one, both signs (choosing
    the sign on the evaluated data would select a baseline on test)."""
    gray = grayscale(image)
    if choice is None:
        return {"intensity (gray)": gray, "intensity (1 - gray)": 1.0 - gray}
    if choice.image_inverted:
        return {"intensity (1 - gray, val)": 1.0 - gray}
    return {"intensity (gray, val)": gray}


def baseline_choice(g: Any) -> BaselineChoice | None:
    """The trivial-baseline choice a generator's checkpoint records (made on the validation prior file)."""
    return BaselineChoice.from_dict(g.meta.priors_meta.get("baselines"))


def fidelity_rows(ctx: EvalContext) -> dict[str, Tensor]:
    """The maps scored: each GAN's, each prior alone, the mean of the priors, the image intensity."""
    d, pf = ctx.data, ctx.pf
    labels = prior_labels(pf.meta, pf.n)
    rows: dict[str, Tensor] = {g.label: g.maps for g in ctx.gans}
    for k in range(pf.n):
        rows[labels[k].split(":")[0]] = d["priors"][:, k:k + 1]
    rows[MEAN_OF_PRIORS] = d["priors"].mean(1, keepdim=True)
    choices = [baseline_choice(g) for g in ctx.gans]
    rows.update(intensity_rows(d["image"], next((c for c in choices if c is not None), None)))
    return rows


def best_baseline(image: Tensor, priors: Tensor, choice: BaselineChoice | None) -> tuple[str, Tensor]:
    """(label, maps) of the best trivial baseline chosen on validation; without a choice the mean of the priors (it
    needs none: choosing on the evaluated images would select on the test data)."""
    if choice is None:
        return f"{MEAN_OF_PRIORS} (no validation choice recorded)", priors.mean(1, keepdim=True)
    return baseline_label(choice.best_baseline, choice), baseline_maps(image, priors, choice)[choice.best_baseline]


class FidelitySection(Section, name="fidelity", title="Fidelity to the target map", order=1, selectable=False):
    """Mean L1, r and SSIM of every method's map against the stored target [95 % bootstrap interval], and each GAN's
    margin over its best trivial baseline (paired per image, stored under the GAN's row as `margin`)."""

    def run(self, ctx: EvalContext) -> dict:
        d, target = ctx.data, ctx.data["target"]
        per_image = {name: fidelity_per_image(m, target) for name, m in fidelity_rows(ctx).items()}
        results = {name: ci_row(v) for name, v in per_image.items()}
        for g in ctx.gans:
            over, maps = best_baseline(d["image"], d["priors"], baseline_choice(g))
            results[g.label]["margin"] = margin_row(per_image[g.label], fidelity_per_image(maps, target), over)
        for g in ctx.gans:
            if not g.adversarial:
                continue
            best = best_learned(ctx.gans)
            if best is not None:
                results[g.label]["margin_learned"] = margin_row(per_image[g.label], per_image[best.label],
                                                                f"{best.label} (val r {best.val_r:.3f})")
            twin = next((t for t in ctx.gans if t.key == f"{g.key}{L1_SUFFIX}"), None)
            if twin is not None:
                results[g.label]["margin_twin"] = margin_row(per_image[g.label], per_image[twin.label], twin.label)
        return results

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        m = ctx.pf.meta
        report.p(f"Mean [95 % bootstrap interval] over the **N = {ctx.count} images**; the target is the stored "
                 f"{cams.title(m.get('method'))} map of `{m.get('target_layer')}` (priors.target: {m.get('target')}). "
                 f"Best mean per column in bold.")
        report.table(Table.of_metrics("method", results, COLUMNS))
        margin_table(report, results, COLUMNS,
                     f"Each GAN's margin over the best trivial baseline (best single prior, mean of the priors or image "
                     f"intensity, as chosen on the validation prior file and stored in its checkpoint): GAN minus "
                     f"baseline per image, mean [95 % paired bootstrap interval], **N = {ctx.count} images**. The "
                     f"arrows are the columns' above: a negative Δ L1 and a positive Δ r favour the GAN.")
        margin_table(report, results, COLUMNS,
                     f"Each GAN's margin over the best learned baseline (the `linear` / `convnet` regressor with the "
                     f"higher validation r, trained on the same files and inputs with L1 only): GAN minus baseline "
                     f"per image, mean [95 % paired bootstrap interval], **N = {ctx.count} images**.",
                     key="margin_learned")
        margin_table(report, results, COLUMNS,
                     f"The adversarial ablation: each GAN minus its twin trained with the adversarial term off "
                     f"(gan.adv_weight: 0, everything else the same), per image, mean [95 % paired bootstrap "
                     f"interval], **N = {ctx.count} images**.", key="margin_twin")


def best_learned(gans: Sequence[Any]) -> Any:
    """The learned baseline (a registered generator that is not adversarial: `linear`, `convnet`, ...) with the highest
    validation r recorded in its checkpoint, or None."""
    learned = [g for g in gans if g.learned and not g.key.endswith(L1_SUFFIX) and g.val_r == g.val_r]
    return max(learned, key=lambda g: g.val_r, default=None)


def margin_table(report: Report, results: dict[str, Any], cols: Sequence[tuple], caption: str,
                 key: str = "margin") -> None:
    """The `key` entries of a section's rows (a GAN minus its reference, paired per image) as a captioned table:
    GAN | minus | Δ per column of `cols` ((key, header, better, fmt) each); nothing when no row has one."""
    margins = {label: row[key] for label, row in results.items() if isinstance(row, dict) and key in row}
    if not margins:
        return
    report.p(caption)
    rows = [[label, mg["over"]] + [Estimate.of(mg, c[0]) for c in cols] for label, mg in margins.items()]
    report.table(Table(["GAN", "minus"] + [f"Δ {c[1]}" for c in cols], rows, [None] * (len(cols) + 2),
                       [None, None] + [c[3] for c in cols]))
