"""Image sources (imagefolder, cifar10, fashion_mnist, synthetic shapes) and deterministic stratified splits."""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from cnnprior.config import DataConfig
from cnnprior.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DATASETS_ENV = "CNNPRIOR_DATASETS"  # overrides SYSTEM_DATASETS, the default root of system-installed datasets
SYSTEM_DATASETS = "/usr/share/datasets"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "star")
FOOD11_CLASSES = ("Bread", "Dairy product", "Dessert", "Egg", "Fried food", "Meat", "Noodles/Pasta", "Rice",
                  "Seafood", "Soup", "Vegetable/Fruit")  # Food-11's class indices 0..10
CIFAR10_HOME = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_FILES = "data_batch_1..5, test_batch, batches.meta"
SPLITS = ("train", "val", "test")
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "evaluation": "test"}  # folder name (any case) -> split
FLAT_NAME = re.compile(r"^(\d+)_")  # Food-11's flat layout: <class index>_<n>.jpg
LAYOUT_HELP = {"classes": "root/<class>/<images>", "splits": "root/<split>/<class>/<images>",
               "food11_flat": "root/<split>/<class index>_<n>.jpg"}


# --------------------------------------------------------------------------------------------- images
def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image (grayscale, palette, RGBA, CMYK, 16-bit, float) to 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            hi = 1.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3); raises OSError/ValueError if unreadable."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(to_rgb(img), dtype=np.uint8).copy()


