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

from cnnprior.cnn.randomise import full_reinit, model_stages
from cnnprior.evaluate.randomisations import (
    check_networks,
    parse_randomisations,
    repeated_steps,
    training_networks,
    training_randomisations,
    training_seeds,
)
from cnnprior.evaluate.sanity import (
    MPRT_MARGIN,
    constant,
    emprt_verdict,
    explain_batched,
    format_ci,
    mean_ci,
    mprt,
    mprt_verdict,
    same_size_spearman,
    spearman_abs,
    step_means,
    verdict_sentence,
)
from cnnprior.evaluate.sections.base import EvalContext, Section, option
from cnnprior.evaluate.sections.fidelity import MEAN_OF_PRIORS, baseline_choice, best_learned
from cnnprior.evaluate.smprt_emprt import emprt_score
from cnnprior.gan.checkpoint import GeneratorMeta
from cnnprior.maps import metrics
from cnnprior.maps.ops import generate, resize_maps
from cnnprior.present.report import Report, Table
from cnnprior.priors import cams
from cnnprior.priors.cams import live_cams
from cnnprior.priors.extract import extractor_from
from cnnprior.priors.spec import spec_from_sidecar

__all__ = ["maps_function", "mprt_chart", "MPRTOptions", "MPRTSection", "paired_references", "sanity_weight",
           "seed_cell", "seed_mean", "target_label", "trivial_floors"]


@dataclass
class MPRTOptions:
    """Options of the `mprt` section."""

    num: int = option(64, lo=1, help="images N per randomisation step: the first N evaluated records")
    steps: int = option(0, lo=0, help="randomise down to this many stages (0 = every stage)")
    seed: int = option(1000, lo=0, help="seed of the re-initialised weights; keep it apart from the seeds of "
                                        "the randomised copies the generators trained on (priors.randomised_seeds "
                                        "writes seeds 0, 1, ...), or the test reuses networks they have seen")
    seeds: int = option(1, lo=1, help="randomise with seeds seed, seed+1, ..., seed+seeds-1: at each step every "
                                      "image's similarity, follow similarity and constant-map flag are first "
                                      "averaged over the seeds, then over the N images (N values per mean; the "
                                      "interval resamples images). The verdict applies the three rules to these "
                                      "means at every step: similarity within the margin of the reference's, "
                                      "two-sided; degenerate (no finite similarity, or a constant-map share above "
                                      "one half where the reference's is at most one half); follow (it follows the "
                                      "randomised CNN's own reference map at least as well as the best trivial "
                                      "baseline does, less the margin). The report gives each seed's verdict as "
                                      "well; one seed is one draw of random networks, and a verdict near the "
                                      "margin can flip with the next")
    randomisations: str = option("top_down", help="comma-separated randomisations, each run over every seed: "
                                                  "top_down (cascade from the classifier down), bottom_up (cascade "
                                                  "from the stem up), independent (one stage at a time), full (every "
                                                  "stage at once); `:<init>` picks the re-initialisation "
                                                  "(default = PyTorch's reset_parameters, kaiming_normal, "
                                                  "xavier_uniform, normal; e.g. full:kaiming_normal)")
    emprt_bins: int = option(100, lo=2, help="eMPRT: histogram bins of the entropy (Quantus: 100)")


def target_label(meta: dict) -> str:
    """'Grad-CAM (target)': the prior file's target map, named by its CAM method."""
    return f"{cams.title(meta.get('method') or cams.DEFAULT)} (target)"


def seed_mean(per_seed: list[torch.Tensor]) -> torch.Tensor:
    """Per-image mean over seeds of (N,) similarity vectors; NaN where an image has no finite value."""
    return torch.stack([v.double() for v in per_seed]).nanmean(0)


