"""Section `mprt`: cascading model-parameter randomisation of the target CNN (Adebayo et al. 2018)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from cnnprior.core import cams, metrics
from cnnprior.core.maps import generate, live_cams, resize_maps
from cnnprior.core.report import Report, Table
from cnnprior.evaluate.sanity import (
    MPRT_MARGIN,
    explain_batched,
    format_ci,
    mean_ci,
    mprt,
    mprt_verdict,
    verdict_sentence,
)
from cnnprior.evaluate.sections.base import EvalContext, Section, option
from cnnprior.evaluate.sections.fidelity import MEAN_OF_PRIORS, baseline_choice, best_learned
from cnnprior.priors.extract import extractor_from, spec_from_sidecar

__all__ = ["mprt_chart", "MPRTOptions", "MPRTSection", "paired_references", "seed_cell", "seed_mean", "target_label", "training_seeds"]


@dataclass
class MPRTOptions:
    """Options of the `mprt` section."""

    num: int = option(64, lo=1, help="images N per randomisation step: the first N evaluated records")
    steps: int = option(0, lo=0, help="randomise down to this many stages (0 = every stage)")
    seed: int = option(1000, lo=0, help="seed of the re-initialised weights; keep it apart from the seeds of "
                                        "the randomised copies the generators trained on (priors.randomised_seeds "
                                        "writes seeds 0, 1, ...), or the test reuses networks they have seen")
    seeds: int = option(1, lo=1, help="randomise with seeds seed, seed+1, ..., seed+seeds-1: each step's "
                                      "similarities are pooled over them (N x seeds values per mean) and the "
                                      "report gives each seed's verdict as well; one seed is one draw of random "
                                      "networks, and a verdict near the margin can flip with the next")


def target_label(meta: dict) -> str:
    """'Grad-CAM (target)': the prior file's target map, named by its CAM method."""
    return f"{cams.title(meta.get('method') or cams.DEFAULT)} (target)"


def training_seeds(meta: dict) -> list[int]:
    """Seeds of the randomised-copy prior files a generator trained on (gan.randomised_share), from its meta."""
    files = (((meta.get("priors_meta") or {}).get("randomised") or {}).get("files")) or []
    found = (re.search(r"-s(\d+)\.npy$", str(f)) for f in files)
    return sorted({int(m.group(1)) for m in found if m})


def seed_mean(per_seed: list[torch.Tensor]) -> torch.Tensor:
    """Per-image mean over seeds of (N,) similarity vectors; NaN where an image has no finite value."""
    return torch.stack([v.double() for v in per_seed]).nanmean(0)


def _maps_fn(ctx: EvalContext, n: int, first: dict) -> Any:
    """maps_of(model) for sanity.mprt: every method's maps of the first n images, class fixed per image."""
    images, classes = ctx.data["image"][:n], ctx.data["explained"][:n]
    images_r = resize_maps(images, ctx.image_size).to(ctx.device)
    spec, bs = spec_from_sidecar(ctx.pf.meta), ctx.cfg.batch_size
    choice = next((c for c in (baseline_choice(g) for g in ctx.gans) if c is not None), None)
    best = None if choice is None else choice.best_prior  # the best single prior, chosen on validation

    def maps_of(model: nn.Module) -> dict[str, torch.Tensor]:
        """Each method's maps for the (possibly randomised) `model`."""
        ex = extractor_from(model, spec)
        out = explain_batched(ex, images_r, classes.to(ctx.device), bs)
        first.setdefault("target", out["target"])
        maps = {g.label: generate(g.model, images, out["priors"], bs, ctx.device) for g in ctx.gans}
        maps[target_label(ctx.pf.meta)] = out["target"]
        layer = ex.layers[ex.target_index]
        for method in cams.LIVE_BESIDES_DEFAULT:
            maps[cams.title(method)] = live_cams(model, layer, images_r, classes.to(ctx.device), method, bs).cpu()
        # the GANs' own inputs as trivial baselines: how much of the trained CNN's maps the recomputed priors keep
        # (a GAN that falls less than its inputs adds a CNN-independent map of its own)
        maps[MEAN_OF_PRIORS] = out["priors"].mean(1, keepdim=True)
        if best is not None:
            maps[f"C{best} (val)"] = out["priors"][:, best:best + 1]
        return maps

    return maps_of


def paired_references(gans: list) -> list[tuple[str, str]]:
    """(GAN, other) label pairs for paired MPRT margins: each adversarial GAN against the learned baseline with the
    higher validation r and against its own L1-only twin (`<key>_l1`), where those are evaluated."""
    best = best_learned(gans)
    pairs = []
    for g in (g for g in gans if g.adversarial):
        if best is not None:
            pairs.append((g.label, best.label))
        twin = next((t for t in gans if t.key == f"{g.key}_l1"), None)
        if twin is not None:
            pairs.append((g.label, twin.label))
    return pairs


