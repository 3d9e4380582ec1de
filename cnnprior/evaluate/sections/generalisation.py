"""Section `generalisation`: the same generators' fidelity on other held-out prior files (other CNNs or data)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnprior.core.errors import UserError
from cnnprior.evaluate.sanity import ci_row, margin_row
from cnnprior.evaluate.sections.base import EvalContext, EvalSet, Section
from cnnprior.evaluate.sections.fidelity import COLUMNS, MEAN_OF_PRIORS, fidelity_per_image
from cnnprior.gan.checkpoint import load_generator
from cnnprior.maps import metrics
from cnnprior.maps.ops import generate
from cnnprior.present.report import Estimate, Report, Table
from cnnprior.priors.read import read_priors

__all__ = ["best_single_prior", "GeneralisationSection", "generalise"]


def _skip_reason(gans: list, fit: list, size: int, n: int) -> str:
    if not gans:
        return "no GAN checkpoints configured"
    if not fit:
        return (f"S={size}, n={n} do not match the GANs' "
                + ", ".join(f"{g.label} S={g.size_n[0]}, n={g.size_n[1]}" for g in gans))
    return ""


def best_single_prior(files: list[str], count: int) -> dict:
    """The prior index with the highest mean r to the target over the first `count` records of each val file
    (pooled over their images): the best single prior chosen without the evaluated CNN's own files."""
    sums, total = None, 0
    for name in files:
        pf = read_priors(name)
        if pf.meta.get("split") == "test":
            raise UserError(f"generalisation select: {name} is a test-split prior file; choose on val files")
        d = pf.tensors(slice(0, min(count, len(pf)) if count else len(pf)))
        r = torch.stack([metrics.pearson(d["priors"][:, k:k + 1], d["target"]).nan_to_num(0.0).sum()
                         for k in range(d["priors"].shape[1])])  # r only: SSIM would cost most of the time
        sums, total = (r if sums is None else sums + r), total + len(d["target"])
    mean = (sums / max(total, 1)).tolist()
    return {"index": int(torch.tensor(mean).argmax()), "val_r": mean, "chosen_on": list(files)}


@dataclass
class Scored:
    """A generator scored in this section only (`generators:` of the evaluation config)."""

    label: str
    model: nn.Module
    size_n: tuple[int, int]


def extra_generators(ctx: EvalContext) -> list[Scored]:
    """The `generators:` entries, loaded (eval mode, on the evaluation device)."""
    out = []
    for label, path in ctx.cfg.generators.items():
        model, meta = load_generator(path, device=ctx.device)
        out.append(Scored(label, model, (meta.size, meta.n)))
    return out


# The generalisation goals: a generator that never saw the CNN within HELD_OUT_GAP of the in-domain one and
# BEST_PRIOR_GAIN above the best single prior; a universal one within UNIVERSAL_GAP of the in-domain one (r).
HELD_OUT_GAP, BEST_PRIOR_GAIN, UNIVERSAL_GAP = 0.05, 0.05, 0.02


def verdicts(s: EvalSet, per_image: dict[str, dict], single: dict | None) -> list[dict]:
    """The goal checks of one file from its `held_out` / `in_domain` / `universal` labels: paired margins in r
    [95 % bootstrap] and whether each mean meets its goal."""
    out = []

    def add(what: str, a: str, b: str, scores_b: dict | None, goal: float) -> None:
        if a in per_image and scores_b is not None:
            m = margin_row({"r": per_image[a]["r"]}, {"r": scores_b["r"]}, b)
            out.append({"check": what, "a": a, "b": b, "r": m["r"], "r_ci95": m["r_ci95"], "goal": goal,
                        "pass": bool(m["r"] >= goal)})

    add("held-out − in-domain", s.held_out, s.in_domain, per_image.get(s.in_domain), -HELD_OUT_GAP)
    add("held-out − best single prior", s.held_out, "best single prior", single, BEST_PRIOR_GAIN)
    add("universal − in-domain", s.universal, s.in_domain, per_image.get(s.in_domain), -UNIVERSAL_GAP)
    return out


def generalise(s: EvalSet, ctx: EvalContext, extra: list | None = None) -> dict:
    """Fidelity of each GAN (and each `extra` generator) on one extra prior file; a skipped file gets a reason
    instead of results."""
    entry: dict[str, Any] = {"name": s.name, "priors": s.priors, "status": "skipped", "reason": "", "results": {}}
    if not Path(s.priors).is_file():
        entry["reason"] = f"{s.priors}: file not found"
        return entry
    try:
        pf = read_priors(s.priors)
    except UserError as exc:
        entry["reason"] = str(exc)
        return entry
    gans = list(ctx.gans) + list(extra or [])
    fit = [g for g in gans if g.size_n == (pf.size, pf.n)]
    entry.update(dataset=pf.meta.get("dataset"), cnn_arch=(pf.meta.get("cnn") or {}).get("arch"), size=pf.size,
                 n=pf.n)
    entry["reason"] = _skip_reason(gans, fit, pf.size, pf.n)
    if entry["reason"]:
        return entry
    m = len(pf) if ctx.cfg.num == 0 else min(ctx.count, len(pf))
    if m == 0:
        entry["reason"] = "the prior file holds no samples"
        return entry
    d = pf.tensors(slice(0, m))
    reference = fidelity_per_image(d["priors"].mean(1, keepdim=True), d["target"])
    best = best_single_prior(s.select, ctx.count) if s.select else None
    single = None
    if best is not None:
        single = fidelity_per_image(d["priors"][:, best["index"]:best["index"] + 1], d["target"])
        entry["best_prior"] = {**best, **ci_row(single)}
    per_image: dict[str, dict] = {}
    for g in fit:
        scores = per_image[g.label] = fidelity_per_image(
            generate(g.model, d["image"], d["priors"], ctx.cfg.batch_size, ctx.device), d["target"])
        entry["results"][g.label] = {**ci_row(scores), "margin": margin_row(scores, reference, MEAN_OF_PRIORS)}
        if best is not None:
            entry["results"][g.label]["margin_best"] = margin_row(scores, single, f"C{best['index']}")
    entry["results"][MEAN_OF_PRIORS] = ci_row(reference)
    entry["verdicts"] = verdicts(s, per_image, single)
    entry.update(status="ok", images=m)
    skipped = [g.label for g in gans if g not in fit]
    if skipped:
        entry["reason"] = f"{', '.join(skipped)} skipped: S/n differ"
    return entry


