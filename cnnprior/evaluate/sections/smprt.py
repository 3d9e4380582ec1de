"""Section `smprt`: smooth MPRT (Hedström et al. 2023; Quantus' SmoothMPRT).

MPRT on denoised explanations: every map is the mean of the explainer's maps of `samples` noisy copies of the image
(Gaussian noise of std `noise` × the image's value range; the last copy is the clean image), for the trained CNN
and for each randomisation step, so a similarity that only comes from one noisy map's quirks averages out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnprior.cnn.randomise import model_stages, randomise, step_labels
from cnnprior.evaluate.randomisations import parse_randomisations
from cnnprior.evaluate.sanity import (
    MPRT_MARGIN,
    constant,
    format_ci,
    mean_ci,
    mprt_verdict,
    same_size_spearman,
    spearman_abs,
)
from cnnprior.evaluate.sections.base import EvalContext, Section, option
from cnnprior.evaluate.sections.mprt import maps_function, seed_mean, target_label, trivial_floors
from cnnprior.evaluate.smprt_emprt import SMPRT_MAGNITUDE, smoothed
from cnnprior.present.report import Report, Table

__all__ = ["SMPRTOptions", "SMPRTSection"]


@dataclass
class SMPRTOptions:
    """Options of the `smprt` section."""

    num: int = option(64, lo=1, help="images N: the first N evaluated records")
    samples: int = option(8, lo=1, help="noisy copies per image (Quantus: 50); each is one CAM pass + the generators")
    noise: float = option(SMPRT_MAGNITUDE, lo=0.0, hi=1.0, help="noise std / the image's value range (Quantus: 0.1)")
    randomisations: str = option("bottom_up,top_down", help="cascades to run (Quantus' default: bottom_up); as "
                                                            "mprt.randomisations, without `full`")
    seed: int = option(1000, lo=0, help="first seed of the re-initialised weights (as mprt.seed)")
    seeds: int = option(1, lo=1, help="seeds seed, ..., seed+seeds-1, each image averaged over them")


class SMPRTSection(Section, name="smprt", title="Sanity check: smooth MPRT (sMPRT)", options=SMPRTOptions, order=12):
    """MPRT with each map averaged over noisy copies of the image."""

    def run(self, ctx: EvalContext) -> dict:
        opts = ctx.options(self.name)
        specs = [s for s in parse_randomisations(opts.randomisations) if s[1] != "full"]
        n = min(opts.num, ctx.count)
        images = ctx.data["image"][:n]
        maps_of = maps_function(ctx, n, {})
        ref = target_label(ctx.pf.meta)

        def smooth(model: torch.nn.Module) -> dict[str, torch.Tensor]:  # same noise for every model (seed 0)
            return smoothed(lambda x: maps_of(model, x), images, opts.samples, opts.noise, seed=0)

        trained = smooth(ctx.cnn)
        flat = {m: constant(v) for m, v in trained.items()}
        seeds = [opts.seed + i for i in range(opts.seeds)]
        blocks = []
        for name, order, init in specs:
            labels = step_labels(ctx.cnn, order)
            per_step, follows, flats = [], [], []
            for k in range(1, len(model_stages(ctx.cnn)) + 1):
                rows: dict[str, list[torch.Tensor]] = {m: [] for m in trained}
                follow: dict[str, list[torch.Tensor]] = {m: [] for m in trained}
                flat_k: dict[str, list[torch.Tensor]] = {m: [] for m in trained}
                for seed in seeds:
                    maps = smooth(randomise(ctx.cnn, order, k, seed, init))
                    own = constant(maps[ref])
                    for m, v in maps.items():
                        nan = torch.full((n,), float("nan"), dtype=torch.float64)
                        rows[m].append(torch.where(flat[m], nan, spearman_abs(v, trained[m])))
                        follow[m].append(torch.where(own, nan, same_size_spearman(v, maps[ref])))
                        flat_k[m].append(constant(v).double())
                per_step.append(rows)
                follows.append(follow)
                flats.append(flat_k)
            steps = [{"step": k + 1, "randomised": labels[k + 1],
                      "spearman": {m: mean_ci(seed_mean(v)) for m, v in rows.items()},
                      "follow": {m: mean_ci(seed_mean(v)) for m, v in follows[k].items()}}
                     for k, rows in enumerate(per_step)]
            means = {m: [1.0] + [s["spearman"][m]["mean"] for s in steps] for m in trained}
            follow_means = {m: [1.0] + [s["follow"][m]["mean"] for s in steps] for m in trained}
            shares = {m: [float(flat[m].double().mean())] + [float(torch.stack(f[m]).mean()) for f in flats]
                      for m in trained}
            verdicts = {g.label: mprt_verdict(means, labels[1:], g.label, ref, follow=follow_means,
                                              floors=trivial_floors(list(trained)), constant_share=shares)
                        for g in ctx.gans}
            blocks.append({"name": name, "order": order, "init": init, "steps": steps, "verdicts": verdicts})
        return {"images": n, "samples": opts.samples, "noise": opts.noise, "seeds": seeds, "reference": ref,
                "margin": MPRT_MARGIN, "methods": list(trained), "randomisations": blocks}

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        seeds = results["seeds"]
        report.p(f"sMPRT on **N = {results['images']} images**: each map is the mean over {results['samples']} "
                 f"noisy copies of the image (Gaussian, std {results['noise']} × the image's value range; the last "
                 f"copy clean; the same copies for every network), for the trained CNN and for each step; Spearman ρ "
                 f"of |smoothed maps| to the trained CNN's smoothed maps, each image averaged over seeds "
                 f"{seeds[0]}–{seeds[-1]}, mean [95 % bootstrap interval]. Pass: the MPRT rules at every step "
                 f"(similarity within ±{results['margin']:.2f} of {results['reference']}'s, not degenerate, "
                 f"following the randomised CNN's smoothed {results['reference']} at least as well as the trivial "
                 f"baselines of its own inputs, less {results['margin']:.2f}).")
        methods = results["methods"]
        for b in results["randomisations"]:
            verdicts = "; ".join(f"{g}: {'pass' if v['passes'] else 'FAIL (' + ', '.join(v.get('reasons', [])) + ')'}"
                                 f", largest gap {v['worst_gap']:+.3f} at `{v['worst_stage']}`"
                                 for g, v in b["verdicts"].items())
            report.p(f"**`{b['name']}`** — {verdicts or 'no generator'}.")
            report.table(Table.plain(["step", "randomised"] + methods,
                                     [[s["step"], s["randomised"]] + [format_ci(s["spearman"][m]) for m in methods]
                                      for s in b["steps"]]))
