"""Section `gridpg`: grid pointing game on real images (Rao et al. 2022), no masks needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnprior.evaluate.sanity import (
    GRID_CHANCE,
    SMOOTHING_SIGMAS,
    confident_correct,
    energy_in_cell,
    explain_batched,
    format_ci,
    grid_images,
    mean_ci,
    sample_grids,
    smooth_maps,
)
from cnnprior.evaluate.sections.base import EvalContext, Section, option
from cnnprior.evaluate.sections.mprt import target_label
from cnnprior.maps.ops import generate, resize_maps
from cnnprior.present.report import Report, Table
from cnnprior.priors import cams
from cnnprior.priors.cams import live_cams
from cnnprior.priors.extract import extractor_from
from cnnprior.priors.spec import spec_from_sidecar

__all__ = ["GridOptions", "GridPGSection"]


@dataclass
class GridOptions:
    """Options of the `gridpg` section."""

    num: int = option(64, lo=1, help="grids N, each explaining one of its four cells")
    min_prob: float = option(0.9, lo=0.0, hi=1.0, help="a cell image is used only if the CNN classifies it "
                                                        "correctly with at least this probability, alone")
    seed: int = option(0, lo=0, help="seed of the grid sampling")


def _grid_maps(ctx: EvalContext, grids_s: torch.Tensor, classes: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Every method's maps of the grids for the explained cell's class, and the CNN's prediction per grid."""
    bs, dev, S = ctx.cfg.batch_size, ctx.device, ctx.pf.size
    grids_r = resize_maps(grids_s, ctx.image_size).to(dev)
    ex = extractor_from(ctx.cnn, spec_from_sidecar(ctx.pf.meta))
    out = explain_batched(ex, grids_r, classes.to(dev), bs)
    image_s = resize_maps(grids_s, S)
    maps = {g.label: generate(g.model, image_s, out["priors"], bs, dev) for g in ctx.gans}
    ref = target_label(ctx.pf.meta)
    maps[ref] = out["target"]
    layer = ex.layers[ex.target_index]
    for method in cams.LIVE_BESIDES_DEFAULT:
        maps[cams.title(method)] = live_cams(ctx.cnn, layer, grids_r, classes.to(dev), method, bs).cpu()
    for sigma in SMOOTHING_SIGMAS:
        maps[f"{ref} σ={sigma}px"] = smooth_maps(out["target"], sigma)
    return maps, out["pred"]


class GridPGSection(Section, name="gridpg", title="Grid pointing game (GridPG)", options=GridOptions, order=40):
    """Share of each map's positive energy inside the explained cell of a 2x2 grid of confident images."""

    def run(self, ctx: EvalContext) -> dict:
        opts = ctx.options(self.name)
        d = ctx.data
        labels = d["label"]
        keep, _ = confident_correct(ctx.cnn, resize_maps(d["image"], ctx.image_size), labels, opts.min_prob,
                                    ctx.cfg.batch_size)
        idx, cells = sample_grids(labels, keep, opts.num, opts.seed)
        res: dict[str, Any] = {"pool": ctx.count, "kept_images": int(keep.sum()),
                               "kept_classes": len(set(labels[keep].tolist())), "grids": int(len(idx)),
                               "chance": GRID_CHANCE, "min_prob": opts.min_prob, "methods": {}}
        if len(idx) == 0:
            ctx.notes.append(f"gridpg: no grids: fewer than 4 classes among the {res['kept_images']} images "
                             f"classified correctly with p ≥ {opts.min_prob} (gridpg.min_prob)")
            return res
        classes = labels[idx[torch.arange(len(idx)), cells]]
        maps, pred = _grid_maps(ctx, grid_images(d["image"][idx]), classes)
        res["methods"] = {name: mean_ci(energy_in_cell(m, cells)) for name, m in maps.items()}
        res["grid_prediction_is_explained"] = mean_ci((pred == classes).double())
        return res

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        report.p(f"2×2 grids of evaluated images of four different classes, each cell classified correctly with "
                 f"p ≥ {results['min_prob']} when shown alone ({results['kept_images']} of "
                 f"{results['pool']} images, {results['kept_classes']} classes); **N = {results['grids']} grids**, "
                 f"grid g explains the class of cell g mod 4. The CNN sees the grid at its input size; priors and "
                 f"target are computed for the explained cell's class. Score: the share of the map's positive "
                 f"energy inside that cell (0 for a map without positive values); a uniform map scores "
                 f"{results['chance']:.2f}. Mean [95 % bootstrap interval]. The Grad-CAM σ rows are the target "
                 f"blurred at the map size (matched smoothing: the GAN maps are smoother than Grad-CAM's).")
        if not results["methods"]:
            report.p("No grids: too few confidently classified images of four classes.")
            return
        report.p("The generators were trained on priors of the CNN's *predicted* class: a grid's other cells are "
                 "off their training distribution. The CNN's prediction on the grid equals the explained class in "
                 f"{format_ci(results['grid_prediction_is_explained'])} of the grids.")
        rows = [[name, format_ci(s)] for name, s in results["methods"].items()]
        rows.append(["chance (uniform map)", f"{results['chance']:.3f}"])
        report.table(Table.plain(["method", "energy in the explained cell ↑"], rows))