class MPRTSection(Section, name="mprt", title="Sanity check: model-parameter randomisation (MPRT)", options=MPRTOptions,
                           order=10):
    """Similarity of each method's maps to its own trained-CNN maps as the CNN is randomised top-down."""

    def run(self, ctx: EvalContext) -> dict:
        opts = ctx.options(self.name)
        n = min(opts.num, ctx.count)
        first: dict = {}
        ref = target_label(ctx.pf.meta)
        seeds = [opts.seed + i for i in range(opts.seeds)]
        maps_of = _maps_fn(ctx, n, first)
        raws, step0 = [], None
        for seed in seeds:  # the trained CNN's maps (step 0) are computed once and shared by every seed
            raws.append(mprt(ctx.cnn, maps_of, seed, opts.steps, ref=step0))
            step0 = raws[-1]["ref"]
        stages = raws[0]["stages"]
        methods = list(raws[0]["steps"][0]["spearman"])
        pairs = paired_references(ctx.gans)
        steps = []
        for k, st in enumerate(raws[0]["steps"]):
            # each image's similarity averaged over the seeds, then mean and interval over the N images: the seeds
            # sharpen each image's value, the interval resamples images (the seeds of one image are not independent
            # samples). An image's Spearman is NaN for every seed alike (its step-0 map is constant)
            rho = {m: seed_mean([r["steps"][k]["spearman"][m] for r in raws]) for m in methods}
            ssim = {m: seed_mean([torch.as_tensor(r["steps"][k]["ssim"][m]) for r in raws]) for m in methods}
            steps.append({"step": st["step"], "randomised": st["randomised"],
                          "spearman": {m: mean_ci(v) for m, v in rho.items()},
                          "ssim": {m: mean_ci(v) for m, v in ssim.items()},
                          "gap": {g.label: mean_ci(rho[g.label] - rho[ref]) for g in ctx.gans},
                          "paired": {f"{a} − {b}": mean_ci(rho[a] - rho[b]) for a, b in pairs}})
        means = {m: [s["spearman"][m]["mean"] for s in steps] for m in methods}
        verdicts = {g.label: mprt_verdict(means, stages, g.label, ref) for g in ctx.gans}
        per_seed = {}
        for seed, r in zip(seeds, raws, strict=True):
            seed_means = {m: [float(torch.nanmean(st["spearman"][m].double())) for st in r["steps"]] for m in methods}
            per_seed[str(seed)] = {g.label: mprt_verdict(seed_means, stages, g.label, ref) for g in ctx.gans}
        stored = ctx.data["target"][:n]
        return {"images": n, "stages": stages, "methods": methods, "reference": ref,
                "steps": steps, "verdicts": verdicts, "margin": MPRT_MARGIN, "seed": opts.seed, "seeds": seeds,
                "per_seed": per_seed,
                "seen_in_training": [g.label for g in ctx.gans if set(seeds) & set(training_seeds(g.meta))],
                "training_seeds": {g.label: training_seeds(g.meta) for g in ctx.gans},
                "step0_target_l1": mean_ci(metrics.l1(first["target"], stored))}

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        report.p(f"Cascading randomisation on **N = {results['images']} images** (the first evaluated records): "
                 f"step k re-initialises the CNN's first k stages from the classifier down "
                 f"({', '.join(f'`{s}`' for s in results['stages'])}); at every step the priors and the target are "
                 f"recomputed from the randomised CNN for the **explained class of the trained CNN** (fixed per "
                 f"image, as Quantus keeps y fixed), the GANs are run on them, and Grad-CAM++ / LayerCAM are "
                 f"computed live at the target layer. The GANs' inputs are scored as trivial baselines: the mean of "
                 f"the recomputed priors and the single prior chosen on validation (a GAN that keeps more of its "
                 f"trained-CNN maps than its inputs do adds a map of its own). Similarity of each method's maps to **its own maps of the "
                 f"trained CNN** (step 0): Spearman rank correlation of |maps| and SSIM; mean [95 % bootstrap "
                 f"interval]. A method that reads the CNN falls with the randomisation; one that reads only the "
                 f"image stays high. Step-0 targets recomputed vs the prior file's: mean L1 "
                 f"{format_ci(results['step0_target_l1'])} (about 0 when the file was made with this CNN and code).")
        trained = {k: v for k, v in results.get("training_seeds", {}).items() if v}
        seeds = results.get("seeds") or [results.get("seed", 0)]
        pooled = (f"seeds {seeds[0]}–{seeds[-1]}: at each step every image's similarity is averaged over the "
                  f"{len(seeds)} randomised networks, then mean and interval are taken over the "
                  f"{results['images']} images (the interval resamples images)"
                  if len(seeds) > 1 else f"seed {seeds[0]}")
        report.p(f"Randomised weights: {pooled}"
                 + (f"; the generators trained on randomised copies with seeds "
                    f"{'; '.join(f'{k}: ' + ', '.join(map(str, v)) for k, v in trained.items())}" if trained else "")
                 + ".")
        if results.get("seen_in_training"):
            report.p(f"**Warning**: {', '.join(results['seen_in_training'])} trained on prior files from the very "
                     f"randomised networks of this test (same seed): the test is not held out for them; rerun "
                     f"with another `mprt.seed`.")
        report.p(f"Pass criterion: a GAN passes when, at every randomisation step, its mean Spearman similarity "
                 f"is at most {results['margin']:.2f} above {results['reference']}'s at that step.")
        for v in results["verdicts"].values():
            means = {m: [s["spearman"][m]["mean"] for s in results["steps"]] for m in results["methods"]}
            report.p(verdict_sentence(v, means))
        per_seed = results.get("per_seed") or {}
        if len(per_seed) > 1:
            gans = list(results["verdicts"])
            report.p(f"Each seed alone (one draw of random networks, {results['images']} images): the verdict and "
                     f"the largest gap over {results['reference']}, at the step named.")
            rows = [[seed] + [seed_cell(v[g]) for g in gans] for seed, v in per_seed.items()]
            rows.append(["passes"] + [f"{sum(v[g]['passes'] for v in per_seed.values())} of "
                                      f"{sum(math.isfinite(v[g]['worst_gap']) for v in per_seed.values())}"
                                      for g in gans])
            report.table(Table.plain(["seed"] + gans, rows))
        mprt_chart(results, folder / "mprt.png")
        report.img("mprt.png", "MPRT: similarity to the trained CNN's maps per randomisation step")
        methods = results["methods"]
        header = ["step", "randomised down to"] + [f"{m} ρ" for m in methods] + [f"{m} SSIM" for m in methods]
        rows = [[s["step"], s["randomised"]] + [format_ci(s["spearman"][m]) for m in methods]
                + [format_ci(s["ssim"][m]) for m in methods] for s in results["steps"]]
        report.table(Table.plain(header, rows))
        pairs = list(results["steps"][0].get("paired", {}))
        if pairs:
            report.p("Paired per image (Spearman ρ, each image averaged over the seeds): each GAN minus the learned "
                     "baseline with the higher validation r, and minus its L1-only twin. A negative value means the "
                     "GAN keeps less of its trained-CNN maps than the other model at that step, i.e. follows the "
                     "randomised CNN more.")
            report.table(Table.plain(["step", "randomised down to"] + pairs,
                                     [[s["step"], s["randomised"]] + [format_ci(s["paired"][p]) for p in pairs]
                                      for s in results["steps"]]))


