"""Inference: run a trained LSFT/GSFT generator on a prior file or on image files (inputs.py); score it (scores.py);
write a run folder; the `<variant>_inference.py` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm import tqdm

from cnnprior.cnn.model import load_cnn
from cnnprior.core.errors import UserError, cli_main
from cnnprior.core.runtime import file_sha256, publish_folder, resolve_device, temp_folder
from cnnprior.explain.api import Explainer
from cnnprior.explain.inputs import (
    DEFAULT_CNN,
    DEFAULT_PRIORS,
    InputSet,
    default_checkpoint,
    default_cnn,
    image_input,
    prior_file_input,
    produce_command,
    warn,
)
from cnnprior.explain.learned import Learned, load_learned
from cnnprior.explain.scores import ScoreTable, build_metrics, format_table, rounded
from cnnprior.gan.checkpoint import PAPER_SCRIPTS, GeneratorMeta, load_generator
from cnnprior.gan.models.base import DEFAULT, get
from cnnprior.maps.baselines import BaselineChoice
from cnnprior.maps.ops import generate
from cnnprior.present.viz import colorize, make_sheet, overlay, save_png, write_index_html
from cnnprior.priors import cams

__all__ = [
    "build_parser", "load_inputs", "main", "Options", "output_stem", "OUTPUTS", "OVERLAY_ALPHA", "provenance",
    "resolve_checkpoint", "run", "RUN_MARKER", "RunFolder", "sanitize", "SHEET_CELL", "SHEET_ROWS", "STEM_CHARS",
    "SUBDIRS", "write_index", "write_samples", "Written"
]

OUTPUTS = "outputs"
SHEET_ROWS = 16
SHEET_CELL = 128
OVERLAY_ALPHA = 0.5
SUBDIRS = ("inputs", "gradcam", "gan", "overlays")
STEM_CHARS = 80  # an input's stem is cut to this many characters in output names
RUN_MARKER = "metrics.json"  # a folder holding it is an inference run; only such a folder may be replaced


def output_stem(index: int, width: int, class_name: str, source: str | None = None) -> str:
    """`<NNNN>_<class>`, or `<NNNN>_<source stem>_<class>` for an image file, so each output names its input."""
    middle = [sanitize(Path(source).stem, "image")[:STEM_CHARS]] if source is not None else []
    return "_".join([f"{index:0{width}d}", *middle, class_name])


def sanitize(name: str, fallback: str = "x") -> str:
    """A file-name-safe version of a class or data set name ("T-shirt/top" -> "T-shirt_top")."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return safe or fallback


def resolve_checkpoint(path: str | None, variant: str) -> Path:
    """The generator checkpoint: --checkpoint, else the shipped default (or the `-best.pt` train.py writes)."""
    if path:
        return Path(path)
    default = Path(default_checkpoint(variant))
    best = default.with_name(f"{default.stem}-best.pt")  # what train.py's gan stage writes
    for candidate in (default, best):
        if candidate.is_file():
            return candidate
    how = produce_command(variant)
    raise UserError(f"{default}: default {variant.upper()} generator checkpoint not found (nor {best.name}); produce "
                    f"it with `{how}`, or pass --checkpoint FILE")


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


# ----------------------------------------------------------------------------------------- run
def _to_float(records: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Records -> image (B,3,S,S), priors (B,n,S,S), target (B,1,S,S) floats in [0,1] (as in training)."""
    def f(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).float() / 255.0

    return f(records["image"]).permute(0, 3, 1, 2), f(records["priors"]), f(records["target"]).unsqueeze(1)


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
    learned: list[str] | None = None  # learned-baseline checkpoints; None = the generator's siblings


@dataclass
class Written:
    """What the sample loop wrote: per-sample entries for metrics.json, the sheet's rows and their titles."""

    per_sample: list[dict] = field(default_factory=list)
    sheet_rows: list[list[np.ndarray]] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)


