"""Evaluation stage: fidelity, faithfulness, localisation, GAN interpretation and generalisation -> one report.

    python -m cnnprior.evaluate --config configs/eval_fashion.yaml [--set key=value] [--num N] [--device D] [--out DIR]

writes outputs/eval-<name>-<timestamp>/ (report.md, report.html with its charts embedded, the charts as PNG
files, metrics.json). The folder is built under a temporary name and renamed into place at the end; an
existing folder is never written into.

Definitions
-----------
Images: the first `num` records of the held-out prior file (S x S pixels, RGB in [0, 1]). Every map is in
[0, 1]; a mean is over the evaluated images.

Fidelity to the target T (the stored classic Grad-CAM of the CNN's last conv layer), at S x S:
  L1    = mean over pixels of |M - T|                                            (lower is better)
  r     = Pearson correlation of M and T over pixels; 0 when either is constant   (higher is better)
  SSIM  = Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
          data range 1, 'valid' windows                                           (higher is better)
  Rows: the LSFT and GSFT generators G(x, P); each prior C_k alone; the mean of the n priors; image
  intensity, gray = 0.299 R + 0.587 G + 0.114 B or 1 - gray, whichever has the higher mean r on the
  evaluated images (so the choice is made on the test data: a slightly optimistic baseline).

Faithfulness on the prior file's CNN: images and maps are upsampled bilinearly (align_corners=False) from
S x S to the CNN's input size R x R; the CNN takes RGB in [0, 1] and normalises internally. The explained
class c of an image is its record's `explained` field; p(x) = softmax probability of c.
  x (.) M                  = x * M + b * (1 - M), baseline b = black (zeros in [0, 1] RGB input space)
  Average Drop %           = 100 * mean_i max(0, p(x_i) - p(x_i (.) M_i)) / p(x_i)          (lower is better)
  Increase in Confidence % = 100 * mean_i 1[p(x_i (.) M_i) > p(x_i)]                       (higher is better)
  Deletion / insertion AUC: the R*R pixels are ranked by M, descending (ties: raster order); at
      k = 0..steps the top round(k * R*R / steps) pixels are set to black (deletion), or are the only pixels
      kept from x, the rest black (insertion); AUC = trapezoid integral of p over the fraction of pixels
      removed / inserted, in [0, 1].                    Deletion: lower is better; insertion: higher is better.
  ROAD combined = (LeRF - MoRF) / 2 (Rong et al. 2022, pytorch-grad-cam): change of p when the least (LeRF) /
      most (MoRF) relevant pixels are replaced by noisy linear imputation, averaged over the percentiles
      10..90; higher is better. Computed on a seeded random subset of `road_num` images (it solves one
      sparse linear system per image, percentile and order).
  Rows: LSFT, GSFT; Grad-CAM, Grad-CAM++ and LayerCAM at the CNN's last conv layer, computed live with
  pytorch-grad-cam at R x R on the upsampled image; the stored target map; a random map (uniform noise at
  S x S from the seed, Gaussian-blurred with sigma = S/16, min-max scaled to [0, 1]); matched smoothing: the
  stored target Gaussian-blurred at S x S with sigma = 2, 4, 8 px, min-max scaled.
  Option `faithfulness: {insertion: blurred, blur_sigma: 5}`: also the insertion AUC starting from the image
  Gaussian-blurred with blur_sigma px at R x R (as RISE) instead of black.

Localisation (only when the prior file has ground-truth masks), maps at R x R, masks upsampled (nearest):
  pointing game        = mean_i 1[the maximum of M_i (first in raster order) lies in mask_i]   (higher is better)
  energy pointing game = mean_i sum(M_i * mask_i) / sum(M_i), 0 for an all-zero map          (higher is better)
  chance level         = mean_i |mask_i| / (R*R): a uniform random point's hit rate, and a uniform map's
                         energy share (replaces the random map, whose maxima sit near the border)

GAN interpretation: relevance of prior k to generator G =
  mean over images and pixels of |G(x, P) - G(x, P with prior k replaced by v)|,
  for v = 0 (zeros) and v = the mean map of prior k over the evaluated images (per pixel). 0 = G ignores C_k.

Sanity sections (mprt, prior_swap, control, gridpg; cnnprior.sections, scores in cnnprior.sanity) state their
definitions in their own report sections.

Generalisation: the same generators' fidelity (L1, r, SSIM) on other held-out prior files (other CNNs or
datasets) with the generators' S and n; the mean of that file's priors is shown beside them for reference.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import difflib
import html
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnprior import cams, metrics, viz
from cnnprior.baselines import BaselineChoice, grayscale
from cnnprior.config import (
    EVAL_SECTIONS,
    EvalConfig,
    EvalSet,
    _check_range,
    _coerce,
    _suggest,
    parse_override,
    read_yaml_mapping,
)
from cnnprior.errors import UserError, cli_main
from cnnprior.priorfile import PriorFile, read_priors
from cnnprior.runtime import file_sha256, resolve_device
from cnnprior.sanity import SMOOTHING_SIGMAS, pointing_chance, smooth_maps

EVAL_FORMAT = "cnnprior-eval/1"
VARIANTS = ("lsft", "gsft")
SSIM_MIN = 11  # metrics.ssim's window
Log = Callable[[str], Any]


# ----------------------------------------------------------------------------------------- config
def _registry() -> Any:
    """The evaluation-section registry, `cnnprior.sections` (imported late: the sections import this module)."""
    import cnnprior.sections as sections

    return sections


def known_sections() -> list[str]:
    """Every section name `sections:` accepts: the built-in ones, then the registered classes."""
    return list(EVAL_SECTIONS) + [s for s in _registry().section_names() if s not in EVAL_SECTIONS]


def _fill_flat(obj: Any, values: dict, where: str, prefix: str = "") -> None:
    """Set a flat dataclass's fields from a mapping, with config.py's checks and messages."""
    fields = {f.name: f for f in dataclasses.fields(obj) if not f.metadata.get("internal")}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(obj, EvalConfig) and key in _registry().OPTIONS:  # a section's options: `mprt: {num: 64}`
            _registry().set_options(obj, key, value, where)
            continue
        if key not in fields:
            raise UserError(f"{where}: unknown key '{dotted}'{_suggest(str(key), list(fields))}")
        loc = f"{where}: key '{dotted}'"
        if isinstance(obj, EvalConfig) and key == "generalisation":
            value = _eval_sets(value, loc, where)
        elif isinstance(obj, EvalConfig) and key == "sections":
            value = _sections(value, loc)
        else:
            if value is None and fields[key].type in ("str", str):
                value = ""  # `lsft:` left blank = none
            value = _coerce(value, fields[key].type, loc)
            _check_range(value, fields[key].metadata, loc)
        setattr(obj, key, value)


def _sections(value: Any, loc: str) -> list[str]:
    """`sections:` a list, or a comma-separated string (`--set sections=a,b`); blank = the built-in sections
    (the registered sanity sections run only when named)."""
    if value is None:
        return list(EVAL_SECTIONS)
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",") if s.strip()]
    value = _coerce(value, list, loc)
    known = known_sections()
    for s in value:
        if s not in known:
            close = difflib.get_close_matches(s, known, n=1, cutoff=0.6)
            raise UserError(f"{loc}: {s!r} is not one of {', '.join(known)}"
                            + (f" (did you mean '{close[0]}'?)" if close else "") + "; fidelity always runs")
    return list(dict.fromkeys(value))


def _eval_sets(value: Any, loc: str, where: str) -> list[EvalSet]:
    """`generalisation:` entries, each {name, priors} or just a prior-file path."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{loc}: expected a list of {{name, priors}} entries, got {value!r}")
    sets: list[EvalSet] = []
    for i, item in enumerate(value):
        entry = EvalSet()
        if isinstance(item, str):
            entry.priors = item
        elif isinstance(item, dict):
            _fill_flat(entry, item, where, f"generalisation[{i}].")
        else:
            raise UserError(f"{loc}[{i}]: expected {{name, priors}} or a path, got {item!r}")
        if not entry.priors:
            raise UserError(f"{loc}[{i}]: 'priors' (a prior file) is required")
        entry.name = entry.name or Path(entry.priors).stem
        if entry.name in {s.name for s in sets}:
            raise UserError(f"{loc}[{i}]: name {entry.name!r} is used twice")
        sets.append(entry)
    return sets