class GeneralisationSection(Section, name="generalisation", title="Generalisation to other prior files", order=5,
                                     default=True, announce=False):
    """Fidelity (L1, r, SSIM) of the generators on each `generalisation:` prior file with their S and n [95 %
    bootstrap interval], and each GAN's margin over the mean of that file's priors (paired per image)."""

    def empty(self) -> list:
        return []

    def run(self, ctx: EvalContext) -> list[dict]:
        extra = extra_generators(ctx) if ctx.cfg.generalisation else []
        return [generalise(s, ctx, extra) for s in ctx.cfg.generalisation]

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        if not self.not_run(report, ctx) and not ctx.cfg.generalisation:
            report.p("No extra prior files configured (`generalisation`).")
        rows, margins, skipped = [], [], []
        for e in results:
            if e["status"] != "ok":
                skipped.append(f"{e['name']} (`{e['priors']}`): skipped: {e['reason']}")
                continue
            if e["reason"]:
                skipped.append(f"{e['name']}: {e['reason']}")
            first = [e["name"], e.get("dataset"), e.get("cnn_arch"), e["images"]]
            for method, vals in e["results"].items():
                rows.append(first + [method] + [Estimate.of(vals, c[0]) for c in COLUMNS])
                if "margin" in vals:
                    margins.append(first + [method, vals["margin"]["over"]]
                                   + [Estimate.of(vals["margin"], c[0]) for c in COLUMNS])
        if rows:
            report.p("Fidelity on each file's first `num` records (N = the images column): mean [95 % bootstrap "
                     "interval over the images].")
            report.table(Table(["set", "dataset", "CNN", "images", "method"] + [c[1] for c in COLUMNS], rows,
                               [None] * 8, [None] * 5 + [c[3] for c in COLUMNS]))
        if margins:
            report.p("Each GAN minus the mean of that file's priors: mean of the per-image differences [95 % paired "
                     "bootstrap interval] over the file's images; a negative Δ L1 and a positive Δ r favour the GAN.")
            report.table(Table(["set", "dataset", "CNN", "images", "GAN", "minus"] + [f"Δ {c[1]}" for c in COLUMNS],
                               margins, [None] * 9, [None] * 6 + [c[3] for c in COLUMNS]))
        report.ul(skipped)
        matrix(report, [e for e in results if e["status"] == "ok"])
        goals = [[e["name"], v["check"], f"{v['a']} − {v['b']}", Estimate.of(v, "r"), f"≥ {v['goal']:+.2f}",
                  "pass" if v["pass"] else "fail"] for e in results for v in e.get("verdicts") or []]
        if goals:
            report.p(f"Goals (r, paired per image, 95 % bootstrap): a generator that never saw the CNN within "
                     f"{HELD_OUT_GAP} of the in-domain one and {BEST_PRIOR_GAIN} above the best single prior (chosen "
                     f"on other CNNs' val files); a universal one within {UNIVERSAL_GAP} of the in-domain one. The "
                     f"verdict reads the mean.")
            report.table(Table(["CNN", "check", "difference", "Δ r", "goal", "verdict"], goals, [None] * 6,
                               [None, None, None, "+.3f", None, None]))


def matrix(report: Report, entries: list[dict]) -> None:
    """Generators x files: r [95 % CI], and the margin over each file's best single prior chosen on its `select`
    val files (the columns are the files, so one row reads as one generator across CNNs)."""
    if len(entries) < 2:
        return
    names = [e["name"] for e in entries]
    methods = list(dict.fromkeys(k for e in entries for k in e["results"]))
    rows = [[method] + [Estimate.of(e["results"][method], "r") if method in e["results"] else "–" for e in entries]
            for method in methods]
    best = [e.get("best_prior") for e in entries]
    if any(best):
        rows.append(["best single prior (chosen on select)"] + [Estimate.of(b, "r") if b else "–" for b in best])
    report.p("r to each file's target, generators by row and prior files by column: mean [95 % bootstrap interval].")
    report.table(Table(["generator"] + names, rows, [None] + ["max"] * len(names), [None] + [".3f"] * len(names)))
    if any(best):
        report.p("Margin in r over each file's best single prior, the prior index chosen on the `select` val files "
                 "(other CNNs' val files: the evaluated CNN's own files choose nothing): mean of the per-image "
                 "differences [95 % paired bootstrap interval].")
        report.p("Chosen: " + "; ".join(f"{e['name']}: C{b['index']} (on {len(b['chosen_on'])} val file(s))"
                                        for e, b in zip(entries, best, strict=True) if b) + ".")
        rows = [[method] + [Estimate.of(e["results"][method]["margin_best"], "r")
                            if "margin_best" in e["results"].get(method, {}) else "–" for e in entries]
                for method in methods if method != MEAN_OF_PRIORS]
        report.table(Table(["generator"] + names, rows, [None] + ["max"] * len(names), [None] + ["+.3f"] * len(names)))