def maps_function(ctx: EvalContext, n: int, first: dict) -> Any:
    """maps_of(model, images=None) for the randomisation checks: every method's maps of the first n evaluated
    images (or of `images`, e.g. their noisy copies), explained class fixed per image to the trained CNN's."""
    stored, classes = ctx.data["image"][:n], ctx.data["explained"][:n]
    spec, bs = spec_from_sidecar(ctx.pf.meta), ctx.cfg.batch_size
    choice = next((c for c in (baseline_choice(g) for g in ctx.gans) if c is not None), None)
    best = None if choice is None else choice.best_prior  # the best single prior, chosen on validation

    def maps_of(model: nn.Module, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each method's maps for the (possibly randomised) `model`."""
        images = stored if images is None else images
        images_r = resize_maps(images, ctx.image_size).to(ctx.device)
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


def sanity_weight(meta: GeneratorMeta) -> float:
    """gan.sanity_weight a generator trained with (0 when off or unrecorded), from its meta."""
    return float(meta.gan.get("sanity_weight") or 0.0)


def _run_one(ctx: EvalContext, spec: tuple[str, str, str], seeds: list[int], maps_of: Any, step0: dict,
             opts: MPRTOptions, ref: str, repeated: dict[int, str] | None = None) -> dict:
    """One randomisation over every seed: per step each method's similarity to its trained-CNN maps and to the
    randomised CNN's own target (`follow`), each image averaged over the seeds, then mean and interval over the
    images; verdicts (`mprt_verdict` on `step_means` of every seed together, and of each seed alone); eMPRT at the
    last step."""
    name, order, init = spec
    raws = []
    for seed in seeds:
        if order == "full":
            rnd = maps_of(full_reinit(ctx.cnn, seed, init))
            raws.append(_full_steps(step0, rnd, ref))
        else:
            raws.append(mprt(ctx.cnn, maps_of, seed, opts.steps, ref=step0, order=order, init=init, follow=ref))
    methods = list(raws[0]["steps"][0]["spearman"])
    pairs = paired_references(ctx.gans)
    steps = []
    for k, st in enumerate(raws[0]["steps"]):
        rho = {m: seed_mean([r["steps"][k]["spearman"][m] for r in raws]) for m in methods}
        ssim = {m: seed_mean([torch.as_tensor(r["steps"][k]["ssim"][m]) for r in raws]) for m in methods}
        follow = {m: seed_mean([r["steps"][k]["follow"][m] for r in raws]) for m in methods}
        steps.append({"step": st["step"], "randomised": st["randomised"],
                      "spearman": {m: mean_ci(v) for m, v in rho.items()},
                      "ssim": {m: mean_ci(v) for m, v in ssim.items()},
                      "follow": {m: mean_ci(v) for m, v in follow.items()},
                      "gap": {g.label: mean_ci(rho[g.label] - rho[ref]) for g in ctx.gans},
                      "paired": {f"{a} − {b}": mean_ci(rho[a] - rho[b]) for a, b in pairs}})
    labels = [st["randomised"] for st in steps[1:]]
    means = {m: [s["spearman"][m]["mean"] for s in steps] for m in methods}
    floors = trivial_floors(methods)
    judged = step_means(*raws)
    repeated = repeated or {}
    verdicts = {g.label: mprt_verdict(means, labels, g.label, ref, follow=judged["follow"], floors=floors,
                                      constant_share=judged["constant_share"], skip_steps=list(repeated))
                for g in ctx.gans}
    per_seed = {}
    for seed, r in zip(seeds, raws, strict=True):
        own = step_means(r)
        per_seed[str(seed)] = {g.label: mprt_verdict(own["spearman"], labels, g.label, ref, follow=own["follow"],
                                                     floors=floors, constant_share=own["constant_share"],
                                                     skip_steps=list(repeated)) for g in ctx.gans}
    # eMPRT (Quantus' EfficientMPRT): the rise of each map's histogram entropy from the trained CNN to the last step
    emprt = {m: mean_ci(seed_mean([emprt_score(step0[m], r["steps"][-1]["maps"][m], opts.emprt_bins)
                                   for r in raws])) for m in methods}
    emprt_verdicts = {g.label: emprt_verdict({m: v["mean"] for m, v in emprt.items()}, g.label, ref)
                      for g in ctx.gans}
    stage_names = [n for n, _ in model_stages(ctx.cnn)]
    mine = check_networks(len(stage_names), order, init, seeds)
    seen = [g.label for g in ctx.gans if training_networks(g.meta, stage_names) & mine]
    trained_like = [g.label for g in ctx.gans
                    if any(t["order"] == order and t["init"] == init for t in training_randomisations(g.meta))]
    return {"name": name, "order": order, "init": init, "stages": labels, "steps": steps, "verdicts": verdicts,
            "per_seed": per_seed, "emprt": emprt, "emprt_verdicts": emprt_verdicts, "floors": floors,
            "repeated_steps": {str(k): v for k, v in repeated.items()}, "seen_in_training": seen, "same_scheme_in_training": trained_like}


def trivial_floors(methods: list[str]) -> list[str]:
    """The trivial baselines among the methods, made of a generator's own inputs (the mean of the recomputed
    priors, the single prior chosen on validation): the follow rule's floor."""
    return [m for m in methods if m == MEAN_OF_PRIORS or re.fullmatch(r"C\d+ \(val\)", m)]


def _full_steps(step0: dict, maps: dict, ref: str) -> dict:
    """`mprt`'s result shape for the one-step randomisation `full` (every stage at once)."""
    flat = {m: constant(v) for m, v in step0.items()}
    own = constant(maps[ref])

    def nan_where(mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, torch.full_like(v, math.nan), v)

    first = {"step": 0, "randomised": "none",
             "spearman": {m: nan_where(flat[m], spearman_abs(v, v)) for m, v in step0.items()},
             "ssim": {m: metrics.ssim_or_nan(v.double(), v.double()) for m, v in step0.items()},
             "follow": {m: nan_where(constant(step0[ref]), same_size_spearman(v, step0[ref])) for m, v in step0.items()},
             "constant": {m: constant(v) for m, v in step0.items()}}
    last = {"step": 1, "randomised": "every stage", "maps": maps,
            "spearman": {m: nan_where(flat[m], spearman_abs(v, step0[m])) for m, v in maps.items()},
            "ssim": {m: metrics.ssim_or_nan(v.double(), step0[m].double()) for m, v in maps.items()},
            "follow": {m: nan_where(own, same_size_spearman(v, maps[ref])) for m, v in maps.items()},
            "constant": {m: constant(v) for m, v in maps.items()}}
    return {"steps": [first, last]}


class MPRTSection(Section, name="mprt", title="Sanity check: model-parameter randomisation (MPRT)", options=MPRTOptions,
                           order=10):
    """Similarity of each method's maps to its own trained-CNN maps as the CNN is randomised (several schemes)."""

    def run(self, ctx: EvalContext) -> dict:
        opts = ctx.options(self.name)
        specs = parse_randomisations(opts.randomisations)
        n = min(opts.num, ctx.count)
        first: dict = {}
        ref = target_label(ctx.pf.meta)
        seeds = [opts.seed + i for i in range(opts.seeds)]
        maps_of = maps_function(ctx, n, first)
        step0 = ctx.shared(f"trained_maps:{n}", lambda: maps_of(ctx.cnn))  # shared with datarand / smprt
        repeats = repeated_steps(specs, len(model_stages(ctx.cnn)))
        blocks = [_run_one(ctx, spec, seeds, maps_of, step0, opts, ref, rep) for spec, rep in zip(specs, repeats, strict=True)]
        head = blocks[0]  # the first randomisation's results also sit at the top level (as before)
        stored = ctx.data["target"][:n]
        return {"images": n, "stages": head["stages"], "methods": list(head["steps"][0]["spearman"]),
                "reference": ref, "steps": head["steps"], "verdicts": head["verdicts"], "margin": MPRT_MARGIN,
                "seed": opts.seed, "seeds": seeds, "per_seed": head["per_seed"], "randomisations": blocks,
                "seen_in_training": sorted({g for b in blocks for g in b["seen_in_training"]}),
                "training_seeds": {g.label: training_seeds(g.meta) for g in ctx.gans},
                "training_randomisations": {g.label: training_randomisations(g.meta) for g in ctx.gans},
                "sanity_weights": {g.label: sanity_weight(g.meta) for g in ctx.gans},
                "emprt_bins": opts.emprt_bins,
                "step0_target_l1": mean_ci(metrics.l1(step0[ref], stored))}

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        blocks = results.get("randomisations") or [{"name": "top_down", "order": "top_down", "init": "default",
                                                    **{k: results[k] for k in ("stages", "steps", "verdicts",
                                                                               "per_seed")}}]
        report.p(f"Model-parameter randomisation on **N = {results['images']} images** (the first evaluated "
                 f"records). Randomisations: {', '.join('`' + b['name'] + '`' for b in blocks)} — `top_down`: step k "
                 f"re-initialises the CNN's first k stages from the classifier down; `bottom_up`: its last k stages "
                 f"from the stem up; `independent`: stage k alone; `full`: every stage at once; `:<init>` names the "
                 f"re-initialisation (default: PyTorch's reset_parameters; kaiming_normal / xavier_uniform / normal "
                 f"with batch norms set to identity). At every step the priors and the target are recomputed from "
                 f"the randomised CNN for the **explained class of the trained CNN** (fixed per image, as Quantus "
                 f"keeps y fixed), the generators are run on them, and Grad-CAM++ / LayerCAM are computed live at "
                 f"the target layer. The GANs' inputs are scored as trivial baselines: the mean of the recomputed "
                 f"priors and the single prior chosen on validation. Columns: similarity of each method's maps to "
                 f"**its own maps of the trained CNN** (Spearman ρ of |maps|; SSIM as Quantus' ssim), and "
                 f"**follow** = Spearman ρ with the **randomised CNN's own {results['reference']}** (does the "
                 f"explainer track the new network, not only leave the old one?); mean [95 % bootstrap interval]. "
                 f"Step-0 targets recomputed vs the prior file's: mean L1 {format_ci(results['step0_target_l1'])}.")
        seeds = results.get("seeds") or [results.get("seed", 0)]
        report.p(f"Randomised weights: seeds {seeds[0]}–{seeds[-1]}: at each step every image's similarity is "
                 f"averaged over the {len(seeds)} randomised networks, then mean and interval are taken over the "
                 f"{results['images']} images (the interval resamples images)." if len(seeds) > 1 else
                 f"Randomised weights: seed {seeds[0]}.")
        trained = results.get("training_randomisations") or {}
        report.p("What the generators trained on: " + ("; ".join(
            f"{g}: " + (", ".join(f"`{t['order']}` cascade, init `{t['init']}`, seeds "
                                  f"{', '.join(map(str, t['seeds']))}" for t in ts) if ts else "no randomised CNN")
            for g, ts in trained.items()) or "–") + ". Every other randomisation below is held out for them.")
        weighted = {g: w for g, w in (results.get("sanity_weights") or {}).items() if w}
        if weighted:
            report.p("Trained with the randomisation term (`gan.sanity_weight`: on those randomised copies, a map may "
                     "keep no more of the trained CNN's map than the copy's Grad-CAM does): " + "; ".join(
                         f"{g}: weight {w:g}" for g, w in weighted.items()) + ". It was trained towards this "
                     "test's criterion on the cascade and seeds named above; the other randomisations and seeds "
                     "stay held out.")
        if results.get("seen_in_training"):
            report.p(f"**Warning**: {', '.join(results['seen_in_training'])} trained on prior files from the very "
                     f"randomised networks of this test (same scheme and seed): the test is not held out for them; "
                     f"rerun with another `mprt.seed`.")
        floors = " and ".join(blocks[0].get("floors") or []) or "its trivial baselines"
        report.p(f"Pass criterion (each rule fails planted explainers: a constant map, the image, a fixed map, an "
                 f"inverted map; tests/test_planted.py): a generator passes a randomisation when, at every step, "
                 f"(1) its mean Spearman similarity is within ±{results['margin']:.2f} of {results['reference']}'s "
                 f"(two-sided), (2) its maps are not constant for most images where {results['reference']}'s are "
                 f"not, and (3) it follows the randomised CNN's own {results['reference']} at least as well as "
                 f"{floors} (its own inputs), less {results['margin']:.2f}. A step that makes the same networks as a "
                 f"step of a randomisation above it is shown but judged once. eMPRT passes when the complexity rise "
                 f"is within ±{results['margin']:.2f} of {results['reference']}'s.")
        self._summary(report, results, blocks)
        for i, b in enumerate(blocks):
            self._block(report, results, b, folder, i)

    @staticmethod
    def _summary(report: Report, results: dict, blocks: list[dict]) -> None:
        gans = list(blocks[0]["verdicts"])
        if not gans:
            return
        rows = []
        for b in blocks:
            row = [f"`{b['name']}`"]
            for g in gans:
                v = b["verdicts"][g]
                note = " (trained on this scheme)" if g in b.get("same_scheme_in_training", []) else ""
                why = "" if v["passes"] else f" ({', '.join(v.get('reasons') or [])})"
                row.append(("–" if not math.isfinite(v["worst_gap"]) else
                            f"{'pass' if v['passes'] else 'FAIL'}{why}, {v['worst_gap']:+.3f} at `{v['worst_stage']}`")
                           + note)
            for g in gans:
                e = (b.get("emprt_verdicts") or {}).get(g)
                row.append("–" if e is None else f"{'pass' if e['passes'] else 'FAIL'}, {e['gap']:+.3f}")
            rows.append(row)
        report.p("Verdicts (MPRT: the failed rules and the largest gap from the reference at the step named; eMPRT: "
                 "complexity rise minus the reference's; each image averaged over the seeds, then over the images):")
        report.table(Table.plain(["randomisation"] + [f"{g} MPRT" for g in gans] + [f"{g} eMPRT" for g in gans], rows))

    @staticmethod
    def _block(report: Report, results: dict, b: dict, folder: Path, i: int) -> None:
        report.p(f"**Randomisation `{b['name']}`** (order {b['order']}, init {b['init']})."
                 + ("".join(f" Step {k} = {same} (judged there)." for k, same in (b.get("repeated_steps") or {}).items())))
        for v in b["verdicts"].values():
            means = {m: [s["spearman"][m]["mean"] for s in b["steps"]] for m in b["steps"][0]["spearman"]}
            report.p(verdict_sentence(v, means))
        per_seed = b.get("per_seed") or {}
        if len(per_seed) > 1 and b["verdicts"]:
            gans = list(b["verdicts"])
            rows = [[seed] + [seed_cell(v[g]) for g in gans] for seed, v in per_seed.items()]
            rows.append(["passes"] + [f"{sum(v[g]['passes'] for v in per_seed.values())} of "
                                      f"{sum(math.isfinite(v[g]['worst_gap']) for v in per_seed.values())}"
                                      for g in gans])
            report.p("Each seed alone (one draw of random networks): the verdict and the largest gap.")
            report.table(Table.plain(["seed"] + gans, rows))
        png = "mprt.png" if i == 0 else f"mprt-{re.sub(r'[^a-z0-9]+', '-', b['name'].lower())}.png"
        mprt_chart({**results, "steps": b["steps"], "verdicts": b["verdicts"]}, folder / png, b["name"])
        report.img(png, f"MPRT ({b['name']}): similarity to the trained CNN's maps per randomisation step")
        methods = list(b["steps"][0]["spearman"])
        header = ["step", "randomised"] + [f"{m} ρ" for m in methods] + [f"{m} SSIM" for m in methods]
        rows = [[s["step"], s["randomised"]] + [format_ci(s["spearman"][m]) for m in methods]
                + [format_ci(s["ssim"][m]) for m in methods] for s in b["steps"]]
        report.table(Table.plain(header, rows))
        if "follow" in b["steps"][0]:
            report.p(f"Follow: Spearman ρ of each method's map with the randomised CNN's own "
                     f"{results['reference']} at the same step ({results['reference']} itself: 1).")
            report.table(Table.plain(["step", "randomised"] + methods,
                                     [[s["step"], s["randomised"]] + [format_ci(s["follow"][m]) for m in methods]
                                      for s in b["steps"]]))
        pairs = list(b["steps"][0].get("paired", {}))
        if pairs:
            report.p("Paired per image (Spearman ρ, each image averaged over the seeds): each GAN minus the learned "
                     "baseline with the higher validation r, and minus its L1-only twin (negative: the GAN follows "
                     "the randomised CNN more).")
            report.table(Table.plain(["step", "randomised"] + pairs,
                                     [[s["step"], s["randomised"]] + [format_ci(s["paired"][p]) for p in pairs]
                                      for s in b["steps"]]))
        if b.get("emprt"):
            report.p(f"eMPRT (Quantus' EfficientMPRT, {results.get('emprt_bins', 100)} bins): relative rise of each "
                     f"map's histogram entropy from the trained CNN to the last step, (H_random − H_trained) / "
                     f"H_trained; higher means the explanation turns more complex (noisier) when the CNN is "
                     f"randomised: "
                     + "; ".join(f"{m} {format_ci(v)}" for m, v in b["emprt"].items()) + ".")


def seed_cell(v: dict) -> str:
    """One seed's verdict in the per-seed table: pass/fail with the largest gap, or no verdict (no finite step)."""
    if not math.isfinite(v["worst_gap"]):
        return "no verdict"
    return f"{'pass' if v['passes'] else 'fail'}, {v['worst_gap']:+.3f} (`{v['worst_stage']}`)"


def mprt_chart(results: dict, path: Path, name: str = "top_down") -> None:
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
        ax.set_xlabel(f"randomisation step ({name})")
        ax.set_ylabel(f"{label} vs trained CNN")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    seeds = results.get("seeds") or [0]
    fig.suptitle(f"MPRT, N = {results['images']} images"
                 + (f", each averaged over {len(seeds)} seeds" if len(seeds) > 1 else "") + ", explained class fixed")
    fig.savefig(path, format="png")