def load_eval_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read an evaluation YAML, apply `--set key=value` overrides, validate keys, values and files."""
    p = Path(path)
    where = str(p)
    raw = read_yaml_mapping(p, "configs/eval_*.yaml", "keys (name, priors, lsft, gsft, ...)")
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 2 and keys[0] in _registry().OPTIONS:  # a section option: --set mprt.num=16
            node = raw.get(keys[0])
            raw[keys[0]] = {**(node if isinstance(node, dict) else {}), keys[1]: value}
            continue
        if len(keys) != 1:
            raise UserError(f"--set {text!r}: evaluation keys are flat (e.g. --set num=64; section options: "
                            f"--set mprt.num=16)")
        raw[keys[0]] = value
    cfg = EvalConfig()
    _fill_flat(cfg, raw, where)
    if not cfg.name or any(c in cfg.name for c in "/\\ "):
        raise UserError(f"{where}: key 'name': {cfg.name!r} must be non-empty without spaces or slashes")
    if not cfg.priors:
        raise UserError(f"{where}: key 'priors' is required (the held-out prior file, e.g. npys/<name>-test.npy)")
    for key, kind in (("priors", "prior file"), ("lsft", "LSFT checkpoint"), ("gsft", "GSFT checkpoint"),
                      ("cnn", "CNN checkpoint")):
        value = getattr(cfg, key)
        if value and not Path(value).is_file():
            hint = {"priors": "write it with `python train.py --config <run config> --stage priors`",
                    "cnn": "or leave cnn empty to use the prior file's CNN"}.get(key, "train it with --stage gan, or "
                                                                                      "leave the key empty")
            raise UserError(f"{where}: key '{key}': {value}: {kind} not found ({hint})")
    cfg.source_file = str(p)
    return cfg


# ----------------------------------------------------------------------------------------- maps
def resize_maps(x: Tensor, size: int) -> Tensor:
    """Bilinear resize (align_corners=False) of (B, C, H, W) to size x size; identity when already that size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1]).clamp(0, 1)


