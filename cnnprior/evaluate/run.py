"""Evaluation stage: fidelity, faithfulness, localisation, GAN interpretation, generalisation and the sanity checks
-> one report.

    python -m cnnprior.evaluate --config configs/eval_fashion.yaml [--set key=value] [--num N] [--device D] [--out DIR]

writes outputs/eval-<name>-<timestamp>/ (report.md, report.html with its charts embedded, the charts as PNG
files, metrics.json). The folder is built under a temporary name and renamed into place at the end; an
existing folder is never written into. This module loads the models and the evaluated records, runs the
sections (one class each, cnnprior/evaluate/sections/) and writes the report; the config is read by config.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cnnprior.cnn.model import load_cnn
from cnnprior.core.errors import UserError, cli_main
from cnnprior.core.provenance import provenance, record_start
from cnnprior.core.runtime import Log, file_sha256, publish_folder, resolve_device, temp_folder
from cnnprior.core.schema import describe_keys
from cnnprior.evaluate import sections
from cnnprior.evaluate.config import L1_SUFFIX, EvalConfig, generator_keys, load_eval_config
from cnnprior.gan.checkpoint import GeneratorMeta, load_generator
from cnnprior.gan.models.base import get, names
from cnnprior.maps import metrics
from cnnprior.maps.ops import generate
from cnnprior.present.report import Report, Table
from cnnprior.priors.extract import target_module
from cnnprior.priors.priorfile import PriorFile
from cnnprior.priors.read import read_priors

__all__ = [
    "build_parser", "DEFINITIONS", "EVAL_FORMAT", "EvalGenerator", "jsonable", "load_context", "load_generators",
    "load_target_cnn", "main", "out_folder", "run_evaluation"
]

EVAL_FORMAT = "cnnprior-eval/1"
DEFINITIONS = """Images: the first `num` records of the held-out prior file (S x S pixels, RGB in [0, 1]). Every map is in
[0, 1]; a mean is over the evaluated images. Every mean comes with a 95 % percentile-bootstrap interval (2000
resamples of the images, seed 0); a margin A - B is the mean of the per-image differences with a paired
bootstrap interval.

