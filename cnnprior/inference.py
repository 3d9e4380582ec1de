"""Inference: run a trained LSFT/GSFT generator on a prior file or on image files; write a run folder."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cnnprior import cams
from cnnprior.baselines import BaselineChoice, baseline_maps
from cnnprior.baselines import label as baseline_label
from cnnprior.errors import UserError, cli_main
from cnnprior.maps import rescale
from cnnprior.metrics import bootstrap_ci
from cnnprior.runtime import Log, publish_folder, temp_folder

DEFAULT_NAME = "fashion_resnet18"
DEFAULT_CONFIG = f"configs/{DEFAULT_NAME}.yaml"


def produce_command(variant: str) -> str:
    """The commands that produce the shipped default files for `variant`."""
    return (f"python train.py --config {DEFAULT_CONFIG} --stage classifier && python train.py --config "
            f"{DEFAULT_CONFIG} --stage priors && python train.py --config configs/fashion_{variant}_cpu.yaml --stage gan")


DEFAULT_CHECKPOINT = {"lsft": f"models/{DEFAULT_NAME}-lsft.pt", "gsft": f"models/{DEFAULT_NAME}-gsft.pt"}
DEFAULT_PRIORS = f"npys/{DEFAULT_NAME}-test.npy"
DEFAULT_CNN = f"models/{DEFAULT_NAME}-cnn.pt"
OUTPUTS = "outputs"
SHEET_ROWS = 16
SHEET_CELL = 128
OVERLAY_ALPHA = 0.5
SUBDIRS = ("inputs", "gradcam", "gan", "overlays")
SCORES = ("l1", "r", "ssim")
STEM_CHARS = 80  # an input's stem is cut to this many characters in output names
RUN_MARKER = "metrics.json"  # a folder holding it is an inference run; only such a folder may be replaced


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def output_stem(index: int, width: int, class_name: str, source: str | None = None) -> str:
    """`<NNNN>_<class>`, or `<NNNN>_<source stem>_<class>` for an image file, so each output names its input."""
    middle = [sanitize(Path(source).stem, "image")[:STEM_CHARS]] if source is not None else []
    return "_".join([f"{index:0{width}d}", *middle, class_name])


def sanitize(name: str, fallback: str = "x") -> str:
    """A file-name-safe version of a class or data set name ("T-shirt/top" -> "T-shirt_top")."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return safe or fallback


# ----------------------------------------------------------------------------------------- inputs
@dataclass
class Batch:
    """One batch of samples in the prior-file record layout, with where each sample came from."""

    records: np.ndarray
    sources: list[str]