@torch.no_grad()
def generate(generator: Callable[[Tensor, Tensor], Tensor], image: Tensor, priors: Tensor, batch_size: int,
             device: torch.device) -> Tensor:
    """Generator maps (B, 1, S, S) on the CPU, computed batch by batch on `device`."""
    out = [generator(image[i:i + batch_size].to(device), priors[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(image), batch_size)]
    return torch.cat(out)


def intensity_rows(image: Tensor, choice: BaselineChoice | None) -> dict[str, Tensor]:
    """The intensity baseline under the generators' validation choice of sign; without one, both signs (choosing
    the sign on the evaluated data would select a baseline on test)."""
    gray = grayscale(image)
    if choice is None:
        return {"intensity (gray)": gray, "intensity (1 - gray)": 1.0 - gray}
    if choice.image_inverted:
        return {"intensity (1 - gray, val)": 1.0 - gray}
    return {"intensity (gray, val)": gray}


def random_maps(count: int, size: int, seed: int) -> Tensor:
    """Seeded uniform noise (count, 1, size, size), Gaussian-blurred (sigma = size/16), min-max scaled."""
    from torchvision.transforms.functional import gaussian_blur

    noise = torch.rand(count, 1, size, size, generator=torch.Generator().manual_seed(seed))
    sigma = max(size / 16, 0.5)
    k = min(2 * math.ceil(3 * sigma) + 1, size - (size + 1) % 2)  # odd, and reflect padding needs k//2 < size
    m = gaussian_blur(noise, [k, k], [sigma, sigma])
    lo, hi = torch.aminmax(m.flatten(1), dim=1, keepdim=True)
    return ((m.flatten(1) - lo) / (hi - lo).clamp_min(1e-12)).view_as(m)


def live_cams(model: nn.Module, layer: nn.Module, images: Tensor, classes: Tensor, method: str,
              batch_size: int) -> Tensor:
    """CAM maps (B, 1, H, W) in [0, 1] of `layer` for each image's class, by pytorch-grad-cam's `method` class."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = cams.cam_class(method)(model=model, target_layers=[layer])
    out = []
    try:  # not `with cam:` — its __exit__ swallows IndexError
        for i in range(0, len(images), batch_size):
            targets = [ClassifierOutputTarget(int(c)) for c in classes[i:i + batch_size]]
            out.append(torch.from_numpy(np.asarray(cam(input_tensor=images[i:i + batch_size], targets=targets),
                                                   dtype=np.float32)))
    finally:
        cam.activations_and_grads.release()
    model.zero_grad(set_to_none=True)
    return torch.cat(out).unsqueeze(1).clamp(0, 1)


# ----------------------------------------------------------------------------------------- metrics
def fidelity_means(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Mean L1, Pearson r and SSIM (NaN when the maps are smaller than SSIM's 11x11 window)."""
    out = {"l1": float(metrics.l1(pred, target).mean()), "r": float(metrics.pearson(pred, target).mean())}
    out["ssim"] = float(metrics.ssim(pred, target).mean()) if min(pred.shape[-2:]) >= SSIM_MIN else math.nan
    return out


def faithfulness_means(model: nn.Module, images: Tensor, maps: Tensor, classes: Tensor, p_orig: Tensor,
                       steps: int, road_idx: Tensor, batch_size: int, seed: int,
                       insertion_start: Tensor | None = None) -> dict[str, float]:
    """Average Drop %, Increase in Confidence %, deletion/insertion AUC, ROAD combined (subset) of one method;
    with `insertion_start` (e.g. blurred images, as RISE) also the insertion AUC starting from it."""
    maps = maps.to(images.device)
    p_expl = metrics.class_probs(model, metrics.explanation_masked(images, maps), classes, batch_size)
    dele, ins = metrics.deletion_insertion_auc(model, images, maps, classes, steps, None, batch_size)
    road = math.nan
    if len(road_idx):
        idx = road_idx.to(images.device)
        road = float(metrics.road_scores(model, images[idx], maps[idx], classes[idx], seed=seed)["combined"].mean())
    out = {"average_drop": metrics.average_drop(p_orig, p_expl),
           "increase_in_confidence": metrics.increase_in_confidence(p_orig, p_expl),
           "deletion_auc": float(dele.mean()), "insertion_auc": float(ins.mean()), "road_combined": road}
    if insertion_start is not None:
        _, ins_b = metrics.deletion_insertion_auc(model, images, maps, classes, steps, insertion_start, batch_size)
        out["insertion_auc_blurred"] = float(ins_b.mean())
    return out


def localisation_means(maps: Tensor, masks: Tensor) -> dict[str, float]:
    """Mean pointing-game hit rate and energy-based pointing game."""
    return {"pointing_game": float(metrics.pointing_game(maps, masks).mean()),
            "energy_pointing_game": float(metrics.energy_pointing_game(maps, masks).mean())}


@torch.no_grad()
def prior_relevance(generator: Callable[[Tensor, Tensor], Tensor], image: Tensor, priors: Tensor, batch_size: int,
                    device: torch.device) -> dict[str, list[float]]:
    """Relevance of each prior: mean |G(x, P) - G(x, P with prior k := v)| for v = zeros and v = prior k's mean map."""
    base = generate(generator, image, priors, batch_size, device)
    out: dict[str, list[float]] = {"zeros": [], "mean": []}
    for k in range(priors.shape[1]):
        for neutral in out:
            value = torch.zeros_like(priors[0, k]) if neutral == "zeros" else priors[:, k].mean(0)
            swapped = priors.clone()
            swapped[:, k] = value
            diff = (generate(generator, image, swapped, batch_size, device) - base).abs()
            out[neutral].append(float(diff.double().mean()))
    return out


# ----------------------------------------------------------------------------------------- labels
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


def relevance_chart(labels: Sequence[str], values: dict[str, Sequence[float]], path: Path, title: str) -> None:
    """Horizontal grouped bars, one group per prior (its layer label), one bar per neutral value."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 0.5 * len(labels) * max(1, len(values)) / 2 + 1.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    h = 0.8 / max(1, len(values))
    for i, (name, vals) in enumerate(values.items()):
        bars = ax.barh(y + (i - (len(values) - 1) / 2) * h, vals, height=h, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    ax.set_yticks(y, list(labels), fontsize=8)
    ax.invert_yaxis()  # C0 on top
    ax.set_xlabel("relevance: mean |G(x, P) - G(x, P with prior k replaced)|")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.15)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, format="png")


# ----------------------------------------------------------------------------------------- report
@dataclass
class Table:
    """A report table; `better` per column: 'min', 'max' or None; `fmt` per column: a format spec or None."""

    header: list[str]
    rows: list[list[Any]]
    better: list[str | None]
    fmt: list[str | None]

    def text(self, r: int, c: int) -> str:
        v = self.rows[r][c]
        if isinstance(v, float) and math.isnan(v):
            return "–"
        if self.fmt[c] and isinstance(v, (int, float)):
            return format(v, self.fmt[c])
        return str(v)

    def best(self, c: int) -> set[int]:
        """Rows holding the best value of column c, compared as displayed (ties all win)."""
        if not self.better[c]:
            return set()
        vals = {r: float(self.text(r, c)) for r in range(len(self.rows))
                if isinstance(self.rows[r][c], (int, float)) and not math.isnan(self.rows[r][c])}
        if not vals:
            return set()
        pick = min(vals.values()) if self.better[c] == "min" else max(vals.values())
        return {r for r, v in vals.items() if v == pick}

    def winners(self) -> dict[str, list[str]]:
        """Column header -> names (first cell) of its best rows."""
        return {self.header[c]: [str(self.rows[r][0]) for r in sorted(self.best(c))]
                for c in range(len(self.header)) if self.better[c] and self.best(c)}


class Report:
    """Blocks (headings, text, lists, tables, images, preformatted text) rendered as Markdown and HTML."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, t: Table) -> None:
        self.blocks.append(("table", t))

    def img(self, file: str, alt: str) -> None:
        self.blocks.append(("img", file, alt))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b[0] == "h":
                out += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "ul":
                out += [f"- {item}" for item in b[1]] + [""]
            elif b[0] == "img":
                out += [f"![{b[2]}]({b[1]})", ""]
            elif b[0] == "pre":
                out += ["```", b[1].rstrip("\n"), "```", ""]
            else:
                t: Table = b[1]
                best = [t.best(c) for c in range(len(t.header))]
                out.append("| " + " | ".join(t.header) + " |")
                numeric = [all(isinstance(row[c], (int, float)) for row in t.rows) for c in range(len(t.header))]
                out.append("|" + "|".join("---:" if num else "---" for num in numeric) + "|")
                for r in range(len(t.rows)):
                    cells = [t.text(r, c).replace("|", "\\|") for c in range(len(t.header))]
                    cells = [f"**{s}**" if r in best[c] else s for c, s in enumerate(cells)]
                    out.append("| " + " | ".join(cells) + " |")
                out.append("")
        return "\n".join(out)

    def html(self, folder: Path) -> str:
        """Self-contained HTML: images are embedded as data: URIs read from `folder`."""
        e = html.escape
        parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(self.title)}</title>",
                 f"<style>{viz._HTML_STYLE}td.best {{ font-weight: bold; background: #e6f2e6; }}\n"
                 f"pre {{ background: #f6f6f6; padding: 0.6em; overflow-x: auto; }}</style>",
                 "</head><body>", f"<h1>{e(self.title)}</h1>"]
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "ul":
                parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "img":
                data = base64.b64encode((folder / b[1]).read_bytes()).decode("ascii")
                parts.append(f'<p><img src="data:image/png;base64,{data}" alt="{e(b[2])}"></p>')
            elif b[0] == "pre":
                parts.append(f"<pre>{e(b[1])}</pre>")
            else:
                t = b[1]
                best = [t.best(c) for c in range(len(t.header))]
                rows = ["<tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr>"]
                for r in range(len(t.rows)):
                    cells = []
                    for c in range(len(t.header)):
                        cls = ["num"] if isinstance(t.rows[r][c], (int, float)) else []
                        cls += ["best"] if r in best[c] else []
                        attr = f' class="{" ".join(cls)}"' if cls else ""
                        cells.append(f"<td{attr}>{e(t.text(r, c))}</td>")
                    rows.append("<tr>" + "".join(cells) + "</tr>")
                parts.append("<table>" + "\n".join(rows) + "</table>")
        parts.append("</body></html>\n")
        return "\n".join(parts)