Fidelity to the target T (the stored classic Grad-CAM of the CNN's last conv layer), at S x S:
  L1    = mean over pixels of |M - T|                                            (lower is better)
  r     = Pearson correlation of M and T over pixels; 0 when either is constant   (higher is better)
  SSIM  = Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
          data range 1, 'valid' windows                                           (higher is better)
  Rows: the LSFT and GSFT generators G(x, P), their L1-only twins (gan.adv_weight 0) and the learned
  baselines (convnet, linear: small regressors trained on the same files and inputs with L1 only), when
  configured; each prior C_k alone; the mean of the n priors; image intensity, gray = 0.299 R + 0.587 G + 0.114 B or 1 - gray, whichever had the higher mean r on the
  validation prior file (chosen by the gan stage, stored in the generator checkpoint; both rows when no
  checkpoint records a choice, since choosing on the evaluated images would select on the test data).

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

Sanity sections (mprt, prior_swap, control, gridpg; cnnprior.evaluate.sections, scores in cnnprior.evaluate.sanity) state their
definitions in their own report sections.

Generalisation: the same generators' fidelity (L1, r, SSIM) on other held-out prior files (other CNNs or
datasets) with the generators' S and n; the mean of that file's priors is shown beside them for reference.
"""


@dataclass
class EvalGenerator:
    """A generator under evaluation: its config key, variant, checkpoint, model, checkpoint meta and its maps of the
    evaluated images. `key` is a registered generator name (a GAN or a learned baseline) or `<gan>_l1` (its L1-only
    twin)."""

    key: str
    variant: str
    path: str
    model: nn.Module
    meta: GeneratorMeta
    maps: Tensor = field(default=None)  # type: ignore[assignment]

    @property
    def label(self) -> str:
        if self.key.endswith(L1_SUFFIX):
            return f"{self.variant.upper()} (L1 only)"
        if self.learned:
            return f"learned {self.variant}"
        return self.variant.upper()

    @property
    def adversarial(self) -> bool:
        """A GAN trained with its adversarial term (not a twin, not a learned baseline)."""
        return not self.key.endswith(L1_SUFFIX) and get(self.variant).adversarial

    @property
    def learned(self) -> bool:
        """A learned baseline: a registered generator that is never trained adversarially."""
        return not get(self.variant).adversarial

    @property
    def val_r(self) -> float:
        """Validation r recorded in the checkpoint (its selection score), NaN when absent."""
        return self.meta.val_r

    @property
    def size_n(self) -> tuple[int, int]:
        return self.meta.size, self.meta.n


# the gan keys an L1-only twin may differ in from its GAN (they change no training number)
TWIN_FREE_KEYS = frozenset({"adv_weight", "out", "device", "checkpoint_every", "val", "train", "randomised",
                            "milestones"})


# ----------------------------------------------------------------------------------------- loading
def _load_generator(cfg: EvalConfig, key: str, path: str, pf: PriorFile, device: torch.device,
                    notes: list[str]) -> EvalGenerator:
    model, meta = load_generator(path, device=device)
    variant = key.removesuffix(L1_SUFFIX)
    if meta.variant != variant:
        raise UserError(f"{cfg.source_file}: key '{key}': {path} is a {meta.variant} checkpoint")
    adv = meta.adv_weight
    if key.endswith(L1_SUFFIX) and adv != 0:
        raise UserError(f"{cfg.source_file}: key '{key}': {path} was trained with gan.adv_weight {adv}, not 0 (the "
                        f"L1-only twin)")
    g = EvalGenerator(key, variant, path, model, meta)
    if g.adversarial and adv == 0:
        notes.append(f"warning: {g.label} ({path}) was trained with gan.adv_weight 0: it is an L1-only model")
    if g.size_n != (pf.size, pf.n):
        raise UserError(f"{path}: generator trained on S={g.size_n[0]}, n={g.size_n[1]} priors but {pf.path} has "
                        f"S={pf.size}, n={pf.n}")
    pm = meta.priors_meta
    for k, ours in (("target", pf.meta.get("target")), ("method", pf.meta.get("method")),
                    ("order", pf.meta.get("order")), ("cnn_arch", (pf.meta.get("cnn") or {}).get("arch"))):
        if pm.get(k) is not None and ours is not None and pm.get(k) != ours:
            notes.append(f"warning: {g.label} was trained on priors with {k} {pm.get(k)!r}, the evaluated "
                         f"file has {ours!r}")
    return g


def load_generators(cfg: EvalConfig, pf: PriorFile, device: torch.device, notes: list[str]) -> list[EvalGenerator]:
    """The configured generators (GANs, their L1-only twins, learned baselines), checked against the prior file."""
    gans = []
    for key in generator_keys():  # cfg.explainers is in this order
        if key in cfg.explainers:
            gans.append(_load_generator(cfg, key, cfg.explainers[key], pf, device, notes))
        elif key in names(adversarial=True):
            notes.append(f"no {key} checkpoint configured: {key.upper()} rows are left out")
    check_comparable(gans, notes)
    return gans


def check_comparable(gans: list[EvalGenerator], notes: list[str]) -> None:
    """Margins compare at equal information: a learned baseline or L1-only twin given other inputs (gan.image,
    gan.priors) than a GAN is refused; a twin differing from its GAN in more than gan.adv_weight gets a note."""
    for g in (g for g in gans if g.adversarial):
        for other in (o for o in gans if not o.adversarial):
            if other.meta.inputs != g.meta.inputs:
                raise UserError(f"{other.path} ({other.label}) was trained on inputs (gan.image, gan.priors) "
                                f"{other.meta.inputs} but {g.path} ({g.label}) on {g.meta.inputs}; compare "
                                f"at equal information")
        twin = next((o for o in gans if o.key == f"{g.key}{L1_SUFFIX}"), None)
        if twin is None:
            continue
        a, b = g.meta.gan, twin.meta.gan
        differ = sorted(k for k in set(a) | set(b) if k not in TWIN_FREE_KEYS and a.get(k) != b.get(k))
        if differ or g.meta.generator_config != twin.meta.generator_config:
            notes.append(f"warning: {twin.label} differs from {g.label} in more than gan.adv_weight: "
                         f"{', '.join(differ) or 'generator_config'}")


def load_target_cnn(cfg: EvalConfig, pf: PriorFile, device: torch.device, notes: list[str]):
    """(CNN, its checkpoint meta, its path, target module name, target module): the prior file's CNN by default."""
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


