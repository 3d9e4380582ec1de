"""Section `prior_swap`: each image given the priors of another image; does the map follow the donor?"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnprior.evaluate.sanity import format_ci, mean_ci, swap_donors
from cnnprior.evaluate.sections.base import EvalContext, Section, option
from cnnprior.gan.checkpoint import GeneratorMeta
from cnnprior.maps import metrics
from cnnprior.maps.ops import generate
from cnnprior.present.report import Report, Table

__all__ = ["DONORS", "priors_only", "PriorSwapSection", "specificity_verdict", "SwapOptions"]

DONORS = (("same class", True), ("any class", False))


@dataclass
class SwapOptions:
    """Options of the `prior_swap` section."""

    num: int = option(0, lo=0, help="images (0 = every evaluated image)")
    seed: int = option(0, lo=0, help="seed of the donor choice")


def _follows(stat: dict) -> str:
    """Which target the swapped map follows, from the interval of (r with donor's − r with own target)."""
    if stat["n"] == 0:
        return "–"
    if stat["lo"] > 0:
        return "the donor (the priors)"
    if stat["hi"] < 0:
        return "its own image"
    return "undecided"


def priors_only(meta: GeneratorMeta | None) -> bool:
    """Whether a generator never sees the image (trained with gan.image: none)."""
    return meta is not None and meta.inputs[0] == "none"


def specificity_verdict(stat: dict) -> str:
    """Verdict of the specificity test of a priors-only generator: the map must be closer to the donor's target."""
    if stat["n"] == 0:
        return "–"
    return "pass (follows the donor's target)" if stat["lo"] > 0 else "FAIL (no closer to the donor's target)"


def _donor_kind(ctx: EvalContext, n: int, same: bool, seed: int) -> dict:
    """Scores of every GAN for one kind of donor (same class or any class)."""
    d = ctx.data
    donors = swap_donors(d["explained"][:n], same, seed)
    i = torch.nonzero(donors >= 0)[:, 0]
    j = donors[i]
    image, priors, target = d["image"], d["priors"], d["target"]
    entry: dict[str, Any] = {"pairs": int(len(i)), "targets_r": mean_ci(metrics.pearson(target[i], target[j])),
                             "gans": {}}
    if len(i) == 0:
        return entry
    for g in ctx.gans:
        m = generate(g.model, image[i], priors[j], ctx.cfg.batch_size, ctx.device)
        own, donor = metrics.pearson(m, target[i]), metrics.pearson(m, target[j])
        entry["gans"][g.label] = {"unswapped_r": mean_ci(metrics.pearson(g.maps[i], target[i])),
                                  "r_own": mean_ci(own), "r_donor": mean_ci(donor),
                                  "donor_minus_own": mean_ci(donor - own),
                                  "priors_only": priors_only(getattr(g, "meta", None))}
    return entry


class PriorSwapSection(Section, name="prior_swap", title="Control: prior swap", options=SwapOptions, order=20):
    """G(x_i, P_j): Pearson r with the image's own target T_i and with the donor's target T_j."""

    def run(self, ctx: EvalContext) -> dict:
        opts = ctx.options(self.name)
        n = ctx.count if opts.num == 0 else min(opts.num, ctx.count)
        return {"images": n, "donors": {kind: _donor_kind(ctx, n, same, opts.seed) for kind, same in DONORS}}

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        report.p(f"Each of **N = {results['images']} images** x_i is given the stored priors P_j of a donor image "
                 f"j ≠ i (seeded; same class: a donor with the same explained class; any class: any other image). "
                 f"Pearson r of G(x_i, P_j) with the image's own target T_i and with the donor's target T_j; mean "
                 f"[95 % bootstrap interval]; the margin is paired per image. A GAN that follows the CNN follows "
                 f"the donor (margin > 0); one that reads the image keeps its own target. `targets r` = r(T_i, T_j): "
                 f"how alike the two targets are anyway (centred objects make them alike). For a **priors-only** "
                 f"generator (`gan.image: none`) the image-versus-priors question does **not apply** (it cannot "
                 f"read the image, so its map is the donor's by construction); its row is the **specificity test**, "
                 f"which can fail: the swapped map must be closer to the donor's target than to the recipient's "
                 f"(donor − own > 0, interval above 0), i.e. the map is specific to the image its priors came from "
                 f"rather than a class template; same-class donors make it hard.")
        header = ["donor", "GAN", "pairs", "r own target, unswapped", "r own target, swapped",
                  "r donor's target, swapped", "donor − own", "targets r", "map follows / specificity"]
        rows = []
        for kind, e in results["donors"].items():
            if not e["gans"]:
                rows.append([kind, "–", e["pairs"], "–", "–", "–", "–", format_ci(e["targets_r"]), "–"])
            for label, s in e["gans"].items():
                rows.append([kind, label, e["pairs"], format_ci(s["unswapped_r"]), format_ci(s["r_own"]),
                             format_ci(s["r_donor"]), format_ci(s["donor_minus_own"]), format_ci(e["targets_r"]),
                             specificity_verdict(s["donor_minus_own"]) if s.get("priors_only")
                             else _follows(s["donor_minus_own"])])
        report.table(Table.plain(header, rows))