def _inline(text: str) -> str:
    """Escape text for HTML, turning Markdown **bold** and `code` into tags."""
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _definitions() -> str:
    doc = __doc__ or ""
    return doc[doc.index("Definitions"):].split("\n", 2)[2] if "Definitions" in doc else ""


def _jsonable(x: Any) -> Any:
    """NaN/inf -> None, tensors/arrays -> lists, recursively (metrics.json stays strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (Tensor, np.ndarray)):
        return _jsonable(x.tolist())
    return x


# ----------------------------------------------------------------------------------------- output folder
def _out_folder(cfg: EvalConfig, out: str | None) -> Path:
    """The report folder: `out` (which must not exist yet) or outputs/eval-<name>-<timestamp>."""
    if out:
        p = Path(out)
        if p.exists():
            raise UserError(f"--out {p}: already exists; evaluation never overwrites a report (choose a new folder)")
        return p
    return Path("outputs") / f"eval-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _publish(tmp: Path, final: Path, log: Log) -> Path:
    """Rename the finished temp folder into place, never over an existing one (then -2, -3, ... is used)."""
    os.chmod(tmp, 0o755)
    for i in range(1, 1000):
        dest = final if i == 1 else final.with_name(f"{final.name}-{i}")
        try:
            dest.mkdir()  # reserve the name atomically; rename then replaces our own empty folder
        except FileExistsError:
            continue
        os.rename(tmp, dest)
        if dest != final:
            log(f"evaluate: {final} appeared meanwhile; wrote {dest} instead")
        return dest
    raise UserError(f"{final}: could not find a free folder name")  # pragma: no cover


# ----------------------------------------------------------------------------------------- the stage
@dataclass
class _Gan:
    variant: str
    path: str
    model: nn.Module
    meta: dict
    maps: Tensor = field(default=None)  # type: ignore[assignment]

    @property
    def label(self) -> str:
        return self.variant.upper()

    @property
    def size_n(self) -> tuple[int, int]:
        pm = self.meta.get("priors_meta") or {}
        return int(pm.get("size", -1)), int(pm.get("n", -1))


def _load_gans(cfg: EvalConfig, pf: PriorFile, device: torch.device, notes: list[str]) -> list[_Gan]:
    from cnnprior.gan import load_generator

    gans = []
    for variant in VARIANTS:
        path = getattr(cfg, variant)
        if not path:
            notes.append(f"no {variant} checkpoint configured: {variant.upper()} rows are left out")
            continue
        model, meta = load_generator(path, device=device)
        if meta.get("variant") != variant:
            raise UserError(f"{cfg.source_file}: key '{variant}': {path} is a {meta.get('variant')} checkpoint")
        g = _Gan(variant, path, model, meta)
        if g.size_n != (pf.size, pf.n):
            raise UserError(f"{path}: generator trained on S={g.size_n[0]}, n={g.size_n[1]} priors but {pf.path} has "
                            f"S={pf.size}, n={pf.n}")
        pm = meta.get("priors_meta") or {}
        for key, ours in (("target", pf.meta.get("target")), ("method", pf.meta.get("method")),
                          ("order", pf.meta.get("order")), ("cnn_arch", (pf.meta.get("cnn") or {}).get("arch"))):
            if pm.get(key) is not None and ours is not None and pm.get(key) != ours:
                notes.append(f"warning: {g.label} was trained on priors with {key} {pm.get(key)!r}, the evaluated "
                             f"file has {ours!r}")
        gans.append(g)
    return gans


def _load_target_cnn(cfg: EvalConfig, pf: PriorFile, device: torch.device, notes: list[str]):
    from cnnprior.cnn import load_cnn
    from cnnprior.priors import target_module

    cmeta = pf.meta.get("cnn") or {}
    path = cfg.cnn or cmeta.get("checkpoint") or ""
    if not path or not Path(path).is_file():
        raise UserError(f"{cfg.source_file}: key 'cnn': the prior file's CNN checkpoint {path!r} was not found; "
                        f"set cnn: <checkpoint> in the config")
    model, meta = load_cnn(path, device)
    want = cmeta.get("checkpoint_sha256")
    if want and want != file_sha256(path):
        notes.append(f"warning: {path} differs from the checkpoint the priors were computed with (sha256 "
                     f"mismatch): the stored target maps explain another CNN")
    name, layer = target_module(model, pf.meta)
    return model, meta, path, name, layer


def _target_label(meta: dict) -> str:
    method = meta.get("method") or "map"
    return f"target (stored {cams.title(method)})"


def _fidelity_rows(gans: list[_Gan], d: dict, pf: PriorFile) -> dict[str, Tensor]:
    labels = prior_labels(pf.meta, pf.n)
    rows: dict[str, Tensor] = {g.label: g.maps for g in gans}
    for k in range(pf.n):
        rows[labels[k].split(":")[0]] = d["priors"][:, k:k + 1]
    rows["mean of priors"] = d["priors"].mean(1, keepdim=True)
    choices = [BaselineChoice.from_dict((g.meta.get("priors_meta") or {}).get("baselines")) for g in gans]
    rows.update(intensity_rows(d["image"], next((c for c in choices if c is not None), None)))
    return rows


def _history_chart(g: _Gan, folder: Path) -> str | None:
    hist = [h for h in g.meta.get("history") or [] if isinstance(h, dict) and "epoch" in h]
    if not hist:
        return None
    series = {label: [float(h[key]) for h in hist] for key, label in
              (("val_r", "val r"), ("val_l1", "val L1"), ("val_ssim", "val SSIM")) if all(key in h for h in hist)}
    if not series:
        return None
    file = f"curve-{g.variant}.png"
    viz.line_chart([int(h["epoch"]) for h in hist], series, folder / file, f"{g.label} validation per epoch",
                   "epoch", "value")
    return file


def run_evaluation(cfg: EvalConfig, out: str | None = None, log: Log = print) -> Path:
    """Run fidelity and the configured sections, write the report folder and return its path."""
    t_start = time.time()
    runtime: dict[str, float] = {}
    notes: list[str] = []
    final = _out_folder(cfg, out)
    device = resolve_device(cfg.device)

    t = time.time()
    pf = read_priors(cfg.priors)
    count = len(pf) if cfg.num == 0 else min(cfg.num, len(pf))
    if count == 0:
        raise UserError(f"{pf.path}: the prior file holds no samples")
    S, n = pf.size, pf.n
    d = pf.tensors(slice(0, count))
    cnn, cnn_meta, cnn_path, last_name, last_layer = _load_target_cnn(cfg, pf, device, notes)
    n_classes = len(cnn_meta["class_names"])
    if int(d["explained"].max()) >= n_classes or int(d["explained"].min()) < 0:
        raise UserError(f"{pf.path}: explained classes reach {int(d['explained'].max())} but {cnn_path} has "
                        f"{n_classes} classes")
    gans = _load_gans(cfg, pf, device, notes)
    if count < len(pf):
        notes.append(f"evaluated the first {count} of the {len(pf)} records of {pf.path} (num: {cfg.num})")
    if S < SSIM_MIN:
        notes.append(f"SSIM left out: maps are {S}x{S}, smaller than its {SSIM_MIN}x{SSIM_MIN} window")
    runtime["load"] = time.time() - t
    log(f"evaluate: {count} images from {pf.path} (S={S}, n={n}), CNN {cnn_meta['arch']} at "
        f"{cnn_meta['image_size']}px, {', '.join(g.label for g in gans) or 'no GANs'}, on {device}")

    t = time.time()
    for g in gans:
        g.maps = generate(g.model, d["image"], d["priors"], cfg.batch_size, device)
    runtime["generate"] = time.time() - t

    # 1. fidelity
    t = time.time()
    fid_maps = _fidelity_rows(gans, d, pf)
    fidelity = {name: fidelity_means(m, d["target"]) for name, m in fid_maps.items()}
    runtime["fidelity"] = time.time() - t
    log(f"evaluate: fidelity done ({runtime['fidelity']:.1f}s)")

    # 2. faithfulness (maps_r: every method's maps at the CNN's input size, also used by localisation)
    t = time.time()
    sections = set(cfg.sections)
    skipped = [s for s in known_sections() if s not in sections]
    if skipped:
        notes.append(f"sections not run: {', '.join(skipped)} (sections: {', '.join(cfg.sections) or '[]'})")
    R = int(cnn_meta["image_size"])
    images_r = resize_maps(d["image"], R).to(device)
    classes = d["explained"].to(device)
    maps_r: dict[str, Tensor] = {}
    if "faithfulness" in sections or ("localisation" in sections and pf.meta.get("has_masks")):
        maps_r = {g.label: resize_maps(g.maps, R) for g in gans}
        for method in cams.LIVE:
            maps_r[cams.title(method)] = live_cams(cnn, last_layer, images_r, classes, method, cfg.batch_size).cpu()
        maps_r[_target_label(pf.meta)] = resize_maps(d["target"], R)
        maps_r["random"] = resize_maps(random_maps(count, S, cfg.seed), R)
        for sigma in SMOOTHING_SIGMAS:  # matched smoothing: the target blurred at the map size S
            maps_r[f"{_target_label(pf.meta)} σ={sigma}px"] = resize_maps(smooth_maps(d["target"], sigma), R)
    road_n = min(cfg.road_num, count) if "faithfulness" in sections else 0
    road_idx = torch.randperm(count, generator=torch.Generator().manual_seed(cfg.seed))[:road_n].sort().values
    p_orig = metrics.class_probs(cnn, images_r, classes, cfg.batch_size) if "faithfulness" in sections else None
    faithfulness = {}
    fopts = _registry().options_of(cfg, "faithfulness")
    start = None
    if fopts.insertion == "blurred" and "faithfulness" in sections:
        start = _registry().faithfulness.blurred_images(images_r, fopts.blur_sigma)
    for name, m in (maps_r.items() if "faithfulness" in sections else ()):
        t_m = time.time()
        faithfulness[name] = faithfulness_means(cnn, images_r, m, classes, p_orig, cfg.steps, road_idx,
                                                cfg.batch_size, cfg.seed, start)
        log(f"evaluate: faithfulness {name} ({time.time() - t_m:.1f}s)")
    if "faithfulness" not in sections:
        pass
    elif road_n == 0:
        notes.append("ROAD skipped (road_num: 0)")
    elif road_n < count:
        notes.append(f"ROAD is computed on a seeded random subset of {road_n} of the {count} images (road_num)")
    if "faithfulness" in sections:
        runtime["faithfulness"] = time.time() - t

    # 3. localisation
    localisation = None
    if "localisation" not in sections:
        pass
    elif pf.meta.get("has_masks"):
        t = time.time()
        masks_r = F.interpolate(d["mask"].unsqueeze(1), size=(R, R), mode="nearest")
        # the blurred-noise "random" map is no fair chance level (its maxima sit at the border): the chance of a
        # uniform random point, = the mask-area fraction (also a uniform map's energy share), replaces it
        localisation = {name: localisation_means(m, masks_r) for name, m in maps_r.items() if name != "random"}
        chance = float(pointing_chance(masks_r).mean())
        localisation["chance (uniform random point)"] = {"pointing_game": chance, "energy_pointing_game": chance}
        if float(d["mask"].flatten(1).amax(1).min()) == 0:
            notes.append("some evaluated images have an empty mask: they count as misses in the pointing game")
        runtime["localisation"] = time.time() - t
    else:
        notes.append("localisation skipped: the prior file has no ground-truth masks (has_masks: false)")

    # 4. GAN interpretation
    t = time.time()
    labels = prior_labels(pf.meta, n)
    relevance: dict[str, dict] = {}
    if "relevance" in sections:
        relevance = {g.label: prior_relevance(g.model, d["image"], d["priors"], cfg.batch_size, device)
                     for g in gans}
        runtime["interpretation"] = time.time() - t
        log(f"evaluate: interpretation done ({runtime['interpretation']:.1f}s)")

    # 5. generalisation
    t = time.time()
    generalisation: list[dict] = []
    if "generalisation" in sections:
        generalisation = [_generalise(s, gans, cfg, count, device) for s in cfg.generalisation]
        runtime["generalisation"] = time.time() - t

    # 6. the registered sections (sanity checks), one class each (cnnprior.sections)
    ctx = _registry().EvalContext(cfg, pf, d, count, cnn, cnn_meta, gans, device, notes, log)
    registered = _registry().run_sections(ctx, cfg.sections, runtime)

    # 7-8. the report
    t = time.time()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        result = {
            "format": EVAL_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": dataclasses.asdict(cfg), "device": str(device), "images": count,
            "sections_run": ["fidelity"] + [s for s in known_sections() if s in sections],
            "prior_file": {"path": str(pf.path), "records": len(pf), "size": S, "n": n,
                           "dataset": pf.meta.get("dataset"), "split": pf.meta.get("split"),
                           "method": pf.meta.get("method"), "target": pf.meta.get("target"),
                           "target_layer": pf.meta.get("target_layer"), "has_masks": bool(pf.meta.get("has_masks")),
                           "prior_layers": pf.meta.get("prior_layers") or []},
            "cnn": {"path": cnn_path, "arch": cnn_meta["arch"], "image_size": R, "last_conv": last_name,
                    "classes": n_classes, "val_accuracy": cnn_meta.get("val_accuracy")},
            "gans": {g.label: {"path": g.path, "epoch": g.meta.get("epoch"), "config": g.meta.get("generator_config"),
                               "history": g.meta.get("history") or []} for g in gans},
            "fidelity": fidelity, "faithfulness": faithfulness, "localisation": localisation,
            "relevance": {k: {"labels": labels, **v} for k, v in relevance.items()},
            "generalisation": generalisation, "road_images": road_idx.tolist(),
            "deletion_insertion": {"steps": cfg.steps, "baseline": "black (zeros in [0,1] RGB input space)"},
            **registered,
        }
        report = _build_report(cfg, result, gans, labels, tmp, notes)
        runtime["report"] = time.time() - t
        runtime["total"] = time.time() - t_start
        _finish_report(report, result, runtime, notes, tmp)
        dest = _publish(tmp, final, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"evaluate: wrote {dest}/report.md ({runtime['total']:.1f}s)")
    return dest


def _generalise(s: EvalSet, gans: list[_Gan], cfg: EvalConfig, count: int, device: torch.device) -> dict:
    """Fidelity of each GAN on one extra prior file; a skipped file gets a reason instead of results."""
    entry: dict[str, Any] = {"name": s.name, "priors": s.priors, "status": "skipped", "reason": "", "results": {}}
    if not Path(s.priors).is_file():
        entry["reason"] = f"{s.priors}: file not found"
        return entry
    try:
        pf = read_priors(s.priors)
    except UserError as exc:
        entry["reason"] = str(exc)
        return entry
    fit = [g for g in gans if g.size_n == (pf.size, pf.n)]
    entry.update(dataset=pf.meta.get("dataset"), cnn_arch=(pf.meta.get("cnn") or {}).get("arch"), size=pf.size,
                 n=pf.n)
    if not gans:
        entry["reason"] = "no GAN checkpoints configured"
        return entry
    if not fit:
        entry["reason"] = (f"S={pf.size}, n={pf.n} do not match the GANs' "
                           + ", ".join(f"{g.label} S={g.size_n[0]}, n={g.size_n[1]}" for g in gans))
        return entry
    m = len(pf) if cfg.num == 0 else min(count, len(pf))
    if m == 0:
        entry["reason"] = "the prior file holds no samples"
        return entry
    d = pf.tensors(slice(0, m))
    for g in fit:
        entry["results"][g.label] = fidelity_means(generate(g.model, d["image"], d["priors"], cfg.batch_size,
                                                            device), d["target"])
    entry["results"]["mean of priors"] = fidelity_means(d["priors"].mean(1, keepdim=True), d["target"])
    entry.update(status="ok", images=m)
    skipped = [g.label for g in gans if g not in fit]
    if skipped:
        entry["reason"] = f"{', '.join(skipped)} skipped: S/n differ"
    return entry


FID_COLS = (("l1", "L1 ↓", "min", ".3f"), ("r", "r ↑", "max", ".3f"), ("ssim", "SSIM ↑", "max", ".3f"))
FAITH_COLS = (("average_drop", "Average Drop % ↓", "min", ".1f"),
              ("increase_in_confidence", "Increase in Confidence % ↑", "max", ".1f"),
              ("deletion_auc", "Deletion AUC ↓", "min", ".3f"), ("insertion_auc", "Insertion AUC ↑", "max", ".3f"),
              ("road_combined", "ROAD combined ↑", "max", ".4f"))
BLUR_COL = ("insertion_auc_blurred", "Insertion AUC (blurred start) ↑", "max", ".3f")
LOC_COLS = (("pointing_game", "Pointing game ↑", "max", ".3f"),
            ("energy_pointing_game", "Energy pointing game ↑", "max", ".3f"))


def _metric_table(first: str, data: dict[str, dict[str, float]], cols: tuple) -> Table:
    return Table([first] + [c[1] for c in cols], [[name] + [vals[c[0]] for c in cols] for name, vals in data.items()],
                 [None] + [c[2] for c in cols], [None] + [c[3] for c in cols])


def _build_report(cfg: EvalConfig, res: dict, gans: list[_Gan], labels: list[str], folder: Path,
                  notes: list[str]) -> tuple[Report, dict[str, Table]]:
    pf, cnn = res["prior_file"], res["cnn"]
    rep = Report(f"cnnprior evaluation: {cfg.name}")
    rep.p(f"**{res['images']} images** from `{pf['path']}` ({pf['dataset']}, split {pf['split']}, S={pf['size']}, "
          f"n={pf['n']} priors, {pf['method']} target at `{pf['target_layer']}`); CNN `{cnn['path']}` "
          f"({cnn['arch']}, {cnn['image_size']}px, last conv `{cnn['last_conv']}`); device {res['device']}; "
          f"created {res['created']}.")
    rep.ul([f"{g.label}: `{g.path}` (epoch {g.meta.get('epoch')}, "
            f"{sum(p.numel() for p in g.model.parameters()):,} parameters)" for g in gans])
    tables: dict[str, Table] = {}

    rep.h("1. Fidelity to the target map")
    rep.p(f"Mean over the **N = {res['images']} images**; the target is the stored {cams.title(pf['method'])} map of "
          f"`{pf['target_layer']}` (priors.target: {pf['target']}). Best per column in bold.")
    tables["fidelity"] = _metric_table("method", res["fidelity"], FID_COLS)
    rep.table(tables["fidelity"])

    rep.h("2. Faithfulness to the CNN")
    road_n = len(res["road_images"])
    ran = set(cfg.sections)
    if "faithfulness" not in ran:
        rep.p("Not run (`sections`).")
    else:
        rep.p(f"Images and maps upsampled from {pf['size']}px to {cnn['image_size']}px; explained class = the "
              f"record's `explained`; masking / deletion / insertion baseline = black (zeros in [0,1] RGB input "
              f"space); **N = {res['images']} images**; deletion/insertion with {cfg.steps} steps; ROAD on a seeded "
              f"random subset of **{road_n} of {res['images']} images**. `random`: uniform noise blurred with sigma "
              f"S/16 (its maxima sit near the border); the σ rows are the target blurred at the map size, so methods "
              f"can be compared at matched smoothing (these metrics reward smooth maps).")
        blurred = any("insertion_auc_blurred" in v for v in res["faithfulness"].values())
        if blurred:
            rep.p("Insertion AUC (blurred start): insertion starting from a Gaussian-blurred copy of the image "
                  "(as RISE does) instead of black.")
        tables["faithfulness"] = _metric_table("method", res["faithfulness"], FAITH_COLS + (BLUR_COL,) * blurred)
        rep.table(tables["faithfulness"])

    rep.h("3. Localisation")
    if "localisation" not in ran:
        rep.p("Not run (`sections`).")
    elif res["localisation"] is None:
        rep.p("Skipped: the prior file has no ground-truth masks.")
    else:
        rep.p(f"**N = {res['images']} images**, against the records' ground-truth masks, at {cnn['image_size']}px "
              f"(masks upsampled nearest); the pointing game counts a hit when the map's maximum lies in the mask "
              f"(no tolerance). Chance: a uniform random point hits the mask with probability = its area fraction "
              f"(a uniform map's energy share is the same); σ rows: the target blurred at the map size.")
        tables["localisation"] = _metric_table("method", res["localisation"], LOC_COLS)
        rep.table(tables["localisation"])

    rep.h("4. GAN interpretation: relevance of each prior")
    layers = pf["prior_layers"]
    rep.p("Relevance of prior k = mean |G(x, P) − G(x, P with C_k replaced)| over images and pixels; replaced by "
          "zeros, or by the mean map of C_k over the evaluated images. Which layers each prior averages:")
    rep.table(Table(["prior", "layers averaged", "first averaged", "last averaged"],
                    [[f"C{k}", len(layers[k]) if k < len(layers) else 0,
                      layers[k][0] if k < len(layers) and layers[k] else "–",
                      layers[k][-1] if k < len(layers) and layers[k] else "–"] for k in range(pf["n"])],
                    [None] * 4, [None] * 4))
    if "relevance" not in ran:
        rep.p("Not run (`sections`).")
    elif gans:
        header = ["prior"] + [f"{g.label} ({v})" for g in gans for v in ("zeros", "mean")]
        rows = [[labels[k]] + [res["relevance"][g.label][v][k] for g in gans for v in ("zeros", "mean")]
                for k in range(pf["n"])]
        rep.table(Table(header, rows, [None] * len(header), [None] + [".3g"] * (len(header) - 1)))
        for g in gans:
            file = f"relevance-{g.variant}.png"
            rel = res["relevance"][g.label]
            relevance_chart(labels, {"replaced by zeros": rel["zeros"], "replaced by its mean map": rel["mean"]},
                            folder / file, f"{g.label}: relevance of each prior")
            rep.img(file, f"{g.label}: relevance of each prior")
    else:
        rep.p("No GAN checkpoints configured.")

    rep.h("5. Generalisation to other prior files")
    if "generalisation" not in ran:
        rep.p("Not run (`sections`).")
    elif not cfg.generalisation:
        rep.p("No extra prior files configured (`generalisation`).")
    rows, skipped = [], []
    for e in res["generalisation"]:
        if e["status"] != "ok":
            skipped.append(f"{e['name']} (`{e['priors']}`): skipped: {e['reason']}")
            continue
        if e["reason"]:
            skipped.append(f"{e['name']}: {e['reason']}")
        for method, vals in e["results"].items():
            rows.append([e["name"], e.get("dataset"), e.get("cnn_arch"), e["images"], method]
                        + [vals[c[0]] for c in FID_COLS])
    if rows:
        rep.table(Table(["set", "dataset", "CNN", "images", "method"] + [c[1] for c in FID_COLS], rows,
                        [None] * 8, [None] * 5 + [c[3] for c in FID_COLS]))
    rep.ul(skipped)

    rep.h("6. Training curves")
    curves = False
    for g in gans:
        file = _history_chart(g, folder)
        if file:
            rep.img(file, f"{g.label} validation metrics per epoch")
            curves = True
        else:
            notes.append(f"{g.label}: its checkpoint holds no per-epoch validation history")
    if not curves:
        rep.p("No training history in the checkpoints.")
    reg = _registry()
    reg.render_sections(rep, {s: res[s] for s in res["sections_run"] if s in reg.SECTIONS}, folder, 7)
    return rep, tables


def _finish_report(built: tuple[Report, dict[str, Table]], result: dict, runtime: dict[str, float],
                   notes: list[str], folder: Path) -> None:
    """Winners, runtimes, notes and definitions; then report.md, report.html and metrics.json into `folder`."""
    rep, tables = built
    winners = {name: t.winners() for name, t in tables.items()}
    rep.h("Winners")
    rep.ul([f"{name} · {col}: **{', '.join(w)}**" for name, cols in winners.items() for col, w in cols.items()])
    rep.h("Runtime")
    rep.table(Table(["section", "seconds"], [[k, v] for k, v in runtime.items()], [None, None], [None, ".1f"]))
    rep.h("Notes")
    rep.ul(notes or ["none"])
    rep.h("Definitions")
    rep.pre(_definitions())
    result.update(winners=winners, runtime_s=runtime, notes=notes)
    (folder / "report.md").write_text(rep.markdown(), encoding="utf-8")
    (folder / "report.html").write_text(rep.html(folder), encoding="utf-8")
    (folder / "metrics.json").write_text(json.dumps(_jsonable(result), indent=1, allow_nan=False) + "\n",
                                         encoding="utf-8")


# ----------------------------------------------------------------------------------------- CLI
def _describe_keys() -> str:
    lines = []
    for f in dataclasses.fields(EvalConfig):
        if f.metadata.get("internal"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        extra = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            extra = (extra + "; " if extra else "") + "|".join(f.metadata["choices"])
        lines.append(f"  {f.name} = {default!r}" + (f"  ({extra})" if extra else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cnnprior.evaluate",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Evaluate LSFT/GSFT generators: fidelity, faithfulness, localisation, "
                                            "prior relevance, generalisation -> outputs/eval-<name>-<timestamp>/",
                                epilog="config keys (override with --set key=value):\n" + _describe_keys()
                                + "\nsection options (a mapping under the section's name; --set section.key=value):\n"
                                + _registry().describe_options())
    p.add_argument("--config", required=True, help="evaluation YAML (see configs/eval_*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--num", type=int, help="images evaluated (overrides num; 0 = all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides device")
    p.add_argument("--out", help="report folder (must not exist); default outputs/eval-<name>-<timestamp>")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    """`python -m cnnprior.evaluate`."""
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.num is not None:
        overrides.append(f"num={args.num}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    cfg = load_eval_config(args.config, overrides)
    run_evaluation(cfg, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
