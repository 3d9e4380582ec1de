"""Section `localisation`: do the maps point at the object (prior files with ground-truth masks only)?"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from cnnprior.evaluate.sanity import ci_row, pointing_chance
from cnnprior.evaluate.sections.base import EvalContext, Section
from cnnprior.evaluate.sections.faithfulness import (
    add_margins,
    input_size_maps,
    stored_target_label,
    target_margin_caption,
)
from cnnprior.evaluate.sections.fidelity import margin_table
from cnnprior.maps import metrics
from cnnprior.present.report import Report, Table

__all__ = ["COLUMNS", "localisation_per_image", "LocalisationSection"]

COLUMNS = (("pointing_game", "Pointing game ↑", "max", ".3f"),
           ("energy_pointing_game", "Energy pointing game ↑", "max", ".3f"))


def localisation_per_image(maps: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """Pointing-game hit (1/0) and energy-based pointing game per image, (B,) each."""
    return {"pointing_game": metrics.pointing_game(maps, masks),
            "energy_pointing_game": metrics.energy_pointing_game(maps, masks)}


class LocalisationSection(Section, name="localisation", title="Localisation", order=3, default=True, announce=False):
    """Pointing game and energy pointing game of every method's map against the records' masks."""

    def run(self, ctx: EvalContext) -> dict | None:
        d = ctx.data
        if not ctx.pf.meta.get("has_masks"):
            ctx.notes.append("localisation skipped: the prior file has no ground-truth masks (has_masks: false)")
            return None
        r = ctx.image_size
        masks_r = F.interpolate(d["mask"].unsqueeze(1), size=(r, r), mode="nearest")
        # the blurred-noise "random" map is no fair chance level (its maxima sit at the border): the chance of a
        # uniform random point, = the mask-area fraction (also a uniform map's energy share), replaces it
        per_image = {name: localisation_per_image(m, masks_r) for name, m in input_size_maps(ctx).items()
                     if name != "random"}
        chance = pointing_chance(masks_r)
        per_image["chance (uniform random point)"] = {"pointing_game": chance, "energy_pointing_game": chance}
        results = {name: ci_row(v) for name, v in per_image.items()}
        add_margins(results, per_image, [g.label for g in ctx.gans], stored_target_label(ctx.pf.meta))
        if float(d["mask"].flatten(1).amax(1).min()) == 0:
            ctx.notes.append("some evaluated images have an empty mask: they count as misses in the pointing game")
        return results

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        if self.not_run(report, ctx):
            return
        if results is None:
            report.p("Skipped: the prior file has no ground-truth masks.")
        else:
            report.p(f"**N = {ctx.count} images**, against the records' ground-truth masks, at {ctx.image_size}px "
                     f"(masks upsampled nearest); the pointing game counts a hit when the map's maximum lies in the "
                     f"mask (no tolerance). Chance: a uniform random point hits the mask with probability = its area "
                     f"fraction (a uniform map's energy share is the same); σ rows: the target blurred at the map "
                     f"size. Mean [95 % bootstrap interval over the images]; best mean per column in bold.")
            report.table(Table.of_metrics("method", results, COLUMNS))
            margin_table(report, results, COLUMNS, target_margin_caption(ctx, "; a positive Δ favours the GAN."))
