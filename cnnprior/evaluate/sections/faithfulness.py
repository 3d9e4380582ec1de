"""Section `faithfulness`: does the CNN's confidence follow each method's map (masking, deletion/insertion, ROAD)?"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnprior.evaluate.sanity import SMOOTHING_SIGMAS, ci_row, margin_row, smooth_maps
from cnnprior.evaluate.sections.base import EvalContext, Section, option
from cnnprior.evaluate.sections.fidelity import margin_table
from cnnprior.maps import metrics
from cnnprior.maps.ops import blur, random_maps, resize_maps
from cnnprior.present.report import Report, Table
from cnnprior.priors import cams
from cnnprior.priors.cams import live_cams

__all__ = [
    "add_margins", "BLURRED_COLUMN", "COLUMNS", "drop_and_increase", "faithfulness_per_image",
    "FaithfulnessOptions", "FaithfulnessSection", "images_at_input_size", "input_size_maps", "stored_target_label"
]

COLUMNS = (("average_drop", "Average Drop % ↓", "min", ".1f"),
           ("increase_in_confidence", "Increase in Confidence % ↑", "max", ".1f"),
           ("deletion_auc", "Deletion AUC ↓", "min", ".3f"), ("insertion_auc", "Insertion AUC ↑", "max", ".3f"),
           ("road_combined", "ROAD combined ↑", "max", ".4f"))
BLURRED_COLUMN = ("insertion_auc_blurred", "Insertion AUC (blurred start) ↑", "max", ".3f")


@dataclass
class FaithfulnessOptions:
    """Options of the `faithfulness` section."""

    insertion: str = option("black", choices=("black", "blurred"),
                            help="insertion also starting from a blurred copy of the image, as RISE does (an extra "
                                 "column; deletion always goes to black)")
    blur_sigma: float = option(5.0, lo=0.1, hi=1000.0, help="blurred start: Gaussian sigma in pixels at the CNN's "
                                                            "input size (RISE: 5 at 224 px)")


def stored_target_label(meta: dict) -> str:
    """'target (stored Grad-CAM)': the row of the prior file's target map."""
    return f"target (stored {cams.title(meta.get('method') or 'map')})"


def _input_size_maps(ctx: EvalContext) -> dict[str, Tensor]:
    d, size, count = ctx.data, ctx.pf.size, ctx.count
    r = ctx.image_size
    maps = {g.label: resize_maps(g.maps, r) for g in ctx.gans}
    for method in cams.LIVE:
        maps[cams.title(method)] = live_cams(ctx.cnn, ctx.target_layer, images_at_input_size(ctx),
                                             ctx.data["explained"].to(ctx.device), method, ctx.cfg.batch_size).cpu()
    target = stored_target_label(ctx.pf.meta)
    maps[target] = resize_maps(d["target"], r)
    maps["random"] = resize_maps(random_maps(count, size, ctx.cfg.seed), r)
    for sigma in SMOOTHING_SIGMAS:  # matched smoothing: the target blurred at the map size S
        maps[f"{target} σ={sigma}px"] = resize_maps(smooth_maps(d["target"], sigma), r)
    return maps


def input_size_maps(ctx: EvalContext) -> dict[str, Tensor]:
    """Every method's maps at the CNN's input size R (GANs, live CAMs at the target layer, the stored target, a
    random map, the target at matched smoothing); shared with the localisation section."""
    return ctx.shared("input_size_maps", lambda: _input_size_maps(ctx))


def images_at_input_size(ctx: EvalContext) -> Tensor:
    """The evaluated images upsampled to the CNN's input size, on the device."""
    return ctx.shared("images_r", lambda: resize_maps(ctx.data["image"], ctx.image_size).to(ctx.device))


def drop_and_increase(p_orig: Tensor, p_expl: Tensor) -> tuple[Tensor, Tensor]:
    """Per image, in percent: the drop max(0, p_orig − p_expl) / p_orig (0 where p_orig = 0) and the increase
    1[p_expl > p_orig]; their means are metrics.average_drop and metrics.increase_in_confidence."""
    drop = (p_orig - p_expl).clamp_min(0) / p_orig.clamp_min(torch.finfo(p_orig.dtype).tiny)
    return 100 * drop, 100 * (p_expl > p_orig).to(p_orig.dtype)