def load_inputs(opts: Options, ex: Explainer, ckpt: Path) -> InputSet:
    """The samples: image files (--images) or a prior file (--priors, or the default one)."""
    if opts.images:
        return image_input(opts.images, ex, opts.cnn, opts.num)
    return prior_file_input(opts.priors, ex.priors_meta, opts.variant, ckpt, opts.num)


def _write_sample(folder: Path, stem: str, rec: np.ndarray, target: np.ndarray, pred: np.ndarray,
                  cmap: str) -> list[np.ndarray]:
    """One sample's four tiles (input, target, GAN map, overlay), written into the run folder's SUBDIRS."""
    tiles = [rec["image"], colorize(target, cmap), colorize(pred, cmap),
             overlay(rec["image"], pred, OVERLAY_ALPHA, cmap)]
    for sub, tile in zip(SUBDIRS, tiles, strict=True):
        save_png(folder / sub / f"{stem}.png", tile)
    return tiles


def write_samples(folder: Path, inp: InputSet, ex: Explainer, opts: Options, table: ScoreTable,
                  learned: list[Learned] = ()) -> Written:
    """Run the generator batch by batch, score every sample and write its pictures."""
    out = Written()
    width = max(4, len(str(inp.count - 1)))
    bar = tqdm(total=inp.count, desc=f"{opts.variant} inference", unit="img", disable=opts.quiet,
               dynamic_ncols=True, file=sys.stderr)
    for batch in inp.batches(opts.batch_size):
        image, priors, target = _to_float(batch.records)
        pred = ex.generate(image, priors)
        with torch.no_grad():
            extra = {b.key: generate(b.model, image, priors, opts.batch_size, ex.device).clamp(0, 1) for b in learned}
        gan_scores = table.add(image, priors, target, pred, extra)
        for j, rec in enumerate(batch.records):
            i, cls = len(out.per_sample), int(rec["explained"])
            stem = output_stem(i, width, sanitize(inp.class_name(cls), f"class{cls}"),
                               batch.sources[j] if inp.kind == "images" else None)
            tiles = _write_sample(folder, stem, rec, target[j, 0].numpy(), pred[j, 0].numpy(), opts.cmap)
            tiles += [colorize(extra[b.key][j, 0].numpy(), opts.cmap) for b in learned]
            label = int(rec["label"])
            out.per_sample.append({"index": i, "file": f"{stem}.png", "source": batch.sources[j],
                                   "class": inp.class_name(cls), "explained": cls, "pred": int(rec["pred"]),
                                   "label": label if label >= 0 else None, "prob": rounded(rec["prob"])})
            if len(out.sheet_rows) < SHEET_ROWS:
                out.sheet_rows.append(tiles)
                out.titles.append(f"#{i} {Path(batch.sources[j]).name}: {inp.class_name(cls)} "
                                  f"r={gan_scores[j, 1]:.2f}")
        bar.update(len(batch.records))
    bar.close()
    return out


def provenance(opts: Options, ckpt: Path, gmeta: GeneratorMeta, inp: InputSet, device: torch.device,
               stamp: datetime) -> dict:
    """How the run was produced (command, checkpoint, generator, inputs), for metrics.json and index.html."""
    pm = gmeta.priors_meta
    return {"command": opts.command, "working directory": os.getcwd(), "date": stamp.isoformat(timespec="seconds"),
            "variant": opts.variant, "checkpoint": str(ckpt), "checkpoint sha256": file_sha256(ckpt),
            "generator": json.dumps(gmeta.generator_config),
            "generator trained on": f"{pm.get('dataset')} priors, {pm.get('cnn_arch')}, epochs "
                                    f"{gmeta.epoch}, val {json.dumps(gmeta.metrics)}",
            **inp.provenance, "colormap": opts.cmap, "device": str(device), "samples": str(inp.count)}


