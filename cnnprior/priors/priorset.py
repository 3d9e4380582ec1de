"""The prior-set format: one prior split as shard files (each an ordinary prior file with its sidecar) and a manifest.

A torchrun priors stage writes one shard per rank — a contiguous block of whole batches of the single-process
order, so the records in shard order are the ones one process writes — and rank 0 writes the manifest
`<stem>.priorset.json`; the shards are `<stem>-shard<rank>-of<world>.npy` (five digits each) beside it. The
manifest (format PRIORSET_FORMAT) holds the shard file names (relative to the manifest), each shard's first
record, count and content SHA-256, the total count, the SHA-256 of all records in order (the same value as the
`content_sha256` of one prior file holding those records), the record layout and the sidecar metadata the shards
share. Opening a set checks layouts, counts and sidecars against the manifest but hashes nothing; `verify`
hashes every shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from cnnprior.core.errors import UserError
from cnnprior.core.runtime import atomic_write_text
from cnnprior.priors.meta import load_json
from cnnprior.priors.priorfile import (
    PriorFile,
    PriorRecords,
    read_prior_file,
    record_chunks,
    sidecar_path,
)

__all__ = [
    "first_difference", "is_manifest", "load_manifest", "manifest_path", "MANIFEST_SUFFIX", "PriorSet",
    "PRIORSET_FORMAT", "read_priorset", "set_outputs", "set_stem", "shard_bounds", "shard_files", "SHARD_KEYS",
    "shard_path", "shared_meta", "write_manifest"
]

PRIORSET_FORMAT = "cnnprior-priorset/1"
MANIFEST_SUFFIX = ".priorset.json"
# sidecar keys that differ between the shards of one set; every other key is the set's shared metadata
SHARD_KEYS = ("count", "content_sha256", "dtype", "shard")


def is_manifest(path: str | Path) -> bool:
    """Whether `path` names a prior-set manifest (by its suffix)."""
    return Path(path).name.endswith(MANIFEST_SUFFIX)


def set_stem(path: str | Path) -> Path:
    """`<stem>` of a set named by its manifest or by its `<stem>.npy` prior-file name."""
    p = Path(path)
    return p.with_name(p.name.removesuffix(MANIFEST_SUFFIX) if is_manifest(p) else p.name.removesuffix(".npy"))


def manifest_path(path: str | Path) -> Path:
    """The manifest of the set whose prior-file name is `<stem>.npy`: `<stem>.priorset.json`."""
    stem = set_stem(path)
    return stem.with_name(stem.name + MANIFEST_SUFFIX)


def shard_path(path: str | Path, index: int, world: int) -> Path:
    """Shard `index` of `world` of the set named `<stem>.npy` (or by its manifest): `<stem>-shard00000-of00002.npy`."""
    stem = set_stem(path)
    return stem.with_name(f"{stem.name}-shard{index:05d}-of{world:05d}.npy")


def shard_files(path: str | Path) -> dict[int, list[Path]]:
    """Shard files of the set named `path` found on disk, finished or partial, by the world size in their name."""
    stem = set_stem(path)
    pattern = re.compile(rf"{re.escape(stem.name)}-shard\d{{5}}-of(\d{{5}})\.npy(\.partial|\.progress\.json)?")
    found: dict[int, list[Path]] = {}
    if stem.parent.is_dir():
        for f in sorted(stem.parent.iterdir()):
            m = pattern.fullmatch(f.name)
            if m:
                found.setdefault(int(m.group(1)), []).append(f)
    return found


def shard_bounds(count: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Records [start, stop) of rank's shard: a contiguous block of whole batches of the single-process order."""
    batches = -(-count // batch_size)
    return (min(rank * batches // world * batch_size, count),
            min((rank + 1) * batches // world * batch_size, count))


def shared_meta(meta: dict) -> dict:
    """A shard sidecar without its per-shard keys: the metadata every shard of a set has in common."""
    return {k: v for k, v in meta.items() if k not in SHARD_KEYS}


def first_difference(a: dict, b: dict) -> str:
    """The first key whose value differs between two sidecars (for error messages)."""
    return next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), "?")


class PriorSet(PriorRecords):
    """A validated prior set, read like a PriorFile: `meta`, `path` (the manifest), `len`, `tensors`, `records`.

    `parts` are the shards' memmapped record arrays in order; `records` concatenates them into memory (fine for
    small sets; stream `parts` or use `select` for large ones).
    """

    def __init__(self, path: Path, manifest: dict, shards: list[PriorFile]):
        self.path, self.manifest, self.shards = path, manifest, shards
        self.parts = [pf.records for pf in shards]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = self.parts[0].dtype
        self.meta = dict(manifest["meta"], count=int(manifest["count"]), content_sha256=manifest["content_sha256"],
                         dtype=manifest.get("dtype"))

    def __len__(self) -> int:
        return int(self.starts[-1])

    @cached_property
    def records(self) -> np.ndarray:
        """All records as one structured array (in memory unless the set has a single shard)."""
        filled = [p for p in self.parts if len(p)]
        return filled[0] if len(filled) == 1 else np.concatenate(self.parts)

    def select(self, idx: Iterable[int] | slice | None = None) -> np.ndarray:
        """The records at `idx` (set-wide indices), read from the shards without joining them all."""
        if idx is None:
            return self.records
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step == 1:
                pieces = [p[max(start - s, 0):max(stop - s, 0)]
                          for p, s in zip(self.parts, self.starts[:-1], strict=True)]
                pieces = [p for p in pieces if len(p)]
                return pieces[0] if len(pieces) == 1 else np.concatenate(pieces or [self.parts[0][:0]])
            idx = range(start, stop, step)
        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        ids = np.asarray(idx if isinstance(idx, np.ndarray) else list(idx), dtype=np.int64).reshape(-1)
        ids = np.where(ids < 0, ids + len(self), ids)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"index out of range for a prior set of {len(self)} records")
        which = np.searchsorted(self.starts, ids, side="right") - 1
        out = np.empty(len(ids), dtype=self.dtype)
        for k in np.unique(which):
            at = which == k
            out[at] = self.parts[k][ids[at] - self.starts[k]]
        return out

    def verify(self) -> None:
        """Hash every shard and all records in order against the manifest (reads the whole set once)."""
        total = hashlib.sha256()
        for pf, entry in zip(self.shards, self.manifest["shards"], strict=True):
            own = hashlib.sha256()
            for chunk in record_chunks(pf.records):
                own.update(chunk)
                total.update(chunk)
            if own.hexdigest() != entry["content_sha256"]:
                raise UserError(f"{pf.path}: content hash differs from the manifest {self.path.name} (shard modified "
                                f"or corrupt)")
        if total.hexdigest() != self.manifest["content_sha256"]:
            raise UserError(f"{self.path}: the content hash of all records differs from the manifest (shards "
                            f"reordered or the manifest edited)")


def load_manifest(path: Path) -> dict:
    """The manifest's JSON, checked for format and fields (one-line errors)."""
    manifest = load_json(path, "prior-set manifest", "prior-set manifest", PRIORSET_FORMAT)
    shards = manifest.get("shards")
    ok = (isinstance(manifest.get("count"), int) and isinstance(manifest.get("content_sha256"), str)
          and isinstance(manifest.get("meta"), dict) and isinstance(shards, list) and shards
          and all(isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("count"), int)
                  and isinstance(s.get("content_sha256"), str) for s in shards))
    if not ok:
        raise UserError(f"{path}: manifest lacks count, content_sha256, meta or a list of shards (file, count, "
                        f"content_sha256)")
    return manifest


