"""Where inference samples come from: a prior file, or image files whose priors are computed from a CNN.

Both give an `InputSet`: the samples' count, class names and provenance, and batches of prior-file records.
To add a source, write one function that returns an InputSet and choose it in `inference.load_inputs`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnprior.core.errors import UserError
from cnnprior.core.runtime import file_sha256
from cnnprior.data.sources.base import IMAGE_EXTENSIONS, read_image, resize_uint8
from cnnprior.explain.api import Explainer
from cnnprior.priors import cams
from cnnprior.priors.read import read_priors
from cnnprior.priors.spec import spec_from_sidecar

__all__ = [
    "Batch", "collect_images", "default_checkpoint", "DEFAULT_CNN", "DEFAULT_CONFIG", "default_missing",
    "DEFAULT_NAME", "DEFAULT_PRIORS", "default_cnn", "image_input", "InputSet", "prior_file_input",
    "priors_text", "produce_command", "read_images", "target_text", "warn"
]

DEFAULT_NAME = "fashion_resnet18"
DEFAULT_CONFIG = f"configs/{DEFAULT_NAME}.yaml"


def produce_command(variant: str) -> str:
    """The commands that produce the shipped default files for `variant`."""
    return (f"python train.py --config {DEFAULT_CONFIG} --stage classifier && python train.py --config "
            f"{DEFAULT_CONFIG} --stage priors && python train.py --config configs/fashion_{variant}_cpu.yaml --stage gan")


def default_checkpoint(variant: str) -> str:
    """The shipped generator file of a registered generator name (models/<default name>-<name>.pt)."""
    return f"models/{DEFAULT_NAME}-{variant}.pt"


DEFAULT_PRIORS = f"npys/{DEFAULT_NAME}-test.npy"
DEFAULT_CNN = f"models/{DEFAULT_NAME}-cnn.pt"


def warn(msg: str) -> None:
    """A warning line on stderr."""
    print(f"warning: {msg}", file=sys.stderr)


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


def default_missing(path: str, what: str, how: str) -> UserError:
    """The error for a missing default input file, with the command that produces it."""
    return UserError(f"{path}: default {what} not found; produce it with `{how}` (or pass the file explicitly)")


def prior_file_input(path: str | None, pm: dict, variant: str, checkpoint: Path, limit: int) -> InputSet:
    """Samples from a prior file; it must have the generator's n and S (other differences are warned about)."""
    if not path:
        path = DEFAULT_PRIORS
        if not Path(path).is_file():
            raise default_missing(path, "prior file", f"python train.py --config {DEFAULT_CONFIG} --stage priors")
    pf = read_priors(path)
    size, n = int(pm["size"]), int(pm["n"])
    if (pf.n, pf.size) != (n, size):
        raise UserError(f"{pf.path}: priors have n={pf.n}, S={pf.size} but the {variant} generator {checkpoint} was "
                        f"trained on n={n}, S={size}; use a prior file written with the same priors settings")
    for key in ("order", "target", "method"):
        if pm.get(key) is not None and pf.meta.get(key) != pm.get(key):
            warn(f"{pf.path}: priors {key} is {pf.meta.get(key)!r} but the generator was trained on {pm.get(key)!r}")
    count = len(pf) if not limit else min(limit, len(pf))
    if count == 0:
        raise UserError(f"{pf.path}: prior file holds no samples")

    def batches(batch_size: int) -> Iterator[Batch]:
        for s in range(0, count, batch_size):
            rec = np.array(pf.select(slice(s, min(count, s + batch_size))))
            yield Batch(rec, [f"{pf.path}#{int(i)}" for i in rec["index"]])

    m = pf.meta
    prov = {"input": f"prior file {pf.path} ({count} of {len(pf)} samples, split {m.get('split')}, content sha256 "
                     f"{m.get('content_sha256', '?')})",
            "CNN": f"{(m.get('cnn') or {}).get('arch')} ({(m.get('cnn') or {}).get('checkpoint')})",
            "target": target_text(m), "priors": priors_text(m)}
    names = [str(c) for c in m.get("class_names") or []]
    return InputSet("priors", str(m.get("dataset") or pf.path.stem), count, names, prov, batches)


def target_text(m: dict) -> str:
    """How the target maps were made, from a sidecar (for the provenance)."""
    layer = f" ({m['target_layer']})" if m.get("target_layer") else ""
    return f"{cams.title(m.get('method'))} of the {m.get('target')} conv layer{layer}"


def priors_text(m: dict) -> str:
    """How the priors were made, from a sidecar (for the provenance)."""
    return (f"n={m.get('n')}, S={m.get('size')}, order={m.get('order')}, include_target_layer="
            f"{m.get('include_target_layer')}, explain={m.get('explain')}, positions={m.get('positions')}")


def collect_images(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Image files named by `paths` (folders searched recursively by extension) and paths not found."""
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


def default_cnn(cnn_path: str | None) -> str:
    """The CNN checkpoint for --images: the given one, else the shipped default (a clear error if missing)."""
    if cnn_path:
        return cnn_path
    if not Path(DEFAULT_CNN).is_file():
        raise default_missing(DEFAULT_CNN, "CNN checkpoint",
                              f"python train.py --config {DEFAULT_CONFIG} --stage classifier")
    return DEFAULT_CNN


def image_input(paths: Sequence[str], ex: Explainer, cnn_path: str, limit: int) -> InputSet:
    """Samples from image files: priors and the target map computed on the fly by the explainer's CNN."""
    pm, model = ex.priors_meta, ex.extractor.model
    notes = []
    if pm.get("explain") not in (None, "predicted"):
        notes.append(f"the generator was trained explaining the {pm['explain']} class; image files have no labels, "
                     f"so the CNN's predicted class is explained")
        warn(notes[-1])
    files, skipped = collect_images(paths)
    images, used, unreadable = read_images(files, int(model.image_size), limit)
    skipped += unreadable
    shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
    if not images:
        raise UserError(f"no usable images in {' '.join(map(str, paths))}: found {len(files)} image file(s)"
                        + (f"; skipped {shown}" if skipped else "") + " (readable: png, jpeg, bmp, gif, tiff, webp, "
                        "ppm/pgm)")
    if skipped:
        notes.append(f"skipped {len(skipped)} unusable path(s): {shown}")
        warn(notes[-1])
    for note in ex.notes:
        notes.append(f"{cnn_path}: {note}")
        warn(notes[-1])

    def batches(batch_size: int) -> Iterator[Batch]:
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.stack(images[s:s + batch_size])).permute(0, 3, 1, 2).float() / 255.0
            yield Batch(ex.records(x, start=s), [str(f) for f in used[s:s + batch_size]])

    meta = {**spec_from_sidecar(pm).as_dict(), **ex.extractor.describe()}
    prov = {"input": f"{len(images)} image file(s) from {' '.join(map(str, paths))}",
            "CNN": f"{model.arch} ({cnn_path}, sha256 {file_sha256(cnn_path)}, input {model.image_size} px)",
            "target": target_text(meta), "priors": priors_text(meta)}
    return InputSet("images", "images", len(images), [str(c) for c in model.class_names], prov, batches, notes)
