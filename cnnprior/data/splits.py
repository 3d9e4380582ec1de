"""Deterministic stratified splits of an image source (`data.source`: cnnprior/data/sources/) at a fixed size."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cnnprior.core.config import DataConfig
from cnnprior.core.errors import UserError
from cnnprior.core.schema import suggest
from cnnprior.data.sources.base import SPLITS, ImageSource, UnreadableImageError, resize_uint8
from cnnprior.data.sources.imagefolder import open_imagefolder
from cnnprior.data.sources.shapes import ShapesSource
from cnnprior.data.sources.torchvision_sets import cifar10, fashion_mnist

__all__ = ["load_split", "open_source", "OPENERS", "pool_splits", "register_source", "source_opener", "split_indices", "SplitView",
           "stratified_take"]

Opener = Callable[[DataConfig, str], ImageSource]
# data.source -> the function that opens its pool of images (`pool`: the official split where there is one);
# `register_source` adds one
OPENERS: dict[str, Opener] = {
    "shapes": lambda cfg, pool: ShapesSource(cfg.shapes_count, cfg.image_size, cfg.seed),
    "fashion_mnist": lambda cfg, pool: fashion_mnist(cfg.root, pool),
    "cifar10": lambda cfg, pool: cifar10(cfg.root, pool, cfg.download),
    "imagefolder": open_imagefolder,
}


def stratified_take(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A seeded, class-balanced subset of `count` indices (sorted)."""
    if count <= 0 or count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(labels))
    # interleave classes so any prefix is stratified
    rank = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = (np.arange(len(members)) + rng.uniform(0, 1)) / len(members)
    return np.sort(np.argsort(rank, kind="stable")[:count])


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Deterministic stratified train/val/test index arrays (every class split by the same fractions)."""
    rng = np.random.default_rng([seed, 11])
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(idx) * val_fraction))
        n_test = int(round(len(idx) * test_fraction))
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    return {k: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for k, v in parts.items()}


def pool_splits(src: ImageSource, cfg: DataConfig) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Indices of the train/val/test splits of one pool, and where each comes from.

    A pool with split folders uses them, each capped by data.limit; a split without a folder (or without images)
    is carved out of train by its fraction. A pool without split folders is capped by data.limit, then split.
    """
    folder_split = getattr(src, "split_of", None)
    if folder_split is None:
        pool = stratified_take(src.labels, cfg.limit, cfg.seed)
        parts = split_indices(src.labels[pool], cfg.val_fraction, cfg.test_fraction, cfg.seed)
        return {s: pool[parts[s]] for s in SPLITS}, dict.fromkeys(SPLITS, "")
    folders = getattr(src, "split_folders", {})
    official = {}
    for s in SPLITS:
        idx = np.flatnonzero(folder_split == s)
        if len(idx):
            official[s] = idx[stratified_take(src.labels[idx], cfg.limit, cfg.seed)]
    train = official["train"]
    parts = split_indices(src.labels[train], 0.0 if "val" in official else cfg.val_fraction,
                          0.0 if "test" in official else cfg.test_fraction, cfg.seed)
    out = {s: official[s] if s in official else train[parts[s]] for s in ("val", "test")}
    out["train"] = train[parts["train"]]
    origin = {s: f"{folders[s]}/" if s in official else f"from {folders['train']}/" for s in SPLITS}
    return out, origin