def write_index(path: Path, opts: Options, inp: InputSet, metrics: dict, prov: dict) -> None:
    """index.html: the sheet, per-sample sources and scores, the mean scores, the provenance."""
    mean, labels = metrics["mean"], metrics["labels"]
    raw = [m for m in mean if not m.endswith("_rescaled")]
    notes = [f"mean over {inp.count} samples, {labels[m]}: r {mean[m]['r']} (95% CI {mean[m]['r_ci95']}), "
             f"L1 {mean[m]['l1']}, SSIM {mean[m]['ssim']}" for m in mean] + [
                 f"GAN r - {labels[metrics['margin']['over']]} r: {metrics['margin']['r']} (95% CI "
                 f"{metrics['margin']['r_ci95']})"] + [f"baseline {k}: {v}" for k, v in
                                                      metrics["baselines"].items()] + inp.notes
    rows = [[e["index"], e["file"], e["source"], e["class"], "" if e["label"] is None else inp.class_name(e["label"]),
             e["prob"] if e["prob"] is not None else "", *(e[m]["r"] for m in raw), e["gan"]["l1"],
             e["gan"]["ssim"] if e["gan"]["ssim"] is not None else ""] for e in metrics["per_image"]]
    write_index_html(path, f"{opts.variant.upper()} inference on {inp.dataset}", "sheet.png",
                     ["#", "file", "source", "class", "label", "prob", *(f"r {labels[m]}" for m in raw),
                      "L1 GAN", "SSIM GAN"], rows, prov, notes)


def _check_options(opts: Options) -> None:
    if opts.cmap not in matplotlib.colormaps:
        raise UserError(f"--cmap: unknown matplotlib colormap {opts.cmap!r} (e.g. jet, viridis, inferno, turbo)")
    if opts.cnn and not opts.images:
        raise UserError("--cnn only applies with --images (a prior file already holds its priors)")


