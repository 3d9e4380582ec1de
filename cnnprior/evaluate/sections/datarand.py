"""Section `datarand`: the data-randomisation test (Adebayo et al. 2018, §5).

A CNN of the same architecture trained on the same kind of images with permuted labels (the classifier stage with
`cnn.random_labels: 1.0`) has memorised noise: an explainer that reads the CNN must give it maps unlike those of the
CNN trained on the true labels. The explained class stays the trained CNN's, per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnprior.cnn.model import load_cnn
from cnnprior.core.errors import UserError
from cnnprior.evaluate.sanity import MPRT_MARGIN, constant, format_ci, mean_ci, same_size_spearman, spearman_abs
from cnnprior.evaluate.sections.base import EvalContext, Section, option
from cnnprior.evaluate.sections.mprt import maps_function, target_label
from cnnprior.maps import metrics
from cnnprior.present.report import Report, Table

__all__ = ["DataRandOptions", "DataRandSection", "fit_of"]


@dataclass
class DataRandOptions:
    """Options of the `datarand` section."""

    cnn: str = option("", file=True, help="the data-randomisation CNN: the evaluated CNN's architecture and input "
                                          "size, trained with cnn.random_labels: 1.0 (configs/"
                                          "fashion_resnet18_random_labels.yaml)")
    num: int = option(64, lo=1, help="images N: the first N evaluated records")


def fit_of(meta: dict) -> dict:
    """How the random-label CNN fits: share of labels permuted, last train accuracy on them, val accuracy."""
    cfg = (meta.get("config") or {}).get("cnn") or {}
    data_seed = ((meta.get("config") or {}).get("data") or {}).get("seed")
    seed = cfg.get("seed", -1)
    hist = meta.get("history") or [{}]
    return {"random_labels": cfg.get("random_labels", 0.0), "train_accuracy": hist[-1].get("train_accuracy"),
            "val_accuracy": meta.get("val_accuracy"), "epochs": meta.get("epoch"),
            "seed": seed if seed is not None and seed >= 0 else data_seed,
            "classes": len(meta.get("class_names") or [])}


def _check(ctx: EvalContext, path: str, meta: dict) -> None:
    own = ctx.cnn_meta
    for key in ("arch", "image_size", "class_names"):
        if meta.get(key) != own.get(key):
            raise UserError(f"datarand.cnn: {path} has {key} {meta.get(key)!r}, the evaluated CNN {own.get(key)!r}; "
                            f"train it with the evaluated CNN's data and cnn sections and cnn.random_labels: 1.0")
    if not (fit_of(meta)["random_labels"] or 0) > 0:
        raise UserError(f"datarand.cnn: {path} was trained on the true labels (cnn.random_labels is 0); train the "
                        f"data-randomisation CNN with --set cnn.random_labels=1.0")


class DataRandSection(Section, name="datarand", title="Sanity check: data randomisation", options=DataRandOptions,
                      order=11):
    """Similarity of each method's maps of the random-label CNN to its maps of the trained CNN."""

    def run(self, ctx: EvalContext) -> dict:
        opts = ctx.options(self.name)
        if not opts.cnn:
            ctx.notes.append("datarand: no data-randomisation CNN configured (datarand.cnn)")
            return {"cnn": ""}
        model, meta = load_cnn(opts.cnn, ctx.device)
        _check(ctx, opts.cnn, meta)
        n = min(opts.num, ctx.count)
        maps_of = maps_function(ctx, n, {})
        trained = ctx.shared(f"trained_maps:{n}", lambda: maps_of(ctx.cnn))
        rand = maps_of(model)
        ref = target_label(ctx.pf.meta)
        nan = math.nan
        rho = {m: torch.where(constant(v), torch.full((n,), nan, dtype=torch.float64), spearman_abs(rand[m], v))
               for m, v in trained.items()}
        follow = {m: torch.where(constant(rand[ref]), torch.full((n,), nan, dtype=torch.float64),
                                 same_size_spearman(v, rand[ref])) for m, v in rand.items()}
        out = {"cnn": opts.cnn, "fit": fit_of(meta), "images": n, "reference": ref, "margin": MPRT_MARGIN,
               "methods": list(trained),
               "spearman": {m: mean_ci(v) for m, v in rho.items()},
               "ssim": {m: mean_ci(metrics.ssim_or_nan(rand[m].double(), v.double())) for m, v in trained.items()},
               "follow": {m: mean_ci(v) for m, v in follow.items()},
               "gap": {g.label: mean_ci(rho[g.label] - rho[ref]) for g in ctx.gans}}
        out["verdicts"] = {g: {"passes": bool(s["mean"] <= MPRT_MARGIN + 1e-12), "gap": s}
                           for g, s in out["gap"].items() if math.isfinite(s["mean"])}
        return out

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        if not results.get("cnn"):
            report.p("No data-randomisation CNN configured (`datarand: {cnn: …}`; train one with "
                     "configs/fashion_resnet18_random_labels.yaml).")
            return
        fit = results["fit"]
        acc = fit.get("train_accuracy")
        report.p(f"The data-randomisation CNN `{results['cnn']}`: the evaluated CNN's architecture and input size, "
                 f"trained from scratch (seed {fit.get('seed')}) on train images whose labels were permuted "
                 f"({fit['random_labels']:.0%} of them), {fit.get('epochs')} epochs; it fits its permuted train "
                 f"labels to " + (f"**{acc:.1%}**" if acc is not None else "an unrecorded accuracy")
                 + f" (chance {1 / max(fit.get('classes') or 1, 1):.0%}) and scores {fit.get('val_accuracy') or 0:.1%} on the true val labels. "
                 f"On **N = {results['images']} images**, priors and target are recomputed from it for the trained "
                 f"CNN's explained class; every method's maps are compared with its own maps of the trained CNN "
                 f"(Spearman ρ of |maps|, SSIM) and with the random-label CNN's own {results['reference']} "
                 f"(follow); mean [95 % bootstrap interval]. Pass: at most {results['margin']:.2f} above "
                 f"{results['reference']}'s similarity (the MPRT criterion). No generator trained on this CNN.")
        rows = [[m, format_ci(results["spearman"][m]), format_ci(results["ssim"][m]), format_ci(results["follow"][m]),
                 format_ci(results["gap"][m]) if m in results["gap"] else "–",
                 ("pass" if results["verdicts"][m]["passes"] else "FAIL") if m in results["verdicts"] else "–"]
                for m in results["methods"]]
        report.table(Table.plain(["method", "ρ vs trained-CNN maps", "SSIM", "follow (ρ with its own target)",
                                  f"gap over {results['reference']}", "verdict"], rows))
