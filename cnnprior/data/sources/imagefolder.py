"""The `imagefolder` source: your own images in class folders, split folders or Food-11's flat layout."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from cnnprior.core.config import DataConfig
from cnnprior.core.errors import UserError
from cnnprior.data.sources.base import (
    IMAGE_EXTENSIONS,
    SPLITS,
    ImageSource,
    UnreadableImageError,
    display_names,
    read_image,
    require,
)

__all__ = [
    "detect_layout", "FLAT_NAME", "FOOD11_CLASSES", "ImageFolderSource", "LAYOUT_HELP", "open_imagefolder",
    "SPLIT_FOLDERS"
]

FOOD11_CLASSES = ("Bread", "Dairy product", "Dessert", "Egg", "Fried food", "Meat", "Noodles/Pasta", "Rice",
                  "Seafood", "Soup", "Vegetable/Fruit")  # Food-11's class indices 0..10
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "evaluation": "test"}  # folder name (any case) -> split
FLAT_NAME = re.compile(r"^(\d+)_")  # Food-11's flat layout: <class index>_<n>.jpg
LAYOUT_HELP = {"classes": "root/<class>/<images>", "splits": "root/<split>/<class>/<images>",
               "food11_flat": "root/<split>/<class index>_<n>.jpg"}


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """Sorted (sub-folder names, file names) of a folder; hidden and `__*` entries (e.g. __MACOSX) left out."""
    dirs, files = [], []
    with os.scandir(folder) as it:
        for entry in it:
            if not entry.name.startswith((".", "__")):
                (dirs if entry.is_dir() else files).append(entry.name)
    return sorted(dirs), sorted(files)


def _image_files(folder: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) below a folder, recursively, in a fixed order; nothing is opened."""
    images, other = [], []
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(files):
            if not name.startswith("."):
                is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                (images if is_image else other).append(os.path.join(base, name))
    return images, other


def _scan_class_folders(folder: Path) -> tuple[dict[str, list[str]], list[str]]:
    """{class folder name: its image files} of folder/<class>/..., and the non-image files found."""
    classes, other = {}, []
    for name in _entries(folder)[0]:
        classes[name], rest = _image_files(folder / name)
        other += rest
    return classes, other


def _scan_flat(folder: Path) -> tuple[dict[str, list[str]], list[str]]:
    """{class index: image files} of folder/<index>_<n>.<ext> (Food-11's original layout), and the other files."""
    classes: dict[str, list[str]] = {}
    other = []
    for name in _entries(folder)[1]:
        match = FLAT_NAME.match(name)
        if match and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            classes.setdefault(str(int(match[1])), []).append(str(folder / name))
        else:
            other.append(str(folder / name))
    return classes, other


def _is_flat(folder: Path) -> bool:
    dirs, files = _entries(folder)
    return not dirs and any(FLAT_NAME.match(f) for f in files)


def detect_layout(root: Path, layout: str = "auto") -> tuple[str, dict[str, str]]:
    """(layout, {split: its folder name}) of an imagefolder root; a root of split-named folders is never classes."""
    dirs = _entries(root)[0]
    named = [d for d in dirs if d.lower() in SPLIT_FOLDERS]
    all_splits = bool(dirs) and len(named) == len(dirs)
    if layout == "classes" or (layout == "auto" and not all_splits):
        if all_splits:
            raise UserError(f"imagefolder '{root}': its folders ({', '.join(dirs)}) are all split names, not classes; "
                            f"set data.layout: splits (or auto), or point data.root at one split's folder")
        if named:
            warnings.warn(f"imagefolder '{root}': class folders {', '.join(named)} look like split names but "
                          f"{', '.join(d for d in dirs if d not in named)} do not, so all are taken as classes; "
                          f"move the others out to use the splits", stacklevel=3)
        return "classes", {}
    if not all_splits:
        raise UserError(f"imagefolder '{root}': data.layout {layout} needs split folders only (train/training, "
                        f"val/valid/validation, test/evaluation) at the root, found {', '.join(dirs) or 'none'}")
    splits: dict[str, str] = {}
    for d in named:
        split = SPLIT_FOLDERS[d.lower()]
        if split in splits:
            raise UserError(f"imagefolder '{root}': both '{splits[split]}' and '{d}' name the {split} split; keep one")
        splits[split] = d
    if "train" not in splits:
        raise UserError(f"imagefolder '{root}': split folders {', '.join(named)} but no train/ (or training/) "
                        f"folder to train on")
    if layout == "auto":
        layout = "food11_flat" if _is_flat(root / splits["train"]) else "splits"
    return layout, {s: splits[s] for s in SPLITS if s in splits}