@dataclass
class InputSet:
    """What the generator runs on: a count, class names, provenance, and a lazy batch iterator."""

    kind: str  # "priors" or "images"
    dataset: str
    count: int
    class_names: list[str]
    provenance: dict[str, str]
    batches: Callable[[int], Iterator[Batch]]
    notes: list[str] = field(default_factory=list)

    def class_name(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else str(index)


def _default_missing(path: str, what: str, how: str) -> UserError:
    return UserError(f"{path}: default {what} not found; produce it with `{how}` (or pass the file explicitly)")


def resolve_checkpoint(path: str | None, variant: str) -> Path:
    """The generator checkpoint: --checkpoint, else the shipped default (or the `-best.pt` train.py writes)."""
    if path:
        return Path(path)
    default = Path(DEFAULT_CHECKPOINT[variant])
    best = default.with_name(f"{default.stem}-best.pt")  # what train.py's gan stage writes
    for candidate in (default, best):
        if candidate.is_file():
            return candidate
    how = produce_command(variant)
    raise UserError(f"{default}: default {variant.upper()} generator checkpoint not found (nor {best.name}); produce "
                    f"it with `{how}`, or pass --checkpoint FILE")


def prior_file_input(path: str | None, pm: dict, variant: str, checkpoint: Path, limit: int) -> InputSet:
    """Samples from a prior file; it must have the generator's n and S (other differences are warned about)."""
    from cnnprior.priorfile import read_priors

    if not path:
        path = DEFAULT_PRIORS
        if not Path(path).is_file():
            raise _default_missing(path, "prior file", f"python train.py --config {DEFAULT_CONFIG} --stage priors")
    pf = read_priors(path)
    size, n = int(pm["size"]), int(pm["n"])
    if (pf.n, pf.size) != (n, size):
        raise UserError(f"{pf.path}: priors have n={pf.n}, S={pf.size} but the {variant} generator {checkpoint} was "
                        f"trained on n={n}, S={size}; use a prior file written with the same priors settings")
    for key in ("order", "target", "method"):
        if pm.get(key) is not None and pf.meta.get(key) != pm.get(key):
            _warn(f"{pf.path}: priors {key} is {pf.meta.get(key)!r} but the generator was trained on {pm.get(key)!r}")
    count = len(pf) if not limit else min(limit, len(pf))
    if count == 0:
        raise UserError(f"{pf.path}: prior file holds no samples")

    def batches(batch_size: int) -> Iterator[Batch]:
        for s in range(0, count, batch_size):
            rec = np.array(pf.records[s:min(count, s + batch_size)])
            yield Batch(rec, [f"{pf.path}#{int(i)}" for i in rec["index"]])

    m = pf.meta
    prov = {"input": f"prior file {pf.path} ({count} of {len(pf)} samples, split {m.get('split')}, content sha256 "
                     f"{m.get('content_sha256', '?')})",
            "CNN": f"{(m.get('cnn') or {}).get('arch')} ({(m.get('cnn') or {}).get('checkpoint')})",
            "target": _target_text(m), "priors": _priors_text(m)}
    names = [str(c) for c in m.get("class_names") or []]
    return InputSet("priors", str(m.get("dataset") or pf.path.stem), count, names, prov, batches)


def _target_text(m: dict) -> str:
    layer = f" ({m['target_layer']})" if m.get("target_layer") else ""
    return f"{cams.title(m.get('method'))} of the {m.get('target')} conv layer{layer}"


def _priors_text(m: dict) -> str:
    return (f"n={m.get('n')}, S={m.get('size')}, order={m.get('order')}, include_target_layer="
            f"{m.get('include_target_layer')}, explain={m.get('explain')}, positions={m.get('positions')}")


def collect_images(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Image files named by `paths` (folders searched recursively by extension) and paths not found."""
    from cnnprior.data import IMAGE_EXTENSIONS

    files: list[Path] = []
    missing: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            missing.append(f"{p} (not found)")
    return files, missing


def read_images(files: Sequence[Path], size: int, limit: int) -> tuple[list[np.ndarray], list[Path], list[str]]:
    """Decode (any mode: grayscale, palette, RGBA, 16-bit) and resize to size; returns images, their paths, skips."""
    from cnnprior.data import read_image, resize_uint8

    images, used, skipped = [], [], []
    for f in files:
        if limit and len(images) >= limit:
            break
        try:
            images.append(resize_uint8(read_image(f), size))
        except Exception as exc:  # noqa: BLE001 - any failure to decode a user's file means "skip it"
            skipped.append(f"{f} ({type(exc).__name__})")
            continue
        used.append(f)
    return images, used, skipped


def _layer_differences(described: dict, pm: dict, cnn_arch: str) -> list[str]:
    """How the CNN's conv layers differ from those recorded with the generator's training priors."""
    diffs = []
    if pm.get("cnn_arch") and pm["cnn_arch"] != cnn_arch:
        diffs.append(f"arch {cnn_arch} vs {pm['cnn_arch']}")
    if pm.get("layers") and list(pm["layers"]) != described["layers"]:
        diffs.append(f"{len(described['layers'])} conv layers vs {len(pm['layers'])}")
    if pm.get("target_layer") and pm["target_layer"] != described["target_layer"]:
        diffs.append(f"target layer {described['target_layer']} vs {pm['target_layer']}")
    if pm.get("prior_layers") and [list(x) for x in pm["prior_layers"]] != described["prior_layers"]:
        diffs.append("the layers averaged into the priors differ")
    return diffs


def image_input(paths: Sequence[str], cnn_path: str | None, pm: dict, device: torch.device, limit: int) -> InputSet:
    """Samples from image files: priors and the target map computed on the fly from the CNN checkpoint."""
    from cnnprior.cnn import load_cnn
    from cnnprior.priorfile import make_records
    from cnnprior.priors import extractor_from, spec_from_sidecar
    from cnnprior.runtime import file_sha256

    if not cnn_path:
        cnn_path = DEFAULT_CNN
        if not Path(cnn_path).is_file():
            raise _default_missing(cnn_path, "CNN checkpoint",
                                   f"python train.py --config {DEFAULT_CONFIG} --stage classifier")
    if pm.get("method") not in cams.METHODS:
        raise UserError(f"the generator was trained on {pm.get('method')!r} priors, which --images cannot compute "
                        f"(known CAM methods: {', '.join(cams.NAMES)}); use --priors")
    spec = spec_from_sidecar(pm, explain="predicted")
    notes = []
    if pm.get("explain") not in (None, "predicted"):
        notes.append(f"the generator was trained explaining the {pm['explain']} class; image files have no labels, "
                     f"so the CNN's predicted class is explained")
        _warn(notes[-1])
    files, skipped = collect_images(paths)
    model, cnn_meta = load_cnn(cnn_path, device)
    images, used, unreadable = read_images(files, int(cnn_meta["image_size"]), limit)
    skipped += unreadable
    shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
    if not images:
        raise UserError(f"no usable images in {' '.join(map(str, paths))}: found {len(files)} image file(s)"
                        + (f"; skipped {shown}" if skipped else "") + " (readable: png, jpeg, bmp, gif, tiff, webp, "
                        "ppm/pgm)")
    if skipped:
        notes.append(f"skipped {len(skipped)} unusable path(s): {shown}")
        _warn(notes[-1])
    extractor = extractor_from(model, spec)
    diffs = _layer_differences(extractor.describe(), pm, cnn_meta["arch"])
    if diffs:
        notes.append(f"{cnn_path}: its conv layers differ from those of the CNN the generator's priors came from "
                     f"({'; '.join(diffs)})")
        _warn(notes[-1] + "; maps may not match")

    def batches(batch_size: int) -> Iterator[Batch]:
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.stack(images[s:s + batch_size])).permute(0, 3, 1, 2).float() / 255.0
            out = extractor(x)
            b = len(x)
            rec = make_records(out, x, torch.full((b,), -1, dtype=torch.int64), torch.zeros(b, spec.size, spec.size),
                               torch.arange(s, s + b), spec.size, spec.n)
            yield Batch(rec, [str(f) for f in used[s:s + b]])

    meta = {**spec.as_dict(), **extractor.describe()}
    prov = {"input": f"{len(images)} image file(s) from {' '.join(map(str, paths))}",
            "CNN": f"{cnn_meta['arch']} ({cnn_path}, sha256 {file_sha256(cnn_path)}, input "
                   f"{cnn_meta['image_size']} px)",
            "target": _target_text(meta), "priors": _priors_text(meta)}
    return InputSet("images", "images", len(images), [str(c) for c in cnn_meta["class_names"]], prov, batches, notes)


# ----------------------------------------------------------------------------------------- output folder
class RunFolder:
    """A run folder written under a hidden temp name beside it and renamed into place only when complete.

    Auto mode (out=None): outputs/<name>, or <name>-2, -3... if taken (never reused). --out DIR: DIR must be
    absent or empty, or (with overwrite) an earlier run folder, which is replaced only once the new one is done.
    """

    def __init__(self, name: str, out: str | None, overwrite: bool, root: str = OUTPUTS):
        self.fixed = Path(out) if out else None
        parent = self.fixed.parent if self.fixed else Path(root)
        self.name = self.fixed.name if self.fixed else name
        if self.fixed is not None:
            self._check_fixed(overwrite)
        try:
            self.tmp = temp_folder(parent / self.name)
        except OSError as exc:
            raise UserError(f"{self.fixed or parent}: cannot create the output folder ({exc.strerror or exc})") \
                from None
        self.parent = parent
        self.final: Path | None = None

    def _check_fixed(self, overwrite: bool) -> None:
        d = self.fixed
        if d.exists() and not d.is_dir():
            raise UserError(f"{d}: exists and is not a folder")
        if d.is_dir() and any(d.iterdir()):
            if not overwrite:
                raise UserError(f"{d}: output folder exists and is not empty; use --overwrite to replace it, or "
                                f"leave out --out for a new folder under {OUTPUTS}/")
            if not (d / RUN_MARKER).is_file():
                raise UserError(f"{d}: not an inference run folder (no {RUN_MARKER}); refusing to replace it")

    def commit(self) -> Path:
        """Rename the finished temp folder into place and return its final path."""
        if self.fixed is not None:
            os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; results are meant to be shared
            self.final = self._commit_fixed()
        else:
            self.final = publish_folder(self.tmp, self.parent / self.name)
        return self.final

    def _commit_fixed(self) -> Path:
        d = self.fixed
        old = None
        if d.is_dir() and any(d.iterdir()):
            old = d.with_name(f".{d.name}.old-{os.getpid()}-{time.time_ns()}")
            os.rename(d, old)
        elif d.is_dir():
            d.rmdir()
        try:
            os.rename(self.tmp, d)
        except OSError:
            if old is not None:
                os.rename(old, d)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return d

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------- scores
def _fidelity(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """(B, 3) array of L1, Pearson r, SSIM per sample (SSIM NaN on maps under 11 px)."""
    from cnnprior.metrics import l1, pearson, ssim_or_nan

    return torch.stack([l1(pred, target), pearson(pred, target), ssim_or_nan(pred, target)], 1).double().numpy()


@dataclass
class ScoreTable:
    """Per-sample scores of the GAN map and the trivial baselines (under the generator's validation choice)."""

    choice: BaselineChoice | None
    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)
    priors: list[np.ndarray] = field(default_factory=list)  # (B, n, 3)

    def add(self, image: torch.Tensor, priors: torch.Tensor, target: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
        """Score one batch (all (B, ., S, S) floats in [0, 1]); returns the GAN's (B, 3) scores."""
        t = target[:, 0]
        b, n = priors.shape[:2]
        maps = {"gan": pred}
        if self.choice is not None:
            maps.update(baseline_maps(image, priors, self.choice))
        else:  # no validation choice recorded: only the baselines that need none
            mean = priors.mean(1, keepdim=True)
            maps.update({"mean_prior": mean, "mean_prior_rescaled": rescale(mean)})
        for name, m in maps.items():
            self.rows.setdefault(name, []).append(_fidelity(m[:, 0], t))
        per = _fidelity(priors.reshape(b * n, *priors.shape[2:]), t.repeat_interleave(n, 0))
        self.priors.append(per.reshape(b, n, 3))
        return self.rows["gan"][-1]

    def resolve(self) -> tuple[dict[str, np.ndarray], dict]:
        """Per-method (N, 3) scores and the validation choice they were made under."""
        prior_means = np.nanmean(np.concatenate(self.priors), 0)  # (n, 3)
        c = self.choice
        chosen = {"best_prior_index": c.best_prior if c else None, "image_inverted": c.image_inverted if c else None,
                  "best_baseline": c.best_baseline if c else "mean_prior", "chosen_on": c.chosen_on if c else None,
                  "val_r": c.val_r if c else None,
                  "priors": [{"index": k, **_score_dict(prior_means[k])} for k in range(len(prior_means))]}
        return {k: np.concatenate(v) for k, v in self.rows.items()}, chosen


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


def _score_dict(row: np.ndarray) -> dict:
    return {k: _num(v) for k, v in zip(SCORES, row, strict=True)}


def _ci(values: np.ndarray) -> list[float | None]:
    return [_num(v) for v in bootstrap_ci(values)]


def build_metrics(scores: dict[str, np.ndarray], chosen: dict, per_sample: list[dict], header: dict,
                  choice: BaselineChoice | None = None) -> dict:
    """metrics.json: count, mean per method with the 95 % bootstrap CI of r, the GAN's margin over the best
    baseline (chosen on validation), the choice itself, per_image entries."""
    mean = {m: {**_score_dict(np.nanmean(v, 0)), "r_ci95": _ci(v[:, 1])} if len(v) else {} for m, v in scores.items()}
    best = chosen["best_baseline"]
    diff = scores["gan"][:, 1] - scores[best][:, 1] if len(scores["gan"]) else np.zeros(0)
    margin = {"over": best, "r": _num(diff.mean()) if len(diff) else None, "r_ci95": _ci(diff)}
    per_image = [{**entry, **{m: _score_dict(scores[m][i]) for m in scores}} for i, entry in enumerate(per_sample)]
    note = (f"chosen on the validation file {chosen['chosen_on']}" if chosen["chosen_on"] else
            "this generator checkpoint records no validation choice: best-prior and intensity baselines are left "
            "out (they would be selected on the scored data)")
    return {**header, "count": len(per_sample), "mean": mean, "margin": margin,
            "labels": {m: method_label(m, choice) for m in scores},
            "per_prior_mean": chosen["priors"],
            "baselines": {"choice": note, "best_prior_index": chosen["best_prior_index"],
                          "image_inverted": chosen["image_inverted"], "best_baseline": best, "val_r": chosen["val_r"],
                          "rescaled": "min-max rescaled per map (changes L1 and SSIM, not r)"},
            "per_image": per_image}


def method_label(method: str, choice: BaselineChoice | None) -> str:
    """A display name for a metrics key."""
    if method == "gan":
        return "GAN"
    if choice is not None:
        return baseline_label(method, choice)
    return method.replace("_rescaled", ", rescaled").replace("_", " ")


def format_table(metrics: dict) -> str:
    """The mean scores as a small text table: method | r [95 % CI] | L1 | SSIM, then the GAN's margin."""
    def cell(v: float | None) -> str:
        return f"{v:7.3f}" if v is not None else "      -"

    labels = metrics["labels"]
    lines = [f"{'method':<44} {'r':>7} {'95% CI':>16} {'L1':>7} {'SSIM':>7}"]
    for m, s in metrics["mean"].items():
        lo, hi = s["r_ci95"]
        ci = f"[{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        lines.append(f"{labels[m]:<44} {cell(s['r'])} {ci:>16} {cell(s['l1'])} {cell(s['ssim'])}")
    mg = metrics["margin"]
    if mg["r"] is not None:
        lo, hi = mg["r_ci95"]
        lines.append(f"GAN r - {labels[mg['over']]} r: {mg['r']:+.3f}, 95% CI [{lo:.3f}, {hi:.3f}]")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- run
def _to_float(records: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Records -> image (B,3,S,S), priors (B,n,S,S), target (B,1,S,S) floats in [0,1] (as in training)."""
    def f(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).float() / 255.0

    return f(records["image"]).permute(0, 3, 1, 2), f(records["priors"]), f(records["target"]).unsqueeze(1)


def _map_u8(m: torch.Tensor) -> np.ndarray:
    return np.clip(np.rint(m.numpy() * 255.0), 0, 255).astype(np.uint8)


@dataclass
class Options:
    """Resolved command-line options."""

    variant: str
    checkpoint: str | None = None
    priors: str | None = None
    images: list[str] | None = None
    cnn: str | None = None
    num: int = 0
    batch_size: int = 32
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    cmap: str = "jet"
    quiet: bool = False
    command: str = ""


def run(opts: Options, log: Log = print) -> tuple[Path, dict]:
    """Load the generator and the inputs, write the run folder, return (folder, metrics)."""
    import matplotlib

    from cnnprior.gan import load_generator
    from cnnprior.runtime import file_sha256, resolve_device
    from cnnprior.viz import colorize, make_sheet, overlay, save_png, write_index_html

    if opts.cmap not in matplotlib.colormaps:
        raise UserError(f"--cmap: unknown matplotlib colormap {opts.cmap!r} (e.g. jet, viridis, inferno, turbo)")
    if opts.cnn and not opts.images:
        raise UserError("--cnn only applies with --images (a prior file already holds its priors)")
    device = resolve_device(opts.device)
    ckpt = resolve_checkpoint(opts.checkpoint, opts.variant)
    gen, gmeta = load_generator(ckpt, expect_variant=opts.variant, device=device)
    pm = gmeta.get("priors_meta") or {}
    if "size" not in pm or "n" not in pm:
        raise UserError(f"{ckpt}: checkpoint lacks priors_meta size/n; re-save it with this version of train.py")
    if opts.images:
        inp = image_input(opts.images, opts.cnn, pm, device, opts.num)
    else:
        inp = prior_file_input(opts.priors, pm, opts.variant, ckpt, opts.num)

    stamp = datetime.now()
    folder = RunFolder(f"{opts.variant}-{sanitize(inp.dataset, 'data')}-{stamp:%Y%m%d-%H%M%S}", opts.out,
                       opts.overwrite)
    try:
        for sub in SUBDIRS:
            (folder.tmp / sub).mkdir()
        width = max(4, len(str(inp.count - 1)))
        choice = BaselineChoice.from_dict(pm.get("baselines"))
        table, per_sample, sheet_rows, titles = ScoreTable(choice), [], [], []
        bar = tqdm(total=inp.count, desc=f"{opts.variant} inference", unit="img", disable=opts.quiet,
                   dynamic_ncols=True, file=sys.stderr)
        i = 0
        for batch in inp.batches(opts.batch_size):
            image, priors, target = _to_float(batch.records)
            with torch.no_grad():
                pred = gen(image.to(device), priors.to(device)).float().clamp(0, 1).cpu()
            gan_scores = table.add(image, priors, target, pred)
            for j, rec in enumerate(batch.records):
                cls = int(rec["explained"])
                stem = output_stem(i, width, sanitize(inp.class_name(cls), f"class{cls}"),
                                   batch.sources[j] if inp.kind == "images" else None)
                g, t = pred[j, 0].numpy(), target[j, 0].numpy()
                tiles = [rec["image"], colorize(t, opts.cmap), colorize(g, opts.cmap),
                         overlay(rec["image"], g, OVERLAY_ALPHA, opts.cmap)]
                for sub, tile in zip(SUBDIRS, tiles, strict=True):
                    save_png(folder.tmp / sub / f"{stem}.png", tile)
                label = int(rec["label"])
                per_sample.append({"index": i, "file": f"{stem}.png", "source": batch.sources[j],
                                   "class": inp.class_name(cls), "explained": cls, "pred": int(rec["pred"]),
                                   "label": label if label >= 0 else None, "prob": _num(rec["prob"])})
                if len(sheet_rows) < SHEET_ROWS:
                    sheet_rows.append(tiles)
                    titles.append(f"#{i} {Path(batch.sources[j]).name}: {inp.class_name(cls)} "
                                  f"r={gan_scores[j, 1]:.2f}")
                i += 1
            bar.update(len(batch.records))
        bar.close()

        scores, chosen = table.resolve()
        cam = str(cams.title(pm.get("method")))
        make_sheet(sheet_rows, ["input", cam, opts.variant.upper() + " GAN", "overlay"], folder.tmp / "sheet.png",
                   cell=SHEET_CELL, titles=titles)
        gm = gmeta.get("metrics") or {}
        prov = {"command": opts.command, "working directory": os.getcwd(), "date": stamp.isoformat(timespec="seconds"),
                "variant": opts.variant, "checkpoint": str(ckpt), "checkpoint sha256": file_sha256(ckpt),
                "generator": json.dumps(gmeta.get("generator_config", {})),
                "generator trained on": f"{pm.get('dataset')} priors, {pm.get('cnn_arch')}, epochs "
                                        f"{gmeta.get('epoch')}, val {json.dumps(gm)}",
                **inp.provenance, "colormap": opts.cmap, "device": str(device), "samples": str(inp.count)}
        header = {"variant": opts.variant, "checkpoint": str(ckpt), "input": inp.kind, "dataset": inp.dataset,
                  "size": int(pm["size"]), "n": int(pm["n"]), "target": pm.get("target"), "method": pm.get("method"),
                  "provenance": prov}
        metrics = build_metrics(scores, chosen, per_sample, header, choice)
        (folder.tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
        mean = metrics["mean"]
        labels = metrics["labels"]
        raw = [m for m in mean if not m.endswith("_rescaled")]
        notes = [f"mean over {inp.count} samples, {labels[m]}: r {mean[m]['r']} (95% CI {mean[m]['r_ci95']}), "
                 f"L1 {mean[m]['l1']}, SSIM {mean[m]['ssim']}" for m in mean] + [
                     f"GAN r - {labels[metrics['margin']['over']]} r: {metrics['margin']['r']} (95% CI "
                     f"{metrics['margin']['r_ci95']})"] + [f"baseline {k}: {v}" for k, v in
                                                                  metrics["baselines"].items()] + inp.notes
        rows = [[e["index"], e["file"], e["source"], e["class"], "" if e["label"] is None else inp.class_name(e["label"]),
                 e["prob"] if e["prob"] is not None else "", *(e[m]["r"] for m in raw), e["gan"]["l1"],
                 e["gan"]["ssim"] if e["gan"]["ssim"] is not None else ""] for e in metrics["per_image"]]
        write_index_html(folder.tmp / "index.html", f"{opts.variant.upper()} inference on {inp.dataset}", "sheet.png",
                         ["#", "file", "source", "class", "label", "prob", *(f"r {labels[m]}" for m in raw),
                          "L1 GAN", "SSIM GAN"], rows, prov, notes)
        final = folder.commit()
    except OSError as exc:
        folder.discard()
        raise UserError(f"{folder.fixed or folder.parent}: cannot write outputs ({exc.strerror or exc})") from None
    except BaseException:
        folder.discard()
        raise
    return final, metrics


# ----------------------------------------------------------------------------------------- CLI
def build_parser(variant: str) -> argparse.ArgumentParser:
    """The `<variant>_inference.py` argument parser (--help explains inputs, outputs and examples)."""
    script = f"{variant}_inference.py"
    other = "gsft" if variant == "lsft" else "lsft"
    desc = (f"Run a trained {variant.upper()} generator: (image, n priors) -> explanation map, scored against the\n"
            f"Grad-CAM target map. Input: a prior file (default), or image files (--images) whose priors and\n"
            f"target are computed on the fly from the CNN. {other.upper()} checkpoints belong to {other}_inference.py.")
    epilog = f"""defaults (paths relative to the current folder):
  checkpoint  {DEFAULT_CHECKPOINT[variant]} (or {Path(DEFAULT_CHECKPOINT[variant]).stem}-best.pt as train.py writes it)
  priors      {DEFAULT_PRIORS}
  cnn         {DEFAULT_CNN} (with --images)
  produce them with: {produce_command(variant)}

output: a new folder {OUTPUTS}/{variant}-<dataset>-<YYYYmmdd-HHMMSS>/ (-2, -3... if taken; never reused),
written under a hidden .partial name and renamed when complete, holding
  inputs/ gradcam/ gan/ overlays/   one <NNNN>_<class>.png per sample in each (<NNNN>_<file stem>_<class>.png
                                    with --images; target and GAN maps coloured with --cmap; overlay = GAN map
                                    over the input)
  sheet.png                         first {SHEET_ROWS} samples (each titled with its source file): input |
                                    Grad-CAM | GAN | overlay
  index.html                        the sheet, per-image source file and scores, provenance (command,
                                    checkpoint sha256...)
  metrics.json                      L1, Pearson r, SSIM vs the Grad-CAM target per image and mean ("mean"),
                                    with 95 % bootstrap CIs of r, for the GAN and the trivial baselines (raw and
                                    min-max rescaled): best_prior (the single prior best on the validation
                                    file), mean_prior (mean of the n priors), image (grayscale input, or its
                                    inverse if that was better on validation); the GAN's margin over the best
                                    baseline (on validation) with its paired 95 % CI

examples:
  python {script}                                  # shipped model on the shipped test priors
  python {script} --num 64 --device cpu
  python {script} --checkpoint models/shapes_resnet18-{variant}-best.pt --priors npys/shapes_resnet18-test.npy
  python {script} --images photos/ shoe.jpg        # priors computed with the default CNN
  python {script} --images photos/ --cnn models/fashion_resnet18-cnn.pt --cmap viridis
  python {script} --out outputs/demo --overwrite --quiet

exit status: 0 done, 2 user error (one line on stderr; nothing half-written is left)."""
    p = argparse.ArgumentParser(prog=script, description=desc, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="FILE", help=f"{variant.upper()} generator checkpoint (a GAN .pt)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--priors", metavar="FILE", help=f"prior file (.npy with its .json sidecar; default "
                                                       f"{DEFAULT_PRIORS})")
    src.add_argument("--images", nargs="+", metavar="PATH",
                     help="image files or folders (searched recursively); grayscale, palette, RGBA and 16-bit "
                          "images are converted; unreadable files are skipped and listed")
    p.add_argument("--cnn", metavar="CKPT", help=f"CNN checkpoint that computes the priors for --images "
                                                 f"(default {DEFAULT_CNN}); the class is its prediction")
    p.add_argument("--num", type=int, default=0, metavar="N",
                   help="use the first N samples only (default: all); metrics cover every sample used, "
                        f"the sheet shows at most {SHEET_ROWS}")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="samples per batch (default 32)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = cuda when available (default)")
    p.add_argument("--out", metavar="DIR", help=f"write here instead of a new folder under {OUTPUTS}/; must be "
                                                f"absent or empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="with --out: replace an earlier run folder (once the new one is complete)")
    p.add_argument("--cmap", default="jet", metavar="NAME", help="matplotlib colormap for the maps (default jet)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or score table; print only the folder")
    return p


@cli_main
def main(argv: list[str] | None = None, variant: str = "lsft") -> int:
    """`lsft_inference.py` / `gsft_inference.py`: parse the command line and run inference."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(variant)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error (argparse already printed it)
        return int(exc.code or 0)
    if args.num < 0 or args.batch_size < 1:
        raise UserError("--num must be >= 0 and --batch-size >= 1")
    opts = Options(variant=variant, checkpoint=args.checkpoint, priors=args.priors, images=args.images, cnn=args.cnn,
                   num=args.num, batch_size=args.batch_size, device=args.device, out=args.out,
                   overwrite=args.overwrite, cmap=args.cmap, quiet=args.quiet,
                   command=shlex.join([f"{variant}_inference.py", *argv]))
    folder, metrics = run(opts)
    if opts.quiet:
        print(folder)
    else:
        print(f"wrote {folder}/ ({metrics['count']} samples: sheet.png, index.html, metrics.json)")
        print(format_table(metrics))
    return 0
