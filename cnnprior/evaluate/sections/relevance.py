"""Section `relevance` (GAN interpretation): how much each generator's map changes when one prior is replaced."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cnnprior.evaluate.sanity import mean_ci
from cnnprior.evaluate.sections.base import EvalContext, Section
from cnnprior.maps.ops import generate
from cnnprior.present.report import Estimate, Report, Table
from cnnprior.present.viz import grouped_bar_chart

__all__ = ["prior_labels", "prior_relevance", "prior_relevance_per_image", "relevance_cell", "RelevanceSection"]


def _short(name: str, width: int = 20) -> str:
    """Drop leading dotted components until the name fits `width` ('…' marks the cut)."""
    parts = name.split(".")
    while len(".".join(parts)) > width and len(parts) > 1:
        parts = parts[1:]
        name = "…" + ".".join(parts)
    return name


def _shared_prefix(names: Sequence[str]) -> str:
    """The dotted prefix all names share, less its last component when it has several ('net.' of
    'net.layer1.0.conv1…', 'net.' of 'net.features.0.0…'); '' when none."""
    split = [n.split(".")[:-1] for n in names]
    prefix: list[str] = []
    for comps in zip(*split, strict=False) if split else ():
        if any(c != comps[0] for c in comps):
            break
        prefix.append(comps[0])
    if len(prefix) > 1:
        prefix = prefix[:-1]
    return ".".join(prefix) + "." if prefix else ""


def prior_labels(meta: dict, n: int) -> list[str]:
    """'C3: 9 layers, layer4.1.conv1…layer3.0.conv1' per prior, from the sidecar's prior_layers.

    The prefix shared by all of the CNN's conv layers (meta 'layers'; see _shared_prefix) is left out.
    """
    layers = meta.get("prior_layers") or []
    cut = len(_shared_prefix(meta.get("layers") or []))
    labels = []
    for k in range(n):
        names = [x[cut:] for x in layers[k]] if k < len(layers) else []
        if not names:
            labels.append(f"C{k}")
        elif len(names) == 1:
            labels.append(f"C{k}: 1 layer, {_short(names[0])}")
        else:
            labels.append(f"C{k}: {len(names)} layers, {_short(names[0])}…{_short(names[-1])}")
    return labels


@torch.no_grad()
def prior_relevance_per_image(generator: Callable[[Tensor, Tensor], Tensor], image: Tensor, priors: Tensor,
                              batch_size: int, device: torch.device) -> dict[str, list[Tensor]]:
    """Per prior k and image: mean over pixels of |G(x, P) - G(x, P with prior k := v)|, (B,) float64 each, for
    v = zeros and v = prior k's mean map over the images."""
    base = generate(generator, image, priors, batch_size, device)
    out: dict[str, list[Tensor]] = {"zeros": [], "mean": []}
    for k in range(priors.shape[1]):
        for neutral in out:
            value = torch.zeros_like(priors[0, k]) if neutral == "zeros" else priors[:, k].mean(0)
            swapped = priors.clone()
            swapped[:, k] = value
            diff = (generate(generator, image, swapped, batch_size, device) - base).abs()
            out[neutral].append(diff.double().flatten(1).mean(1))
    return out


def prior_relevance(generator: Callable[[Tensor, Tensor], Tensor], image: Tensor, priors: Tensor, batch_size: int,
                    device: torch.device) -> dict[str, list]:
    """Relevance of each prior: mean |G(x, P) - G(x, P with prior k := v)| for v = zeros and v = prior k's mean map
    (lists over k under "zeros" and "mean"), and its 95 % bootstrap interval over the images (lists of [lo, hi]
    under "zeros_ci95" and "mean_ci95")."""
    out: dict[str, list] = {}
    for neutral, per_prior in prior_relevance_per_image(generator, image, priors, batch_size, device).items():
        stats = [mean_ci(v) for v in per_prior]
        out[neutral] = [s["mean"] for s in stats]
        out[f"{neutral}_ci95"] = [[s["lo"], s["hi"]] for s in stats]
    return out


def relevance_cell(rel: dict, neutral: str, k: int) -> Any:
    """Prior k's relevance (replaced by `neutral`) as a table cell, with its interval when the results hold one."""
    ci = rel.get(f"{neutral}_ci95")
    return Estimate(rel[neutral][k], *ci[k]) if ci else rel[neutral][k]


def _layers_table(meta: dict, n: int) -> Table:
    """Which layers each prior averages."""
    layers = meta.get("prior_layers") or []
    return Table.plain(["prior", "layers averaged", "first averaged", "last averaged"],
                       [[f"C{k}", len(layers[k]) if k < len(layers) else 0,
                         layers[k][0] if k < len(layers) and layers[k] else "–",
                         layers[k][-1] if k < len(layers) and layers[k] else "–"] for k in range(n)])


class RelevanceSection(Section, name="relevance", title="GAN interpretation: relevance of each prior", order=4,
                                default=True, runtime_key="interpretation"):
    """Per GAN and prior: the mean change of the map when the prior is replaced by zeros or by its mean map."""

    def empty(self) -> dict:
        return {}

    def run(self, ctx: EvalContext) -> dict:
        d, labels = ctx.data, prior_labels(ctx.pf.meta, ctx.pf.n)
        return {g.label: {"labels": labels, **prior_relevance(g.model, d["image"], d["priors"], ctx.cfg.batch_size,
                                                              ctx.device)} for g in ctx.gans}

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        n = ctx.pf.n
        report.p(f"Relevance of prior k = mean |G(x, P) − G(x, P with C_k replaced)| over images and pixels; replaced "
                 f"by zeros, or by the mean map of C_k over the evaluated images; **N = {ctx.count} images**, mean "
                 f"[95 % bootstrap interval over the images]. Which layers each prior averages:")
        report.table(_layers_table(ctx.pf.meta, n))
        if self.not_run(report, ctx):
            return
        if not ctx.gans:
            report.p("No GAN checkpoints configured.")
            return
        labels = prior_labels(ctx.pf.meta, n)
        header = ["prior"] + [f"{g.label} ({v})" for g in ctx.gans for v in ("zeros", "mean")]
        rows = [[labels[k]] + [relevance_cell(results[g.label], v, k) for g in ctx.gans for v in ("zeros", "mean")]
                for k in range(n)]
        report.table(Table(header, rows, [None] * len(header), [None] + [".3g"] * (len(header) - 1)))
        for g in ctx.gans:
            file = f"relevance-{g.key}.png"
            rel = results[g.label]
            grouped_bar_chart(labels, {"replaced by zeros": rel["zeros"], "replaced by its mean map": rel["mean"]},
                              folder / file, f"{g.label}: relevance of each prior",
                              "relevance: mean |G(x, P) - G(x, P with prior k replaced)|")
            report.img(file, f"{g.label}: relevance of each prior")