class ImageFolderSource(ImageSource):
    """Images in folders: root/<class>/, root/<split>/<class>/ or Food-11's root/<split>/<index>_<n>.jpg.

    Start-up only lists the folders (no file is opened). A file that turns out unreadable when loaded raises
    UnreadableImageError (and is remembered); SplitView then serves a replacement, so counts never change.
    """

    name = "imagefolder"

    def __init__(self, root: str, homepage: str = "", layout: str = "auto"):
        r = Path(root)
        require(r, "imagefolder", homepage, "root/<class>/<images> or root/<split>/<class>/<images>")
        if not r.is_dir():
            raise UserError(f"imagefolder: data.root '{r}' is not a folder")
        self.root = r
        self.layout, self.split_folders = detect_layout(r, layout)
        scan = _scan_flat if self.layout == "food11_flat" else _scan_class_folders
        found = {s: scan(r / d) for s, d in self.split_folders.items()} or {"": _scan_class_folders(r)}
        other = [f for _, rest in found.values() for f in rest]
        if other:
            warnings.warn(f"imagefolder '{r}': skipped {len(other)} non-image file(s) (extensions other than "
                          f"{', '.join(IMAGE_EXTENSIONS)}), e.g. {other[0]}", stacklevel=2)
        self._index({s: classes for s, (classes, _) in found.items()})
        self.unreadable: dict[int, str] = {}

    def _index(self, found: dict[str, dict[str, list[str]]]) -> None:
        """Files, labels and split of each image, grouped by split then class; classes without images dropped."""
        key = int if self.layout == "food11_flat" else str
        folders = sorted({c for classes in found.values() for c, files in classes.items() if files}, key=key)
        files, labels, splits = [], [], []
        for split, classes in found.items():
            for label, c in enumerate(folders):
                files += classes.get(c, [])
                labels += [label] * len(classes.get(c, []))
                splits += [split] * len(classes.get(c, []))
        where = f"'{self.root}'" + (f" ({self.split_folders['train']}/)" if self.split_folders else "")
        if not files or (self.split_folders and "train" not in splits):
            raise UserError(f"imagefolder {where}: no images found (expected {LAYOUT_HELP[self.layout]} with "
                            f"extensions {', '.join(IMAGE_EXTENSIONS)})")
        self.files, self.folder_names = files, folders
        self.labels = np.array(labels, dtype=np.int64)
        self.split_of = np.array(splits) if self.split_folders else None
        self.class_names = list(folders)
        if self.layout == "food11_flat":
            self.class_names = [FOOD11_CLASSES[int(c)] if int(c) < len(FOOD11_CLASSES) else c for c in folders]

    def rename(self, names: dict | list) -> None:
        """Apply `data.class_names` (display names keyed by folder name; Food-11's flat layout: by class index)."""
        positions = [int(c) for c in self.folder_names] if self.layout == "food11_flat" else None
        self.class_names = display_names(self.folder_names, self.class_names, names, self.describe(), positions)

    def describe(self) -> str:
        return f"imagefolder '{self.root}' (layout {self.layout})"

    def load(self, index: int) -> tuple[np.ndarray, None]:
        if index in self.unreadable:
            raise UnreadableImageError(self.unreadable[index])
        try:
            return read_image(self.files[index]), None
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            detail = type(exc).__name__ if self.files[index] in str(exc) else f"{type(exc).__name__}: {exc}"
            self.unreadable[index] = f"{self.files[index]} ({detail})"
            raise UnreadableImageError(self.unreadable[index]) from None


def open_imagefolder(cfg: DataConfig, pool: str = "train") -> ImageFolderSource:
    """The `imagefolder` source of a data config (every split is in one pool)."""
    if not cfg.root:
        raise UserError("imagefolder: key 'data.root' is empty; set it to the root/<class>/<images> folder")
    return ImageFolderSource(cfg.root, cfg.homepage, cfg.layout)
