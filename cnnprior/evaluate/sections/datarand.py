"""Section `datarand`: the data-randomisation test (Adebayo et al. 2018, §5).

A CNN of the same architecture trained on the same kind of images with permuted labels (the classifier stage with
`cnn.random_labels: 1.0`) has memorised noise: an explainer that reads the CNN must give it maps unlike those of the
CNN trained on the true labels. The explained class stays the trained CNN's, per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnprior.cnn.model import load_cnn
from cnnprior.core.errors import UserError
from cnnprior.evaluate.sanity import (
    MPRT_MARGIN,
    format_ci,
    mean_ci,
    mprt_verdict,
    one_step_scores,
)
from cnnprior.evaluate.sections.base import EvalContext, Section, option
from cnnprior.evaluate.sections.mprt import maps_function, seed_mean, target_label, trivial_floors
from cnnprior.maps import metrics
from cnnprior.present.report import Report, Table

__all__ = ["CHANCE_TOLERANCE", "cnn_paths", "DataRandOptions", "DataRandSection", "fit_of"]

# A random-label CNN's accuracy on the true val labels must lie within this of chance (1 / classes). Off chance either
# way, its predictions carry information about the true classes: above, e.g. from labels not fully permuted; below,
# e.g. from a CNN that learned the images' classes and maps each to another label (a CNN that cannot memorise its
# permuted labels may learn the most frequent permuted label of each visual class). The test does not apply cleanly.
CHANCE_TOLERANCE = 0.05


@dataclass
class DataRandOptions:
    """Options of the `datarand` section."""

    cnn: str = option("", file=True, help="the data-randomisation CNN: the evaluated CNN's architecture and input "
                                          "size, trained with cnn.random_labels: 1.0 (configs/"
                                          "fashion_resnet18_random_labels.yaml)")
    cnns: str = option("", help="more data-randomisation CNNs (comma-separated checkpoints, e.g. other seeds of the "
                                "same recipe): the verdict pools every image's similarity over all of them")
    num: int = option(64, lo=1, help="images N: the first N evaluated records")


def cnn_paths(opts: DataRandOptions) -> list[str]:
    """Every data-randomisation CNN named by `cnn` and `cnns`, each an existing file (one line where not)."""
    paths = [p for p in [opts.cnn, *opts.cnns.split(",")] if p.strip()]
    for path in paths:
        if not Path(path.strip()).is_file():
            raise UserError(f"datarand.cnns: {path.strip()}: checkpoint not found (train it with "
                            f"configs/fashion_resnet18_random_labels.yaml and --set cnn.seed=<seed>)")
    return [p.strip() for p in paths]


def fit_of(meta: dict) -> dict:
    """How the random-label CNN fits: share of labels permuted, last train accuracy on them, val accuracy."""
    cfg = (meta.get("config") or {}).get("cnn") or {}
    data_seed = ((meta.get("config") or {}).get("data") or {}).get("seed")
    seed = cfg.get("seed", -1)
    hist = meta.get("history") or [{}]
    classes = len(meta.get("class_names") or [])
    val = meta.get("val_accuracy")
    chance = 1 / classes if classes else None
    return {"random_labels": cfg.get("random_labels", 0.0), "train_accuracy": hist[-1].get("train_accuracy"),
            "val_accuracy": val, "epochs": meta.get("epoch"),
            "seed": seed if seed is not None and seed >= 0 else data_seed, "classes": classes, "chance": chance,
            "at_chance": None if val is None or chance is None else bool(abs(val - chance) <= CHANCE_TOLERANCE)}


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
        paths = cnn_paths(opts)
        if not paths:
            ctx.notes.append("datarand: no data-randomisation CNN configured (datarand.cnn)")
            return {"cnn": ""}
        models = []
        for path in paths:  # every CNN checked before any work
            model, meta = load_cnn(path, ctx.device)
            _check(ctx, path, meta)
            models.append((model, meta))
        n = min(opts.num, ctx.count)
        maps_of = maps_function(ctx, n, {})
        trained = ctx.shared(f"trained_maps:{n}", lambda: maps_of(ctx.cnn))
        ref = target_label(ctx.pf.meta)
        randomised, ssims, fits = [], [], []
        for model, meta in models:
            randomised.append(maps_of(model))
            ssims.append({m: metrics.ssim_or_nan(randomised[-1][m].double(), v.double()) for m, v in trained.items()})
            fits.append(fit_of(meta))
        scores = one_step_scores(trained, randomised, ref)
        rho, follow = scores["spearman"], scores["follow"]
        out = {"cnn": paths[0], "cnns": paths, "fit": fits[0], "fits": fits, "images": n, "reference": ref,
               "margin": MPRT_MARGIN, "methods": list(trained),
               "spearman": {m: mean_ci(v) for m, v in rho.items()},
               "ssim": {m: mean_ci(seed_mean([torch.as_tensor(s[m]) for s in ssims])) for m in trained},
               "follow": {m: mean_ci(v) for m, v in follow.items()},
               "gap": {g.label: mean_ci(rho[g.label] - rho[ref]) for g in ctx.gans},
               "at_chance": all(f["at_chance"] is not False for f in fits)}
        out["verdicts"] = {g.label: {**mprt_verdict(scores["means"], ["random labels"], g.label, ref,
                                                    follow=scores["follow_means"], floors=trivial_floors(list(trained)),
                                                    constant_share=scores["constant_share"]),
                                     "gap": out["gap"][g.label]} for g in ctx.gans}
        return out

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        if not results.get("cnn"):
            report.p("No data-randomisation CNN configured (`datarand: {cnn: …}`; train one with "
                     "configs/fashion_resnet18_random_labels.yaml).")
            return
        fits, paths = results.get("fits") or [results["fit"]], results.get("cnns") or [results["cnn"]]
        lines = []
        for path, fit in zip(paths, fits, strict=True):
            acc, chance = fit.get("train_accuracy"), 1 / max(fit.get("classes") or 1, 1)
            val = fit.get("val_accuracy") or 0
            lines.append(f"`{path}` (seed {fit.get('seed')}, {fit['random_labels']:.0%} of the labels permuted, "
                         f"{fit.get('epochs')} epochs): fits its permuted train labels to "
                         + (f"**{acc:.1%}**" if acc is not None else "an unrecorded accuracy")
                         + f", {val:.1%} on the true val labels (chance {chance:.0%}"
                         + (", **not at chance: its predictions carry information about the true classes**"
                            if fit.get("at_chance") is False
                            else f", within {CHANCE_TOLERANCE:.2f} of it")
                         + ")")
        report.p("The data-randomisation CNNs: the evaluated CNN's architecture and input size, trained from scratch "
                 "on train images whose labels were permuted — " + "; ".join(lines) + ". "
                 f"On **N = {results['images']} images**, priors and target are recomputed from each for the trained "
                 f"CNN's explained class; every method's maps are compared with its own maps of the trained CNN "
                 f"(Spearman ρ of |maps|, SSIM) and with the random-label CNN's own {results['reference']} "
                 f"(follow); each image is averaged over the {len(paths)} CNN(s), then mean [95 % bootstrap "
                 f"interval] over images. Pass: the MPRT rules (similarity within ±{results['margin']:.2f} of "
                 f"{results['reference']}'s, not degenerate, following the random-label CNN's {results['reference']}"
                 f" at least as well as the trivial baselines of its own inputs, less {results['margin']:.2f}). No "
                 f"generator trained on these CNNs.")

        def verdict(m: str) -> str:
            v = results["verdicts"].get(m)
            if v is None:
                return "–"
            return "pass" if v["passes"] else "FAIL (" + ", ".join(v.get("reasons") or ["similarity"]) + ")"

        rows = [[m, format_ci(results["spearman"][m]), format_ci(results["ssim"][m]), format_ci(results["follow"][m]),
                 format_ci(results["gap"][m]) if m in results["gap"] else "–",
                 verdict(m)]
                for m in results["methods"]]
        report.table(Table.plain(["method", "ρ vs trained-CNN maps", "SSIM", "follow (ρ with its own target)",
                                  f"gap over {results['reference']}", "verdict"], rows))