def load_context(cfg: EvalConfig, device: torch.device, runtime: dict[str, float], log: Log) -> sections.EvalContext:
    """The evaluated records, the CNN and the generators (with their maps), and the notes so far."""
    t = time.time()
    notes: list[str] = []
    pf = read_priors(cfg.priors)
    count = len(pf) if cfg.num == 0 else min(cfg.num, len(pf))
    if count == 0:
        raise UserError(f"{pf.path}: the prior file holds no samples")
    d = pf.tensors(slice(0, count))
    cnn, cnn_meta, cnn_path, target_name, target_layer = load_target_cnn(cfg, pf, device, notes)
    n_classes = len(cnn_meta["class_names"])
    if int(d["explained"].max()) >= n_classes or int(d["explained"].min()) < 0:
        raise UserError(f"{pf.path}: explained classes reach {int(d['explained'].max())} but {cnn_path} has "
                        f"{n_classes} classes")
    gans = load_generators(cfg, pf, device, notes)
    if count < len(pf):
        notes.append(f"evaluated the first {count} of the {len(pf)} records of {pf.path} (num: {cfg.num})")
    if pf.size < metrics.SSIM_WINDOW:
        notes.append(f"SSIM left out: maps are {pf.size}x{pf.size}, smaller than its {metrics.SSIM_WINDOW}x"
                     f"{metrics.SSIM_WINDOW} window")
    runtime["load"] = time.time() - t
    log(f"evaluate: {count} images from {pf.path} (S={pf.size}, n={pf.n}), CNN {cnn_meta['arch']} at "
        f"{cnn_meta['image_size']}px, {', '.join(g.label for g in gans) or 'no GANs'}, on {device}")
    t = time.time()
    for g in gans:
        g.maps = generate(g.model, d["image"], d["priors"], cfg.batch_size, device)
    runtime["generate"] = time.time() - t
    cnn_meta = {**cnn_meta, "path": cnn_path, "target_name": target_name}
    return sections.EvalContext(cfg, pf, d, count, cnn, cnn_meta, gans, device, notes, log, target_layer)


# ----------------------------------------------------------------------------------------- the stage
def out_folder(cfg: EvalConfig, out: str | None) -> Path:
    """The report folder: `out` (which must not exist yet) or outputs/eval-<name>-<timestamp>."""
    if out:
        p = Path(out)
        if p.exists():
            raise UserError(f"--out {p}: already exists; evaluation never overwrites a report (choose a new folder)")
        return p
    return Path("outputs") / f"eval-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_evaluation(cfg: EvalConfig, out: str | None = None, log: Log = print) -> Path:
    """Run fidelity and the configured sections, write the report folder and return its path."""
    t_start = time.time()
    record_start()
    runtime: dict[str, float] = {}
    final = out_folder(cfg, out)
    device = resolve_device(cfg.device)
    ctx = load_context(cfg, device, runtime, log)
    skipped = [s for s in sections.selectable_names() if s not in cfg.sections]
    if skipped:
        ctx.notes.append(f"sections not run: {', '.join(skipped)} (sections: {', '.join(cfg.sections) or '[]'})")
    results = sections.run_sections(ctx, runtime)
    t = time.time()
    tmp = temp_folder(final)
    try:
        result = _metrics(ctx, results)
        report = _report_head(ctx, result)
        winners = sections.render_sections(report, results, tmp, ctx)
        runtime["report"] = time.time() - t
        runtime["total"] = time.time() - t_start
        _write_report(report, result, winners, runtime, ctx.notes, tmp)
        dest = publish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest != final:
        log(f"evaluate: {final} appeared meanwhile; wrote {dest} instead")
    log(f"evaluate: wrote {dest}/report.md ({runtime['total']:.1f}s)")
    return dest


