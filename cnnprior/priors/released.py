"""Import of the paper's released `Food_Resnet.npy` (pickled rows of jet-coloured maps) into a prior file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cnnprior.core.errors import UserError
from cnnprior.present.viz import invert_colormap
from cnnprior.priors.priorfile import PRIORS_FORMAT, PriorWriter, pickle_refused, record_dtype, sidecar_path, to_u8

__all__ = ["import_released", "released_labels", "RELEASED_ROW"]

RELEASED_ROW = "[input image, n colour maps, colour target, label]"  # one row of the released layout


def _released_rows(src: Path) -> np.ndarray:
    """The pickled rows of a released file as an (N, 4) object array (loaded only after --trust-pickle)."""
    try:
        rows = np.load(src, allow_pickle=True)
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign pickle is reported as one line
        raise UserError(f"{src}: could not load ({type(exc).__name__}: {str(exc)[:160]})") from None
    if rows.ndim != 2 or rows.shape[1] != 4 or len(rows) == 0:
        raise UserError(f"{src}: expected rows of {RELEASED_ROW}, got an array of shape {rows.shape}")
    return rows


def _released_label(value: object, row: int, src: Path) -> str | int:
    """One row's label: a class name (the released npy_generation.py writes the class folder name) or an int."""
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value, dtype=object)
        if arr.size != 1:
            raise UserError(f"{src}: row {row}: label has {arr.size} values; expected one class name or integer")
        value = arr.reshape(-1)[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{src}: row {row}: label is an empty class name")
        return str(value).strip()
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        number = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        number = int(value)
    else:
        raise UserError(f"{src}: row {row}: label {value!r} is neither a class name nor an integer")
    if not 0 <= number <= np.iinfo(np.int16).max:
        raise UserError(f"{src}: row {row}: label {number} is outside 0..{np.iinfo(np.int16).max}")
    return number


def released_labels(values: Sequence, src: Path, class_names: Sequence[str] | None = None
                    ) -> tuple[np.ndarray, list[str]]:
    """Label indices and class names: names map to indices in sorted order (or --classes order); ints stay."""
    labels = [_released_label(v, i, src) for i, v in enumerate(values)]
    named = [i for i, v in enumerate(labels) if isinstance(v, str)]
    if named and len(named) != len(labels):
        number = next(i for i, v in enumerate(labels) if not isinstance(v, str))
        raise UserError(f"{src}: row {number}: label {labels[number]!r} is a number but row {named[0]} has the class "
                        f"name {labels[named[0]]!r}; labels must be all names or all integers")
    if class_names is not None and len(set(class_names)) != len(class_names):
        raise UserError(f"--classes: names repeat ({', '.join(class_names)})")
    if named:
        names = list(class_names) if class_names else sorted(set(labels))
        lookup = {name: i for i, name in enumerate(names)}
        missing = next((i for i, v in enumerate(labels) if v not in lookup), None)
        if missing is not None:
            raise UserError(f"{src}: row {missing}: class name {labels[missing]!r} is not among --classes")
        return np.array([lookup[v] for v in labels], dtype=np.int64), names
    top = max(labels)
    if class_names and top >= len(class_names):
        raise UserError(f"{src}: row {labels.index(top)}: label {top} but --classes names only {len(class_names)} "
                        f"classes")
    return np.array(labels, dtype=np.int64), list(class_names) if class_names else [str(i) for i in range(top + 1)]


def _released_pixels(values: Sequence, first_row: int, shape: tuple[int, ...], what: str, src: Path) -> np.ndarray:
    """Stack one column of rows as uint8, checking each row's shape and whole values in 0..255."""
    out = np.empty((len(values), *shape), dtype=np.uint8)
    for k, value in enumerate(values):
        where = f"{src}: row {first_row + k}: {what}"
        try:
            arr = np.asarray(value)
        except ValueError:  # a ragged nested list
            raise UserError(f"{where} is not a regular array") from None
        if arr.shape != shape:
            raise UserError(f"{where} has shape {arr.shape}, expected {shape} (as in row 0)")
        if arr.dtype.kind not in "uif":
            raise UserError(f"{where} is not numeric (dtype {arr.dtype})")
        if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and np.array_equal(arr, np.rint(arr))):
            raise UserError(f"{where} holds non-integer values; the released layout stores uint8 colour images")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise UserError(f"{where} has values outside 0..255")
        out[k] = arr
    return out


def import_released(src: str | Path, out: str | Path, trust_pickle: bool = False, overwrite: bool = False,
                    cmap: str = "jet", class_names: Sequence[str] | None = None, chunk: int = 256) -> Path:
    """Convert the paper's released `Food_Resnet.npy` (pickled rows of jet-coloured maps) into a prior file."""
    src = Path(src)
    if not src.is_file():
        raise UserError(f"{src}: file not found")
    if not trust_pickle:
        try:
            np.load(src, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            if not pickle_refused(exc):
                raise UserError(f"{src}: truncated or corrupt .npy ({exc})") from None
            raise UserError(f"{src}: holds pickled Python objects; loading it can execute arbitrary code. Only if "
                            f"you trust its source, re-run with --trust-pickle") from None
        raise UserError(f"{src}: not in the released object layout (it loads without pickle: already numeric?)")
    rows = _released_rows(src)
    first = np.asarray(rows[0, 1]) if isinstance(rows[0, 1], (list, tuple, np.ndarray)) else np.empty(0)
    if first.ndim != 4 or first.shape[-1] != 3 or first.shape[1] != first.shape[2]:
        raise UserError(f"{src}: row 0: maps must be (n, S, S, 3) colour images, got shape {first.shape}")
    n, size = first.shape[0], first.shape[1]
    labels, names = released_labels(rows[:, 3], src, class_names)
    meta = {"format": PRIORS_FORMAT, "size": size, "n": n, "method": "released-guided-gradcam",
            "order": "output_to_input", "target": "first", "include_target_layer": True, "explain": "class0",
            "layers": [], "target_layer": "", "average_order": [], "positions": [], "prior_layers": [],
            "split": "imported", "dataset": src.stem, "class_names": names, "has_masks": False,
            "cnn": {"arch": "released", "checkpoint": str(src), "checkpoint_sha256": "", "image_size": size},
            "imported_from": str(src), "colormap": cmap}
    taken = [p for p in (Path(out), sidecar_path(out)) if p.exists()]  # the sidecar is an output too
    if taken and not overwrite:
        raise UserError(f"{taken[0]}: prior file exists; use --overwrite to replace it (or another --out)")
    writer = PriorWriter(Path(out), len(rows), meta, overwrite=overwrite)
    try:
        for s in tqdm(range(0, len(rows), chunk), desc="import", dynamic_ncols=True):
            part = rows[s:s + chunk]
            rec = np.zeros(len(part), dtype=record_dtype(size, n, with_mask=False))
            rec["image"] = _released_pixels(part[:, 0], s, (size, size, 3), "input image", src)
            maps = _released_pixels(part[:, 1], s, (n, size, size, 3), "maps", src)
            rec["priors"] = to_u8(invert_colormap(maps, cmap))
            rec["target"] = to_u8(invert_colormap(_released_pixels(part[:, 2], s, (size, size, 3), "target", src),
                                                  cmap))
            rec["label"] = rec["pred"] = rec["explained"] = labels[s:s + chunk]
            rec["index"] = np.arange(s, s + len(part))
            writer.write(rec)
    except UserError:  # a malformed row: leave nothing half-written (an import is redone, never resumed)
        writer.partial.unlink(missing_ok=True)
        writer.progress.unlink(missing_ok=True)
        raise
    return writer.close()