def seed_cell(v: dict) -> str:
    """One seed's verdict in the per-seed table: pass/fail with the largest gap, or no verdict (no finite step)."""
    if not math.isfinite(v["worst_gap"]):
        return "no verdict"
    return f"{'pass' if v['passes'] else 'fail'}, {v['worst_gap']:+.3f} (`{v['worst_stage']}`)"


def mprt_chart(results: dict, path: Path) -> None:
    """Two panels (Spearman, SSIM vs randomisation step), one line per method with its 95 % interval band."""
    steps = results["steps"]
    xs = list(range(len(steps)))
    labels = ["trained" if s["step"] == 0 else s["randomised"] for s in steps]
    fig = Figure(figsize=(11.0, 4.0), dpi=100, layout="constrained")
    for ax, key, label in zip(fig.subplots(1, 2), ("spearman", "ssim"), ("Spearman ρ of |maps|", "SSIM"),
                              strict=True):
        for m in results["methods"]:
            ys = [s[key][m]["mean"] for s in steps]
            ax.plot(xs, ys, marker="o", markersize=3, label=m, linestyle="--" if m == results["reference"] else "-")
            ax.fill_between(xs, [s[key][m]["lo"] for s in steps], [s[key][m]["hi"] for s in steps], alpha=0.15)
        ax.axhline(0, color="gray", linewidth=0.6)
        if key == "spearman" and results["verdicts"]:  # the MPRT pass limit of the GANs
            limit = [s[key][results["reference"]]["mean"] + results["margin"] for s in steps[1:]]
            ax.plot(xs[1:], limit, ":", color="black", linewidth=1,
                    label=f"pass limit ({results['reference']} + {results['margin']:.2f})")
        ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("randomised down to (cumulative, top-down)")
        ax.set_ylabel(f"{label} vs trained CNN")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    seeds = results.get("seeds") or [0]
    fig.suptitle(f"MPRT, N = {results['images']} images"
                 + (f", each averaged over {len(seeds)} seeds" if len(seeds) > 1 else "") + ", explained class fixed")
    fig.savefig(path, format="png")