def resize_uint8(arr: np.ndarray, size: int, resample: int = Image.BILINEAR) -> np.ndarray:
    """Resize a uint8 image (H,W[,3]) to size x size with Pillow."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), resample), dtype=np.uint8)


# --------------------------------------------------------------------------------------------- sources
class ImageSource:
    """A labelled pool of images at their native size; `load(i)` -> (uint8 RGB, mask or None)."""

    name = "source"
    class_names: list[str]
    labels: np.ndarray
    has_masks = False
    official_split: str | None = None  # "train"/"test" when the pool is an official split

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def describe(self) -> str:
        """What the pool is, in a few words (for logs and messages)."""
        return self.name

    def rename(self, names: dict | list) -> None:
        """Apply `data.class_names` (display names keyed by class name, or a list in class order)."""
        self.class_names = display_names(self.class_names, self.class_names, names, self.describe())


class ShapesSource(ImageSource):
    """Synthetic shapes: textured noisy background, distractor blobs, one class-defining shape with exact mask.

    Image `i` depends only on (seed, i): random access, deterministic, thousands of images/s at 128 px on one core.
    Labels are balanced: label = i mod number of classes. Speed comes from doing no per-pixel work that can be
    avoided: the smooth background is a separable bicubic upsampling (two small matrix products), stripes and
    blobs are separable outer products (blobs truncated at 4 sigma), the pixel noise is a random window of a
    per-(seed, size) bank of normal draws, and the shape is rasterised inside its bounding box only. The bank
    has size^2 windows, so in large datasets some images share a (shifted) noise texture; backgrounds, blobs,
    stripes and shapes still differ.
    """

    name = "shapes"
    has_masks = True
    _BANK_KEY = 0x5BA4C  # seed-sequence key of the noise bank, apart from the per-image keys [seed, index]

    def __init__(self, count: int, size: int, seed: int = 0):
        self.size, self.seed = size, seed
        self.class_names = list(SHAPE_CLASSES)
        self.labels = np.arange(count, dtype=np.int64) % len(SHAPE_CLASSES)
        self._c = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)  # pixel centres in (0, 1)
        self._up = _cubic_upsampling_matrix(4, size)
        self._bank: tuple[np.ndarray, np.ndarray] | None = None

    def _noise_bank(self) -> tuple[np.ndarray, np.ndarray]:
        """(pixel noise (2s, 2s, 3) with std 0.06, shading noise (2s, 2s) with std 0.08), built once per source."""
        if self._bank is None:  # built lazily: DataLoader workers each build the same one
            rng = np.random.default_rng([self.seed, self.size, self._BANK_KEY])
            n = 2 * self.size
            self._bank = (rng.standard_normal(size=(n, n, 3), dtype=np.float32) * np.float32(0.06),
                          rng.standard_normal(size=(n, n), dtype=np.float32) * np.float32(0.08))
        return self._bank

    def _box(self, cx: float, cy: float, e: float) -> tuple[slice, slice]:
        """Pixel rows/columns of the square of half-width e (fraction of the image) around (cx, cy)."""
        s = self.size
        rows = slice(max(0, math.floor((cy - e) * s)), min(s, math.ceil((cy + e) * s)))
        cols = slice(max(0, math.floor((cx - e) * s)), min(s, math.ceil((cx + e) * s)))
        return rows, cols

    def shape_mask(self, label: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
        """Boolean (size, size) mask of a class shape centred at (cx, cy) with radius r (fractions of the image)."""
        mask = np.zeros((self.size, self.size), dtype=bool)
        rows, cols = self._box(cx, cy, 1.15 * r)  # every shape fits in 1.15 r (square corners: 1.131 r)
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return mask
        ca, sa = math.cos(angle), math.sin(angle)
        dx = (self._c[cols] - np.float32(cx))[None, :]
        dy = (self._c[rows] - np.float32(cy))[:, None]
        u, v = (ca * dx + sa * dy) / r, (-sa * dx + ca * dy) / r  # rotated, unit-radius coordinates
        if label == 0:  # circle
            inside = u * u + v * v <= 1.0
        elif label == 1:  # square
            inside = (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
        elif label == 2:  # triangle (upward, inscribed in the unit circle)
            inside = (v <= 0.5) & (v >= -1.0 + np.sqrt(3.0) * np.abs(u)) & (np.abs(u) <= 0.87)
        elif label == 3:  # cross
            inside = ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
        else:  # star: five-pointed, radius oscillating between 0.45 and 1.0 with the polar angle
            k = np.abs(((np.arctan2(v, u) * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at tips, 0 between tips
            inside = np.sqrt(u * u + v * v) <= 0.45 + 0.55 * k ** 2
        mask[rows, cols] = inside
        return mask

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(index)])
        s, c = self.size, self._c
        label = int(self.labels[index])
        # background: smooth colour field (4x4 bicubic) + pixel noise + oblique stripes
        coarse = rng.uniform(0.15, 0.85, size=(4, 4 * 3)).astype(np.float32)
        img = np.matmul(self._up[None], (self._up @ coarse).reshape(s, 4, 3))  # (s, s, 3)
        oy, ox = rng.integers(0, s, size=2)
        pixel_noise, shade_noise = self._noise_bank()
        img += pixel_noise[oy:oy + s, ox:ox + s]
        fx, fy = np.float32(rng.uniform(8, 24) * np.pi), np.float32(rng.uniform(-8, 8) * np.pi)
        stripes = np.outer(np.cos(fy * c), np.sin(fx * c)) + np.outer(np.sin(fy * c), np.cos(fx * c))
        img += (np.float32(0.05) * stripes)[..., None]  # = 0.05 sin(fx x + fy y)
        # distractor blobs: soft gaussian spots of random colour (truncated at 4 sigma)
        for _ in range(int(rng.integers(1, 4))):
            bx, by, br = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.15)
            colour = rng.uniform(0, 1, size=3).astype(np.float32)
            rows, cols = self._box(bx, by, 4 * br)
            gy = np.exp(np.square(c[rows] - np.float32(by)) * np.float32(-0.5 / (br * br)))
            gx = np.exp(np.square(c[cols] - np.float32(bx)) * np.float32(-0.5 / (br * br)))
            w = (np.float32(0.8) * np.outer(gy, gx))[..., None]
            patch = img[rows, cols]
            patch += w * (colour - patch)
        # the class shape, painted last and fully opaque so the mask is exactly its pixels
        r = rng.uniform(0.14, 0.24)
        cx, cy = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
        angle = rng.uniform(0, 2 * np.pi) if label != 0 else 0.0
        colour = rng.uniform(0, 1, size=3).astype(np.float32)
        mask = self.shape_mask(label, cx, cy, r, angle)
        if mask.any():
            if np.abs(colour - img[mask].mean(axis=0)).max() < 0.35:
                colour = 1.0 - colour
            shade = 1.0 + shade_noise[oy:oy + s, ox:ox + s][mask]
            img[mask] = colour * shade[:, None]
        np.clip(img, 0, 1, out=img)
        return (img * 255 + 0.5).astype(np.uint8), mask.astype(np.uint8)


def _cubic_upsampling_matrix(n: int, size: int) -> np.ndarray:
    """(size, n) matrix of Keys' cubic convolution (a = -0.5) with half-pixel centres, the kernel cut at the
    borders and renormalised (Pillow's BICUBIC upsampling): upsampled signal = this matrix @ signal."""
    pos = (np.arange(size) + 0.5) * n / size - 0.5  # output centres in input coordinates
    t = np.abs(pos[:, None] - np.arange(n)[None, :])
    m = np.where(t <= 1, 1.5 * t ** 3 - 2.5 * t ** 2 + 1, np.where(t < 2, -0.5 * t ** 3 + 2.5 * t ** 2 - 4 * t + 2, 0))
    return (m / m.sum(1, keepdims=True)).astype(np.float32)


def _require(root: Path, what: str, homepage: str, expected: str) -> None:
    if not root.exists():
        where = f" Get it from {homepage} and set data.root." if homepage else " Set data.root to its folder."
        raise UserError(f"{what} dataset not found: expected {expected} at '{root}'.{where}")


def display_names(folders: Sequence[str], defaults: Sequence[str], names: dict | list, where: str,
                  positions: Sequence[int] | None = None) -> list[str]:
    """Each class's display name: `data.class_names` ({folder or default name: name}, or a list) over the defaults.

    A list is read in class order, or at `positions` (Food-11's flat layout: at the class index)."""
    out = list(defaults)
    if isinstance(names, list):
        pos = list(positions) if positions is not None else list(range(len(folders)))
        if (positions is None and len(names) != len(folders)) or (pos and max(pos) >= len(names)):
            raise UserError(f"data.class_names: {len(names)} names for the {len(folders)} classes of {where} "
                            f"({', '.join(folders)}); give one per class, in this order, or a mapping")
        out = [names[p] for p in pos]
    elif names:
        keys = {f: i for i, f in enumerate(folders)}
        for i, d in enumerate(defaults):
            keys.setdefault(d, i)
        for key, value in names.items():
            if key not in keys:
                close = difflib.get_close_matches(key, list(keys), n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"classes: {', '.join(folders)}"
                raise UserError(f"data.class_names: {key!r} is not a class of {where} ({hint})")
            out[keys[key]] = value
    seen: dict[str, str] = {}
    for folder, name in zip(folders, out, strict=True):
        if name in seen:
            raise UserError(f"data.class_names: classes '{seen[name]}' and '{folder}' of {where} would both be "
                            f"shown as {name!r}; give each class its own name")
        seen[name] = folder
    return out


# --------------------------------------------------------------------------------------------- image folders
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


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (found on first read, remembered by its source)."""


class ImageFolderSource(ImageSource):
    """Images in folders: root/<class>/, root/<split>/<class>/ or Food-11's root/<split>/<index>_<n>.jpg.

    Start-up only lists the folders (no file is opened). A file that turns out unreadable when loaded raises
    UnreadableImageError (and is remembered); SplitView then serves a replacement, so counts never change.
    """

    name = "imagefolder"

    def __init__(self, root: str, homepage: str = "", layout: str = "auto"):
        r = Path(root)
        _require(r, "imagefolder", homepage, "root/<class>/<images> or root/<split>/<class>/<images>")
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


# --------------------------------------------------------------------------------------------- torchvision
class TorchvisionSource(ImageSource):
    """A torchvision dataset holding uint8 arrays in `.data` and labels in `.targets`."""

    def __init__(self, ds, class_names: Sequence[str], split: str, name: str = "torchvision", root: str = ""):
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        self.data = data
        self.labels = np.asarray(ds.targets, dtype=np.int64)
        self.class_names = list(class_names)
        self.official_split = split
        self.name, self.root = name, root

    def describe(self) -> str:
        return f"{self.name} '{self.root}'"

    def load(self, index: int) -> tuple[np.ndarray, None]:
        img = self.data[index]
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        return img, None


def datasets_root() -> Path:
    """Where system-installed datasets live: $CNNPRIOR_DATASETS, else /usr/share/datasets (Debian's packages)."""
    return Path(os.environ.get(DATASETS_ENV) or SYSTEM_DATASETS)


def _fashion_mnist_raw(r: Path) -> Path:
    """A torchvision FashionMNIST root holding the (decompressed) files of the folder r, in the cache."""
    from torchvision.datasets.utils import extract_archive

    # one cache folder per source folder: files extracted from another data.root are never reused
    key = hashlib.sha256(str(r.resolve()).encode()).hexdigest()[:16]
    base = Path(os.environ.get("CNNPRIOR_CACHE", Path.home() / ".cache" / "cnnprior")) / "fashion_mnist" / key
    raw = base / "FashionMNIST" / "raw"
    for stem in FASHION_MNIST_FILES:
        if (raw / stem).is_file():
            continue
        src = r / f"{stem}.gz"
        if not src.is_file():
            src = r / stem
            if not src.is_file():
                raise UserError(f"fashion_mnist dataset incomplete: '{r}' lacks {stem}.gz "
                                f"(apt-get install -y dataset-fashion-mnist)")
        raw.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".gz":
            tmp = raw / ".partial"
            tmp.mkdir(exist_ok=True)
            try:
                extract_archive(str(src), str(tmp))  # torchvision's own decompressor
            except (OSError, EOFError) as exc:
                raise UserError(f"fashion_mnist: cannot decompress '{src}' ({exc}); replace the file") from None
            os.replace(tmp / stem, raw / stem)
        else:
            os.symlink(src.resolve(), raw / stem)
    return base


def fashion_mnist(root: str, split: str) -> TorchvisionSource:
    """Fashion-MNIST through torchvision, from idx(.gz) files (Debian's package by default) or a torchvision layout."""
    from torchvision.datasets import FashionMNIST

    r = Path(root) if root else datasets_root() / "fashion-mnist"
    if (r / "FashionMNIST" / "raw").is_dir():
        base = r
    else:
        _require(r, "fashion_mnist", "`apt-get install -y dataset-fashion-mnist` (Debian)",
                 f"the *-ubyte.gz files (default root ${DATASETS_ENV}/fashion-mnist)")
        base = _fashion_mnist_raw(r)
    try:
        ds = FashionMNIST(str(base), train=(split == "train"), download=False)
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:
        raise UserError(f"fashion_mnist: torchvision could not read the idx files of '{r}' "
                        f"({type(exc).__name__}: {exc}); replace them") from None
    return TorchvisionSource(ds, FASHION_MNIST_CLASSES, split, "fashion_mnist", str(r))


def _cifar10_from_archive(archive: Path, root: Path) -> None:
    """Extract CIFAR-10's python archive (MD5-checked, offline) into root/cifar-10-batches-py."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity, extract_archive

    if not check_integrity(str(archive), CIFAR10.tgz_md5):
        raise UserError(f"cifar10: '{archive}' is not CIFAR-10's python archive (its MD5 is not "
                        f"{CIFAR10.tgz_md5}); download it again from {CIFAR10_HOME}")
    tmp = root / ".cifar10-partial"
    shutil.rmtree(tmp, ignore_errors=True)
    extract_archive(str(archive), str(tmp))
    os.replace(tmp / CIFAR10.base_folder, root / CIFAR10.base_folder)
    shutil.rmtree(tmp, ignore_errors=True)


def _cifar10_bad_file(folder: Path) -> str:
    """The first of CIFAR-10's batch files that is missing or fails its MD5 check, as a phrase ('' if none)."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    for name, md5 in CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]:
        if not (folder / name).is_file():
            return f"'{folder / name}' is missing"
        if not check_integrity(str(folder / name), md5):
            return f"'{folder / name}' is corrupted (MD5 differs from CIFAR-10's)"
    return ""


def cifar10(root: str, split: str, download: bool) -> TorchvisionSource:
    """CIFAR-10 through torchvision: its extracted batches, or its archive (extracted offline); downloads only
    with data.download: true."""
    from torchvision.datasets import CIFAR10

    r = Path(root or "data/cifar10")
    if r.name == CIFAR10.base_folder and (r / CIFAR10.meta["filename"]).is_file():
        r = r.parent  # data.root names the extracted folder itself
    folder, archive = r / CIFAR10.base_folder, r / CIFAR10.filename
    put = (f"put {CIFAR10.filename} (from {CIFAR10_HOME}) in '{r}', or its extracted folder {CIFAR10.base_folder}/ "
           f"({CIFAR10_FILES}) at '{folder}'")
    if not download and not folder.is_dir():
        if not archive.is_file():
            raise UserError(f"cifar10 dataset not found: {put}; or set data.download: true (needs internet)")
        _cifar10_from_archive(archive, r)
    try:
        ds = CIFAR10(str(r), train=(split == "train"), download=download)
    except RuntimeError:
        bad = _cifar10_bad_file(folder) or f"torchvision could not read '{folder}'"
        raise UserError(f"cifar10: {bad}; replace '{folder}' with the {CIFAR10.base_folder}/ folder of "
                        f"{CIFAR10.filename} ({CIFAR10_FILES}, from {CIFAR10_HOME}), or remove it and put that "
                        f"archive in '{r}'") from None
    except OSError as exc:  # a download that failed (no internet), or a batch file that cannot be opened
        if download:
            raise UserError(f"cifar10: download failed ({exc}); for offline use {put}") from None
        raise UserError(f"cifar10: cannot read '{folder}' ({exc}); {put}") from None
    return TorchvisionSource(ds, ds.classes, split, "cifar10", str(r))


# --------------------------------------------------------------------------------------------- splits
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
        img = resize_uint8(img, self.size)
        image = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div_(255.0)
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
            return self.source.load(int(self.indices[i]))
        except UnreadableImageError as exc:
            self._pass_bad[int(self.indices[i])] = str(exc)
        label = int(self.labels[i])
        if label not in self._same_label:
            self._same_label[label] = np.flatnonzero(self.labels == label)
        same = self._same_label[label]
        start = int(np.searchsorted(same, i))
        for k in range(1, len(same)):
            try:
                return self.source.load(int(self.indices[same[(start + k) % len(same)]]))
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


def open_source(cfg: DataConfig, pool: str = "train") -> ImageSource:
    """The image pool of a data config (`pool` = official train/test split where the dataset has one), with
    data.class_names applied."""
    if cfg.source == "shapes":
        src: ImageSource = ShapesSource(cfg.shapes_count, cfg.image_size, cfg.seed)
    elif cfg.source == "imagefolder":
        if not cfg.root:
            raise UserError("imagefolder: key 'data.root' is empty; set it to the root/<class>/<images> folder")
        src = ImageFolderSource(cfg.root, cfg.homepage, cfg.layout)
    elif cfg.source == "fashion_mnist":
        src = fashion_mnist(cfg.root, pool)
    elif cfg.source == "cifar10":
        src = cifar10(cfg.root, pool, cfg.download)
    else:  # pragma: no cover (validated by config)
        raise UserError(f"unknown data.source {cfg.source!r}")
    if cfg.class_names:
        src.rename(cfg.class_names)
    return src


def load_split(cfg: DataConfig, split: str) -> SplitView:
    """The `train`, `val` or `test` split of a data config, deterministic for a given seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    if cfg.source in ("fashion_mnist", "cifar10"):
        # official test set is the test split; validation comes out of the official training set
        if split == "test":
            src = open_source(cfg, "test")
            cap = int(round(cfg.limit * cfg.test_fraction)) if cfg.limit else 0
            take = stratified_take(src.labels, cap, cfg.seed)
            return SplitView(src, take, cfg.image_size, split, {"test": (len(take), "official test set")})
        src = open_source(cfg, "train")
        pool = stratified_take(src.labels, cfg.limit, cfg.seed)
        parts = split_indices(src.labels[pool], cfg.val_fraction, 0.0, cfg.seed)
        sizes = {"train": (len(parts["train"]), "official training set"),
                 "val": (len(parts["val"]), "from the official training set")}
        return SplitView(src, pool[parts[split]], cfg.image_size, split, sizes)
    src = open_source(cfg)
    parts, origin = pool_splits(src, cfg)
    sizes = {s: (len(parts[s]), origin[s]) for s in SPLITS}
    return SplitView(src, parts[split], cfg.image_size, split, sizes)


ImageFile.LOAD_TRUNCATED_IMAGES = False