def read_priorset(path: str | Path, verify: bool = False) -> PriorSet:
    """Open a prior set by its manifest: every shard present, with the manifest's layout, count, hash and metadata.

    Nothing is hashed unless `verify` (then every shard is read once).
    """
    p = Path(path)
    manifest = load_manifest(p)
    shards = []
    for i, entry in enumerate(manifest["shards"]):
        f = p.parent / entry["file"]
        if not f.is_file():
            raise UserError(f"{p}: shard {entry['file']} missing ({i + 1} of {len(manifest['shards'])}; a set needs "
                            f"all its shards beside its manifest)")
        pf = read_prior_file(f, verify=False)
        if len(pf) != entry["count"]:
            raise UserError(f"{f}: holds {len(pf)} records but the manifest {p.name} says {entry['count']}")
        if pf.meta.get("content_sha256") != entry["content_sha256"]:
            raise UserError(f"{f}: its sidecar's content hash differs from the manifest {p.name} (a shard of "
                            f"another run?)")
        if shared_meta(pf.meta) != manifest["meta"]:
            raise UserError(f"{f}: sidecar key {first_difference(shared_meta(pf.meta), manifest['meta'])!r} differs "
                            f"from the manifest {p.name} (a shard of another run?)")
        if shards and pf.records.dtype != shards[0].records.dtype:
            raise UserError(f"{f}: record layout differs from {shards[0].path.name}")
        shards.append(pf)
    total = sum(len(pf) for pf in shards)
    if total != manifest["count"]:
        raise UserError(f"{p}: shards hold {total} records but the manifest says {manifest['count']}")
    if manifest.get("dtype") is not None and manifest["dtype"] != str(shards[0].records.dtype.descr):
        raise UserError(f"{p}: record layout of the shards differs from the manifest's")
    ps = PriorSet(p, manifest, shards)
    if verify:
        ps.verify()
    return ps