class SplitView(Dataset):
    """One split of a source at a fixed size: items are dicts of image [0,1] (3,s,s), label, mask (s,s), index.

    An unreadable file is replaced by the next readable image of the same class in this split (wrapping around),
    so counts and labels never change; the replaced files of each pass over the split are reported in one
    warning when the pass ends (every item served, the next pass begins, or the view is released).
    """

    def __init__(self, source: ImageSource, indices: np.ndarray, size: int, split: str,
                 sizes: dict[str, tuple[int, str]] | None = None):
        self.source, self.indices, self.size, self.split = source, np.asarray(indices), size, split
        self.class_names = source.class_names
        self.labels = source.labels[self.indices]
        self.has_masks = source.has_masks
        self.sizes = sizes or {split: (len(self.indices), "")}
        self.passes = 0  # passes over the split completed in this process
        self._seen: np.ndarray | None = None
        self._served = 0
        self._pass_bad: dict[int, str] = {}
        self._same_label: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        self._begin_item(i)
        src_index = int(self.indices[i])
        img, mask = self._load(i)
        if self._served == len(self):
            self.end_pass()
        pixels = torch.from_numpy(np.array(resize_uint8(img, self.size), copy=True)).float().div_(255.0)
        if pixels.ndim == 2:  # a grayscale plane (load_native) becomes three equal channels after resizing
            image = pixels.expand(3, self.size, self.size).contiguous()
        else:
            image = pixels.permute(2, 0, 1)
        if mask is None:
            m = torch.zeros(self.size, self.size)
        else:
            m = torch.from_numpy(resize_uint8(mask * 255, self.size, Image.NEAREST) > 127).float()
        return {"image": image, "label": int(self.source.labels[src_index]), "mask": m,
                "has_mask": mask is not None, "index": src_index}

    def _begin_item(self, i: int) -> None:
        """Count item i in the current pass; an item served twice means the next pass has begun."""
        if self._seen is None:
            self._seen = np.zeros(len(self), dtype=bool)
        if self._seen[i]:
            self.end_pass()
        self._seen[i] = True
        self._served += 1

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Item i's image, or if its file is unreadable the next readable one of its class in this split."""
        try:
            return self.source.load_native(int(self.indices[i]))
        except UnreadableImageError as exc:
            self._pass_bad[int(self.indices[i])] = str(exc)
        label = int(self.labels[i])
        if label not in self._same_label:
            self._same_label[label] = np.flatnonzero(self.labels == label)
        same = self._same_label[label]
        start = int(np.searchsorted(same, i))
        for k in range(1, len(same)):
            try:
                return self.source.load_native(int(self.indices[same[(start + k) % len(same)]]))
            except UnreadableImageError:
                continue
        example = self._pass_bad.pop(int(self.indices[i]))  # fatal below: nothing replaced to report later
        raise UserError(f"{self.source.describe()}: every image of class '{self.class_names[label]}' in the "
                        f"{self.split} split is unreadable, e.g. {example}")

    def end_pass(self) -> None:
        """End the current pass over the split: one warning for the files it replaced, if any."""
        if self._pass_bad:
            first = next(iter(self._pass_bad.values()))
            warnings.warn(f"{self.source.describe()}: {len(self._pass_bad)} unreadable image file(s) in pass "
                          f"{self.passes + 1} over the {self.split} split, each replaced by the next readable "
                          f"image of its class (e.g. {first})", stacklevel=3)
        self.passes += 1
        self._pass_bad, self._served = {}, 0
        if self._seen is not None:
            self._seen[:] = False

    def __del__(self) -> None:
        try:
            if getattr(self, "_pass_bad", None):
                self.end_pass()
        except Exception:  # interpreter shutdown: nothing left to report to
            pass

    def describe(self) -> str:
        """One line: the source, its classes, and the size and origin of each split."""
        names = self.class_names
        shown = ", ".join(names[:12]) + (f", ... (+{len(names) - 12} more)" if len(names) > 12 else "")
        sizes = " / ".join(f"{n} {s}" + (f" ({origin})" if origin else "")
                           for s, (n, origin) in self.sizes.items())
        return f"{self.source.describe()}: {len(names)} classes [{shown}]; {sizes}"


def register_source(name: str) -> Callable[[Opener], Opener]:
    """Register an opener under the name `data.source` takes: `@register_source("mine") def open_mine(cfg, pool)`,
    cfg the config's `data` section, pool "train" or "test" (the official split where the dataset has one)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a data source needs a non-empty name, got {name!r}")

    def add(opener: Opener) -> Opener:
        if name in OPENERS and OPENERS[name] is not opener:
            raise ValueError(f"data source {name!r} is registered already")
        OPENERS[name] = opener
        return opener

    return add


def source_opener(name: str, key: str = "data.source") -> Opener:
    """The opener registered as `name`; an unknown name is one line naming the registered ones."""
    if name not in OPENERS:
        raise UserError(f"{key}: unknown image source {name!r}" + suggest(name, list(OPENERS), listing="registered sources"))
    return OPENERS[name]


def open_source(cfg: DataConfig, pool: str = "train") -> ImageSource:
    """The image pool of a data config (`pool` = official train/test split where the dataset has one), with
    data.class_names applied. An unknown data.source is one line naming the registered ones."""
    src = source_opener(cfg.source)(cfg, pool)
    if cfg.class_names:
        src.rename(cfg.class_names)
    return src


def load_split(cfg: DataConfig, split: str) -> SplitView:
    """The `train`, `val` or `test` split of a data config, deterministic for a given seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    src = open_source(cfg, "test" if split == "test" else "train")
    if src.official_split is not None:
        # official test set is the test split; validation comes out of the official training set
        if split == "test":
            cap = int(round(cfg.limit * cfg.test_fraction)) if cfg.limit else 0
            take = stratified_take(src.labels, cap, cfg.seed)
            return SplitView(src, take, cfg.image_size, split, {"test": (len(take), "official test set")})
        pool = stratified_take(src.labels, cfg.limit, cfg.seed)
        parts = split_indices(src.labels[pool], cfg.val_fraction, 0.0, cfg.seed)
        sizes = {"train": (len(parts["train"]), "official training set"),
                 "val": (len(parts["val"]), "from the official training set")}
        return SplitView(src, pool[parts[split]], cfg.image_size, split, sizes)
    parts, origin = pool_splits(src, cfg)
    sizes = {s: (len(parts[s]), origin[s]) for s in SPLITS}
    return SplitView(src, parts[split], cfg.image_size, split, sizes)
