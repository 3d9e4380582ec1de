"""Image sources (imagefolder, cifar10, fashion_mnist, synthetic shapes) and deterministic stratified splits."""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import Dataset

from cnnprior.config import DataConfig
from cnnprior.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "star")


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


class ImageFolderSource(ImageSource):
    """`root/<class>/*.{jpg,png,...}` (Food-11, Animals-10 layouts); unreadable files are skipped with one warning."""

    name = "imagefolder"

    def __init__(self, root: str, homepage: str = "", check: bool = True):
        r = Path(root)
        _require(r, "imagefolder", homepage, "root/<class>/<images>")
        if not r.is_dir():
            raise UserError(f"imagefolder: data.root '{r}' is not a folder")
        classes = sorted(d.name for d in r.iterdir() if d.is_dir() and not d.name.startswith("."))
        files, labels, skipped = [], [], []
        for ci, c in enumerate(classes):
            for f in sorted((r / c).rglob("*")):
                if not f.is_file() or f.name.startswith("."):
                    continue
                if f.suffix.lower() not in IMAGE_EXTENSIONS or (check and not _readable(f)):
                    skipped.append(f)
                    continue
                files.append(str(f))
                labels.append(ci)
        if skipped:
            warnings.warn(f"imagefolder '{r}': skipped {len(skipped)} non-image or unreadable file(s), "
                          f"e.g. {skipped[0]}", stacklevel=2)
        if not files:
            raise UserError(f"imagefolder '{r}': no readable images found (expected root/<class>/<images> with "
                            f"extensions {', '.join(IMAGE_EXTENSIONS)})")
        used = sorted(set(labels))
        remap = {old: new for new, old in enumerate(used)}
        self.class_names = [classes[i] for i in used]
        self.labels = np.array([remap[x] for x in labels], dtype=np.int64)
        self.files = files

    def load(self, index: int) -> tuple[np.ndarray, None]:
        return read_image(self.files[index]), None


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


class TorchvisionSource(ImageSource):
    """A torchvision dataset holding uint8 arrays in `.data` and labels in `.targets`."""

    def __init__(self, ds, class_names: Sequence[str], split: str):
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        self.data = data
        self.labels = np.asarray(ds.targets, dtype=np.int64)
        self.class_names = list(class_names)
        self.official_split = split

    def load(self, index: int) -> tuple[np.ndarray, None]:
        img = self.data[index]
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        return img, None


def fashion_mnist(root: str, split: str) -> TorchvisionSource:
    """Fashion-MNIST through torchvision, from the Debian package's .gz files (or a torchvision layout)."""
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import extract_archive

    r = Path(root or FASHION_MNIST_DEBIAN)
    if (r / "FashionMNIST" / "raw").is_dir():
        base = r
    else:
        _require(r, "fashion_mnist", "`apt-get install -y dataset-fashion-mnist` (Debian)",
                 "the *-ubyte.gz files")
        # one cache folder per source folder: files extracted from another data.root are never reused
        key = hashlib.sha256(str(r.resolve()).encode()).hexdigest()[:16]
        base = Path(os.environ.get("CNNPRIOR_CACHE", Path.home() / ".cache" / "cnnprior")) / "fashion_mnist" / key
        raw = base / "FashionMNIST" / "raw"
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
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
                extract_archive(str(src), str(tmp))  # torchvision's own decompressor
                os.replace(tmp / stem, raw / stem)
            else:
                os.symlink(src.resolve(), raw / stem)
    try:
        ds = FashionMNIST(str(base), train=(split == "train"), download=False)
    except RuntimeError as exc:
        raise UserError(f"fashion_mnist: torchvision could not read '{base}': {exc}") from None
    return TorchvisionSource(ds, FASHION_MNIST_CLASSES, split)


def cifar10(root: str, split: str, download: bool) -> TorchvisionSource:
    """CIFAR-10 through torchvision; downloads only with data.download: true."""
    from torchvision.datasets import CIFAR10

    r = Path(root or "data/cifar10")
    if not download and not (r / "cifar-10-batches-py").is_dir():
        raise UserError(f"cifar10 dataset not found: expected '{r}/cifar-10-batches-py'. Set data.download: true "
                        f"(needs internet) or get it from https://www.cs.toronto.edu/~kriz/cifar.html")
    try:
        ds = CIFAR10(str(r), train=(split == "train"), download=download)
    except RuntimeError as exc:
        raise UserError(f"cifar10: torchvision could not read '{r}': {exc}") from None
    return TorchvisionSource(ds, ds.classes, split)


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


class SplitView(Dataset):
    """One split of a source at a fixed size: items are dicts of image [0,1] (3,s,s), label, mask (s,s), index."""

    def __init__(self, source: ImageSource, indices: np.ndarray, size: int, split: str):
        self.source, self.indices, self.size, self.split = source, np.asarray(indices), size, split
        self.class_names = source.class_names
        self.labels = source.labels[self.indices]
        self.has_masks = source.has_masks

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        src_index = int(self.indices[i])
        img, mask = self.source.load(src_index)
        img = resize_uint8(img, self.size)
        image = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div_(255.0)
        if mask is None:
            m = torch.zeros(self.size, self.size)
        else:
            m = torch.from_numpy(resize_uint8(mask * 255, self.size, Image.NEAREST) > 127).float()
        return {"image": image, "label": int(self.source.labels[src_index]), "mask": m,
                "has_mask": mask is not None, "index": src_index}


def open_source(cfg: DataConfig, pool: str = "train") -> ImageSource:
    """The image pool of a data config (`pool` = official train/test split where the dataset has one)."""
    if cfg.source == "shapes":
        return ShapesSource(cfg.shapes_count, cfg.image_size, cfg.seed)
    if cfg.source == "imagefolder":
        if not cfg.root:
            raise UserError("imagefolder: key 'data.root' is empty; set it to the root/<class>/<images> folder")
        return ImageFolderSource(cfg.root, cfg.homepage)
    if cfg.source == "fashion_mnist":
        return fashion_mnist(cfg.root, pool)
    if cfg.source == "cifar10":
        return cifar10(cfg.root, pool, cfg.download)
    raise UserError(f"unknown data.source {cfg.source!r}")  # pragma: no cover (validated by config)


def load_split(cfg: DataConfig, split: str) -> SplitView:
    """The `train`, `val` or `test` split of a data config, deterministic for a given seed."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}")
    if cfg.source in ("fashion_mnist", "cifar10"):
        # official test set is the test split; validation comes out of the official training set
        if split == "test":
            src = open_source(cfg, "test")
            cap = int(round(cfg.limit * cfg.test_fraction)) if cfg.limit else 0
            return SplitView(src, stratified_take(src.labels, cap, cfg.seed), cfg.image_size, split)
        src = open_source(cfg, "train")
        pool = stratified_take(src.labels, cfg.limit, cfg.seed)
        parts = split_indices(src.labels[pool], cfg.val_fraction, 0.0, cfg.seed)
        return SplitView(src, pool[parts[split]], cfg.image_size, split)
    src = open_source(cfg)
    pool = stratified_take(src.labels, cfg.limit, cfg.seed)
    parts = split_indices(src.labels[pool], cfg.val_fraction, cfg.test_fraction, cfg.seed)
    return SplitView(src, pool[parts[split]], cfg.image_size, split)


ImageFile.LOAD_TRUNCATED_IMAGES = False