def write_manifest(path: str | Path, shards: Sequence[str | Path], batch_size: int | None = None,
                   overwrite: bool = False, verify: bool = False) -> Path:
    """Write the manifest of finished shard files (in record order) atomically; returns its path.

    Reads every shard once to hash all records in order. `verify` also checks each shard's bytes against its
    sidecar's hash (shards copied from other machines); without it the sidecars' hashes are taken as written.
    """
    p = Path(path)
    if not is_manifest(p):
        raise UserError(f"{p}: a prior-set manifest's name ends with {MANIFEST_SUFFIX}")
    if p.exists() and not overwrite:
        raise UserError(f"{p}: prior set exists; use --overwrite to replace it")
    if not shards:
        raise UserError(f"{p}: a prior set needs at least one shard")
    files = [read_prior_file(s, verify=False) for s in shards]
    common = shared_meta(files[0].meta)
    for pf in files[1:]:
        if shared_meta(pf.meta) != common:
            raise UserError(f"{pf.path}: sidecar key {first_difference(shared_meta(pf.meta), common)!r} differs from "
                            f"{files[0].path.name}'s; the shards of a set must come from one run")
        if pf.records.dtype != files[0].records.dtype:
            raise UserError(f"{pf.path}: record layout differs from {files[0].path.name}'s")
    entries, total, start = [], hashlib.sha256(), 0
    for pf in files:
        own = hashlib.sha256()
        for chunk in record_chunks(pf.records):
            total.update(chunk)
            if verify:
                own.update(chunk)
        if not pf.meta.get("content_sha256"):
            raise UserError(f"{sidecar_path(pf.path)}: sidecar lacks content_sha256")
        if verify and own.hexdigest() != pf.meta["content_sha256"]:
            raise UserError(f"{pf.path}: content hash differs from its sidecar (file modified or corrupt)")
        entries.append({"file": Path(os.path.relpath(pf.path, p.parent)).as_posix(), "start": start,
                        "count": len(pf), "content_sha256": pf.meta["content_sha256"]})
        start += len(pf)
    manifest = {"format": PRIORSET_FORMAT, "count": start, "content_sha256": total.hexdigest(),
                "dtype": str(files[0].records.dtype.descr), "batch_size": batch_size, "shards": entries,
                "meta": common}
    return atomic_write_text(p, json.dumps(manifest, indent=1))


def set_outputs(path: str | Path, keep_world: int | None = None) -> list[Path]:
    """The files of the set named `path` on disk: its manifest and shards (finished or partial, with sidecars) —
    or, with `keep_world`, only the shards of other world sizes (left over from other runs)."""
    found = [manifest_path(path)] if keep_world is None and manifest_path(path).exists() else []
    for world, files in shard_files(path).items():
        if world == keep_world:
            continue
        for f in files:
            found.append(f)
            if f.suffix == ".npy" and sidecar_path(f).exists():
                found.append(sidecar_path(f))
    return found