def _metrics(ctx: sections.EvalContext, results: dict[str, Any]) -> dict:
    """metrics.json without winners, runtimes and notes: the run, the prior file, the models, every section."""
    cfg, pf, m = ctx.cfg, ctx.pf, ctx.pf.meta
    always, others = sections.metrics_entries(results)
    return {
        "format": EVAL_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "provenance": provenance(cfg.source_file or None),
        "config": dataclasses.asdict(cfg), "device": str(ctx.device), "images": ctx.count,
        "sections_run": [s for s in sections.section_names() if s in results and sections.SECTIONS[s].in_metrics
                         and sections.SECTIONS[s].selected(cfg)],
        "prior_file": {"path": str(pf.path), "records": len(pf), "size": pf.size, "n": pf.n,
                       "dataset": m.get("dataset"), "split": m.get("split"), "method": m.get("method"),
                       "target": m.get("target"), "target_layer": m.get("target_layer"),
                       "has_masks": bool(m.get("has_masks")), "prior_layers": m.get("prior_layers") or []},
        "cnn": {"path": ctx.cnn_meta["path"], "arch": ctx.cnn_meta["arch"], "image_size": ctx.image_size,
                "last_conv": ctx.cnn_meta["target_name"], "classes": len(ctx.cnn_meta["class_names"]),
                "val_accuracy": ctx.cnn_meta.get("val_accuracy")},
        "gans": {g.label: {"path": g.path, "epoch": g.meta.epoch, "config": g.meta.generator_config,
                           "history": g.meta.history, "budget": g.meta.entries.get("budget")} for g in ctx.gans},
        **always, "road_images": ctx.road_images,
        "deletion_insertion": {"steps": cfg.steps, "baseline": "black (zeros in [0,1] RGB input space)"},
        **others,
    }


def _report_head(ctx: sections.EvalContext, res: dict) -> Report:
    """The report's title, what was evaluated, and the generators."""
    pf, cnn = res["prior_file"], res["cnn"]
    rep = Report(f"cnnprior evaluation: {ctx.cfg.name}")
    rep.p(f"**{res['images']} images** from `{pf['path']}` ({pf['dataset']}, split {pf['split']}, S={pf['size']}, "
          f"n={pf['n']} priors, {pf['method']} target at `{pf['target_layer']}`); CNN `{cnn['path']}` "
          f"({cnn['arch']}, {cnn['image_size']}px, last conv `{cnn['last_conv']}`); device {res['device']}; "
          f"created {res['created']}.")
    rep.ul([f"{g.label}: `{g.path}` (epoch {g.meta.epoch}, "
            f"{sum(p.numel() for p in g.model.parameters()):,} parameters; trained "
            + (g.meta.budget.describe() if g.meta.budget is not None else "budget not recorded") + ")"
            for g in ctx.gans])
    return rep


def _write_report(rep: Report, result: dict, winners: dict[str, dict], runtime: dict[str, float],
                  notes: list[str], folder: Path) -> None:
    """Winners, runtimes, notes and definitions; then report.md, report.html and metrics.json into `folder`."""
    rep.h("Winners")
    rep.ul([f"{name} · {col}: **{', '.join(w)}**" for name, cols in winners.items() for col, w in cols.items()])
    rep.h("Runtime")
    rep.table(Table(["section", "seconds"], [[k, v] for k, v in runtime.items()], [None, None], [None, ".1f"]))
    rep.h("Notes")
    rep.ul(notes or ["none"])
    rep.h("Definitions")
    rep.pre(DEFINITIONS)
    result.update(winners=winners, runtime_s=runtime, notes=notes)
    (folder / "report.md").write_text(rep.markdown(), encoding="utf-8")
    (folder / "report.html").write_text(rep.html(folder), encoding="utf-8")
    (folder / "metrics.json").write_text(json.dumps(jsonable(result), indent=1, allow_nan=False) + "\n",
                                         encoding="utf-8")


def jsonable(x: Any) -> Any:
    """NaN/inf -> None, tensors/arrays -> lists, recursively (metrics.json stays strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (Tensor, np.ndarray)):
        return jsonable(x.tolist())
    return x


# ----------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cnnprior.evaluate",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Evaluate LSFT/GSFT generators: fidelity, faithfulness, localisation, "
                                            "prior relevance, generalisation -> outputs/eval-<name>-<timestamp>/",
                                epilog="config keys (override with --set key=value):\n" + describe_keys(EvalConfig)
                                + "\nsection options (a mapping under the section's name; --set section.key=value):\n"
                                + sections.describe_options())
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