def run(opts: Options) -> tuple[Path, dict]:
    """Load the generator and the inputs, write the run folder, return (folder, metrics)."""
    _check_options(opts)
    device = resolve_device(opts.device)
    ckpt = resolve_checkpoint(opts.checkpoint, opts.variant)
    gen, gmeta = load_generator(ckpt, expect_variant=opts.variant, device=device)
    opts.cnn = default_cnn(opts.cnn) if opts.images else opts.cnn
    ex = Explainer(gen, gmeta, load_cnn(opts.cnn, device)[0] if opts.images else None, device, opts.batch_size)
    pm = ex.priors_meta
    inp = load_inputs(opts, ex, ckpt)
    learned, notes = load_learned(opts.learned, ckpt, gmeta, device)
    for note in notes:
        warn(note)
    inp.notes.extend(notes)
    stamp = datetime.now()
    folder = RunFolder(f"{opts.variant}-{sanitize(inp.dataset, 'data')}-{stamp:%Y%m%d-%H%M%S}", opts.out,
                       opts.overwrite)
    try:
        for sub in SUBDIRS:
            (folder.tmp / sub).mkdir()
        choice = BaselineChoice.from_dict(pm.get("baselines"))
        table = ScoreTable(choice)
        written = write_samples(folder.tmp, inp, ex, opts, table, learned)
        scores, chosen = table.resolve()
        title = opts.variant.upper() + (" GAN" if get(opts.variant).adversarial else "")
        make_sheet(written.sheet_rows, ["input", str(cams.title(pm.get("method"))), title,
                                        "overlay", *(b.label.split(" (")[0] for b in learned)],
                   folder.tmp / "sheet.png", cell=SHEET_CELL, titles=written.titles)
        prov = provenance(opts, ckpt, gmeta, inp, device, stamp)
        header = {"variant": opts.variant, "checkpoint": str(ckpt), "input": inp.kind, "dataset": inp.dataset,
                  "size": int(pm["size"]), "n": int(pm["n"]), "target": pm.get("target"), "method": pm.get("method"),
                  "provenance": prov}
        best = max((b for b in learned if b.val_r is not None), key=lambda b: b.val_r, default=None)
        metrics = build_metrics(scores, chosen, written.per_sample, header, choice, {b.key: b.label for b in learned},
                                best.key if best else None)
        (folder.tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
        write_index(folder.tmp / "index.html", opts, inp, metrics, prov)
        final = folder.commit()
    except OSError as exc:
        folder.discard()
        raise UserError(f"{folder.fixed or folder.parent}: cannot write outputs ({exc.strerror or exc})") from None
    except BaseException:
        folder.discard()
        raise
    return final, metrics


# ----------------------------------------------------------------------------------------- CLI
def _epilog(variant: str, script: str) -> str:
    # script: the command's first words as typed, e.g. `python lsft_inference.py` or `cnnprior explain`
    """The --help text after the options: defaults, what the run folder holds, examples, exit status."""
    return f"""defaults (paths relative to the current folder):
  checkpoint  {default_checkpoint(variant)} (or {Path(default_checkpoint(variant)).stem}-best.pt as train.py writes it)
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
  {script}                                  # shipped model on the shipped test priors
  {script} --num 64 --device cpu
  {script} --checkpoint models/shapes_resnet18-{variant}-best.pt --priors npys/shapes_resnet18-test.npy
  {script} --images photos/ shoe.jpg        # priors computed with the default CNN
  {script} --images photos/ --cnn models/fashion_resnet18-cnn.pt --cmap viridis
  {script} --out outputs/demo --overwrite --quiet

exit status: 0 done, 2 user error (one line on stderr; nothing half-written is left)."""


def build_parser(variant: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The `<variant>_inference.py` argument parser (--help explains inputs, outputs and examples)."""
    script = prog or f"{variant}_inference.py"
    others = [v for v in PAPER_SCRIPTS if v != variant]
    belong = (f" {others[0].upper()} checkpoints belong to {others[0]}_inference.py." if len(others) == 1 else
              " Another generator's checkpoints belong to `cnnprior explain --variant <name>`.")
    desc = (f"Run a trained {variant.upper()} generator: (image, n priors) -> explanation map, scored against the\n"
            f"Grad-CAM target map. Input: a prior file (default), or image files (--images) whose priors and\n"
            f"target are computed on the fly from the CNN.{belong}")
    epilog = _epilog(variant, prog or f"python {script}")
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
    p.add_argument("--learned", nargs="+", metavar="FILE",
                   help="learned-baseline checkpoints (linear / convnet) scored beside the GAN in metrics.json "
                        "(learned_<name>), the table, the sheet and index.html (default: the <name>-convnet.pt / "
                        "-linear.pt files next to the checkpoint; `--learned none` for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or score table; print only the folder")
    return p


@cli_main
def main(argv: list[str] | None = None, variant: str = DEFAULT, prog: str | None = None) -> int:
    """`lsft_inference.py` / `gsft_inference.py`: parse the command line and run inference."""
    argv = sys.argv[1:] if argv is None else list(argv)
    get(variant, "--variant")  # a registered generator (one line, listing the known ones)
    parser = build_parser(variant, prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error (argparse already printed it)
        return int(exc.code or 0)
    if args.num < 0 or args.batch_size < 1:
        raise UserError("--num must be >= 0 and --batch-size >= 1")
    opts = Options(variant=variant, checkpoint=args.checkpoint, priors=args.priors, images=args.images, cnn=args.cnn,
                   num=args.num, batch_size=args.batch_size, device=args.device, out=args.out,
                   overwrite=args.overwrite, cmap=args.cmap, quiet=args.quiet,
                   learned=None if args.learned is None else [p for p in args.learned if p != "none"],
                   command=shlex.join([*(prog or f"{variant}_inference.py").split(), *argv]))
    folder, metrics = run(opts)
    if opts.quiet:
        print(folder)
    else:
        print(f"wrote {folder}/ ({metrics['count']} samples: sheet.png, index.html, metrics.json)")
        print(format_table(metrics))
    return 0