def faithfulness_per_image(model: nn.Module, images: Tensor, maps: Tensor, classes: Tensor, p_orig: Tensor,
                           steps: int, road_idx: Tensor, batch_size: int, seed: int,
                           insertion_start: Tensor | None = None) -> dict[str, Tensor]:
    """Per-image Average Drop %, Increase in Confidence %, deletion/insertion AUC, (B,) each, and ROAD combined on
    the images `road_idx` (len(road_idx),) of one method; with `insertion_start` (e.g. blurred images, as RISE) also
    the insertion AUC starting from it."""
    maps = maps.to(images.device)
    p_expl = metrics.class_probs(model, metrics.explanation_masked(images, maps), classes, batch_size)
    drop, increase = drop_and_increase(p_orig, p_expl)
    dele, ins = metrics.deletion_insertion_auc(model, images, maps, classes, steps, None, batch_size)
    road = torch.zeros(0)
    if len(road_idx):
        idx = road_idx.to(images.device)
        road = metrics.road_scores(model, images[idx], maps[idx], classes[idx], seed=seed)["combined"]
    out = {"average_drop": drop, "increase_in_confidence": increase, "deletion_auc": dele, "insertion_auc": ins,
           "road_combined": road}
    if insertion_start is not None:
        out["insertion_auc_blurred"] = metrics.deletion_insertion_auc(model, images, maps, classes, steps,
                                                                      insertion_start, batch_size)[1]
    return {k: v.detach().cpu() for k, v in out.items()}


class FaithfulnessSection(Section, name="faithfulness", title="Faithfulness to the CNN", options=FaithfulnessOptions,
                                   order=2, default=True, options_in_results=False, announce=False):
    """Average Drop, Increase in Confidence, deletion/insertion AUC and ROAD of every method's map.

    options_in_results: its results are the table of methods; announce: it logs each method.
    """

    def empty(self) -> dict:
        return {}

    def run(self, ctx: EvalContext) -> dict:
        cfg, count = ctx.cfg, ctx.count
        road_n = min(cfg.road_num, count)
        road_idx = torch.randperm(count, generator=torch.Generator().manual_seed(cfg.seed))[:road_n].sort().values
        ctx.road_images = road_idx.tolist()
        images, classes = images_at_input_size(ctx), ctx.data["explained"].to(ctx.device)
        maps = input_size_maps(ctx)
        p_orig = metrics.class_probs(ctx.cnn, images, classes, cfg.batch_size)
        opts = ctx.options(self.name)
        start = blur(images, opts.blur_sigma) if opts.insertion == "blurred" else None
        per_image = {}
        for name, m in maps.items():
            t = time.time()
            per_image[name] = faithfulness_per_image(ctx.cnn, images, m, classes, p_orig, cfg.steps, road_idx,
                                                     cfg.batch_size, cfg.seed, start)
            ctx.log(f"evaluate: faithfulness {name} ({time.time() - t:.1f}s)")
        results = {name: ci_row(v) for name, v in per_image.items()}
        add_margins(results, per_image, [g.label for g in ctx.gans], stored_target_label(ctx.pf.meta))
        if road_n == 0:
            ctx.notes.append("ROAD skipped (road_num: 0)")
        elif road_n < count:
            ctx.notes.append(f"ROAD is computed on a seeded random subset of {road_n} of the {count} images "
                             f"(road_num)")
        return results

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        if self.not_run(report, ctx):
            return
        report.p(f"Images and maps upsampled from {ctx.pf.size}px to {ctx.image_size}px; explained class = the "
                 f"record's `explained`; masking / deletion / insertion baseline = black (zeros in [0,1] RGB input "
                 f"space); **N = {ctx.count} images**; deletion/insertion with {ctx.cfg.steps} steps; ROAD on a "
                 f"seeded random subset of **{len(ctx.road_images)} of {ctx.count} images**. `random`: uniform noise "
                 f"blurred with sigma S/16 (its maxima sit near the border); the σ rows are the target blurred at the "
                 f"map size, so methods can be compared at matched smoothing (these metrics reward smooth maps). "
                 f"Mean [95 % bootstrap interval over the images; ROAD: over its subset]; best mean per column in "
                 f"bold.")
        blurred = any("insertion_auc_blurred" in v for v in results.values())
        if blurred:
            report.p("Insertion AUC (blurred start): insertion starting from a Gaussian-blurred copy of the image "
                     "(as RISE does) instead of black.")
        cols = COLUMNS + (BLURRED_COLUMN,) * blurred
        report.table(Table.of_metrics("method", results, cols))
        road = f" (ROAD: its {len(ctx.road_images)} images)" if ctx.road_images else ""
        margin_table(report, results, cols, target_margin_caption(
            ctx, f"{road}. The arrows are the columns' above: for a ↓ column a negative Δ favours the GAN."))


def target_margin_caption(ctx: EvalContext, tail: str) -> str:
    """The caption of a table of each GAN's margin over the stored target map (`add_margins`), ending in `tail`."""
    return (f"Each GAN minus `{stored_target_label(ctx.pf.meta)}`, the map it was trained to reproduce: mean of the "
            f"per-image differences [95 % paired bootstrap interval], **N = {ctx.count} images**{tail}")


def add_margins(results: dict[str, dict], per_image: dict[str, dict[str, Tensor]], gans: list[str],
                reference: str) -> None:
    """Each GAN row's `margin`: GAN minus `reference` per image (paired) for every score of the row."""
    if reference not in per_image:
        return
    for label in gans:
        results[label]["margin"] = margin_row(per_image[label], per_image[reference], reference)
