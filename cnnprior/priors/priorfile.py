"""The prior-file format: a memmapped `.npy` of uint8 records and its `.json` sidecar; writing, reading, checking.

A record holds one image, its n priors and its target map (each quantised as round(255·m)), the optional
ground-truth mask, the labels and the explained class. The sidecar records how the priors were made (the
PriorSpec, the layers, the data set, the CNN) and a content hash; `read_priors` refuses any file that does not
match its sidecar, and opens a prior set (shards plus a manifest, `priorset.py`) wherever it opens a file. No
grad-cam here: training and inference read prior files through this module alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnnprior.core.errors import UserError
from cnnprior.core.runtime import atomic_write_text
from cnnprior.priors.meta import PRIORS_FORMAT, PriorMeta, load_json

__all__ = [
    "content_hash", "make_records", "pickle_refused", "PriorFile", "PriorRecords", "PRIORS_FORMAT", "PriorWriter",
    "read_prior_file", "record_chunks", "record_dtype", "records_tensors", "resize_images", "sidecar_path",
    "to_u8"
]

def record_dtype(size: int, n: int, with_mask: bool = True) -> np.dtype:
    """Structured record: uint8 pixels/maps (maps quantised as round(255·m)), no object fields.

    The ground-truth `mask` field exists only for sources that have masks (shapes).
    """
    fields = [("image", np.uint8, (size, size, 3)), ("priors", np.uint8, (n, size, size)),
              ("target", np.uint8, (size, size))]
    if with_mask:
        fields.append(("mask", np.uint8, (size, size)))
    fields += [("label", np.int16), ("pred", np.int16), ("explained", np.int16), ("prob", np.float32),
               ("index", np.int64)]
    return np.dtype(fields)


def to_u8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0,1] floats -> uint8 by rounding."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def sidecar_path(npy: str | Path) -> Path:
    """The `.json` sidecar beside a prior file."""
    return Path(npy).with_suffix(".json")


def record_chunks(arr: np.ndarray, nbytes: int = 64 << 20) -> Iterator[memoryview]:
    """The records' bytes in order, in chunks of about `nbytes` (what the content hashes read); views of the
    memmap where it is contiguous, so hashing a file adds no copy of it to the process's anonymous memory."""
    step = max(1, nbytes // max(1, arr.dtype.itemsize))
    for i in range(0, len(arr), step):
        yield memoryview(np.ascontiguousarray(arr[i:i + step])).cast("B")


def content_hash(arr: np.ndarray) -> str:
    """SHA-256 of the records' bytes (read in chunks of about 64 MB)."""
    h = hashlib.sha256()
    for chunk in record_chunks(arr):
        h.update(chunk)
    return h.hexdigest()


class PriorWriter:
    """Writes a prior file chunk by chunk into a temp memmap; `close()` renames it into place with its sidecar."""

    def __init__(self, path: str | Path, count: int, meta: dict, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.progress = self.path.with_name(self.path.name + ".progress.json")
        size, n = meta["size"], meta["n"]
        self.meta = dict(meta, count=count)
        if self.path.exists() and not overwrite:
            raise UserError(f"{self.path}: prior file exists; use --overwrite to replace it (or another priors.out)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = 0
        if resume and self.partial.exists() and self.progress.exists():
            state = json.loads(self.progress.read_text())
            if state.get("meta") != json.loads(json.dumps(self.meta)):
                raise UserError(f"{self.partial}: partial file was written with other settings; delete it or drop "
                                f"--resume")
            self.arr = np.lib.format.open_memmap(self.partial, mode="r+")
            self.done = int(state["done"])
        else:
            self.arr = np.lib.format.open_memmap(self.partial, mode="w+",
                                                 dtype=record_dtype(size, n, bool(meta.get("has_masks", True))),
                                                 shape=(count,))
            self._save_progress()

    def _save_progress(self) -> None:
        atomic_write_text(self.progress, json.dumps({"done": self.done, "meta": self.meta}))

    def write(self, records: np.ndarray) -> None:
        self.arr[self.done:self.done + len(records)] = records
        self.done += len(records)
        self.arr.flush()
        self._save_progress()

    def close(self) -> Path:
        if self.done != len(self.arr):
            raise RuntimeError(f"prior file incomplete: {self.done}/{len(self.arr)}")
        self.arr.flush()
        meta = dict(self.meta, content_sha256=content_hash(self.arr), dtype=str(self.arr.dtype.descr))
        del self.arr
        self.partial.replace(self.path)
        atomic_write_text(sidecar_path(self.path), json.dumps(meta, indent=1))
        self.progress.unlink(missing_ok=True)
        return self.path


def records_tensors(r: np.ndarray, size: int) -> dict[str, torch.Tensor]:
    """Float tensors in [0,1] of structured records: image (B,3,S,S), priors (B,n,S,S), target (B,1,S,S); label,
    mask (zeros where the records have none), explained."""
    img = torch.from_numpy(np.ascontiguousarray(r["image"])).permute(0, 3, 1, 2).float() / 255.0
    return {"image": img, "priors": torch.from_numpy(np.ascontiguousarray(r["priors"])).float() / 255.0,
            "target": torch.from_numpy(np.ascontiguousarray(r["target"])).float().unsqueeze(1) / 255.0,
            "mask": (torch.from_numpy(np.ascontiguousarray(r["mask"])).float() if "mask" in r.dtype.names
                     else torch.zeros(len(r), size, size)),
            "label": torch.from_numpy(np.asarray(r["label"], dtype=np.int64)),
            "explained": torch.from_numpy(np.asarray(r["explained"], dtype=np.int64))}


class PriorRecords:
    """What every reader of priors uses, a prior file or a prior set alike: `meta` (sidecar or manifest's dict),
    `info` (the same, typed: `meta.PriorMeta`), `path`, `len()`, `parts` (memmapped record arrays), `select(idx)`
    (records), `tensors(idx)` (float tensors), `size`, `n`.
    Open either with `cnnprior.priors.read.read_priors`."""

    meta: dict
    path: Path

    @property
    def info(self) -> PriorMeta:
        """The metadata, typed (parsed from `meta`)."""
        return PriorMeta.parse(self.meta, self.path)

    @property
    def size(self) -> int:
        """Map side S in pixels."""
        return int(self.meta["size"])

    @property
    def n(self) -> int:
        """Priors per record."""
        return int(self.meta["n"])

    def select(self, idx: Iterable[int] | slice | None = None) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def tensors(self, idx: Iterable[int] | slice | None = None) -> dict[str, torch.Tensor]:
        """Float tensors in [0,1]: image (B,3,S,S), priors (B,n,S,S), target (B,1,S,S); label, mask."""
        return records_tensors(self.select(idx), self.size)


@dataclass
class PriorFile(PriorRecords):
    """A validated prior file: `records` (memmapped structured array) and `meta` (its sidecar)."""

    path: Path
    records: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.records)

    @property
    def parts(self) -> list[np.ndarray]:
        """The memmapped record arrays in order: [records] (a prior set has one per shard)."""
        return [self.records]

    def select(self, idx: Iterable[int] | slice | None = None) -> np.ndarray:
        """The records at `idx` (all for None; a slice stays a memmapped view)."""
        return self.records if idx is None else self.records[idx]


def pickle_refused(exc: ValueError) -> bool:
    """Whether np.load(allow_pickle=False) refused an object array (mmap_mode says "Python objects in dtype")."""
    return any(s in str(exc) for s in ("allow_pickle", "Object arrays", "Python objects"))


def read_prior_file(path: str | Path, verify: bool = True) -> PriorFile:
    """Open one prior file (allow_pickle=False, memmapped) and check it against its sidecar; one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: prior file not found")
    # the .npy is opened first, so a pickled file (the released layout has no sidecar) is named as such
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if pickle_refused(exc):
            raise UserError(f"{p}: holds pickled Python objects; loading it could run arbitrary code. If you trust "
                            f"its source, convert it with `python -m cnnprior.priors import {p} --out NEW.npy "
                            f"--trust-pickle`") from None
        raise UserError(f"{p}: truncated or corrupt .npy ({exc})") from None
    except (OSError, EOFError) as exc:
        raise UserError(f"{p}: unreadable .npy ({exc})") from None
    sc = sidecar_path(p)
    if not sc.is_file():
        raise UserError(f"{p}: sidecar {sc.name} missing (a prior file needs its .json; re-run --stage priors)")
    meta = load_json(sc, "sidecar", "prior sidecar", PRIORS_FORMAT)
    info = PriorMeta.parse(meta, sc)
    size, n, count = info.size, info.n, info.count
    has_mask = "mask" in (arr.dtype.names or ())
    if info.has_masks not in (None, has_mask):
        raise UserError(f"{p}: sidecar says has_masks={meta.get('has_masks')} but the records "
                        f"{'have' if has_mask else 'lack'} a mask field")
    expected = record_dtype(size, n, has_mask)
    if arr.dtype != expected:
        raise UserError(f"{p}: record layout {arr.dtype.descr} does not match the sidecar (S={size}, n={n})")
    if arr.ndim != 1 or len(arr) != count:
        raise UserError(f"{p}: holds {arr.shape[0] if arr.ndim else 0} records but the sidecar says {count}")
    if verify and meta.get("content_sha256") and content_hash(arr) != meta["content_sha256"]:
        raise UserError(f"{p}: content hash differs from the sidecar (file modified or corrupt)")
    return PriorFile(p, arr, meta)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) images resized (bilinear, antialiased) to size x size, as prior files store them."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def make_records(out: dict, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor,
                 size: int, n: int, with_mask: bool = True) -> np.ndarray:
    """Pack one batch of extractor output into prior-file records."""
    rec = np.zeros(len(images), dtype=record_dtype(size, n, with_mask))
    rec["image"] = to_u8(resize_images(images, size).permute(0, 2, 3, 1))
    rec["priors"] = to_u8(out["priors"])
    rec["target"] = to_u8(out["target"])
    if with_mask:
        if masks.shape[-1] != size:
            masks = F.interpolate(masks.unsqueeze(1).float(), size=(size, size), mode="area")[:, 0]
        rec["mask"] = (masks > 0.5).cpu().numpy().astype(np.uint8)
    rec["label"], rec["pred"], rec["explained"] = labels.numpy(), out["pred"].numpy(), out["explained"].numpy()
    rec["prob"], rec["index"] = out["prob"].numpy(), indices.numpy()
    return rec


