"""What every image source shares: reading any image file as RGB, the `ImageSource` interface, display names."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from cnnprior.core.errors import UserError
from cnnprior.core.schema import suggest

__all__ = [
    "DATASETS_ENV", "datasets_root", "display_names", "IMAGE_EXTENSIONS", "ImageSource", "read_image", "require",
    "resize_uint8", "SPLITS", "SYSTEM_DATASETS", "to_rgb", "UnreadableImageError"
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DATASETS_ENV = "CNNPRIOR_DATASETS"  # overrides SYSTEM_DATASETS, the default root of system-installed datasets
SYSTEM_DATASETS = "/usr/share/datasets"
SPLITS = ("train", "val", "test")


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

    def load_native(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Like `load`, but a grayscale source may give one (H, W) plane, as it stores it: resizing one plane
        instead of three equal ones makes SplitView's items about twice as fast (Fashion-MNIST to 128 px)."""
        return self.load(index)

    def describe(self) -> str:
        """What the pool is, in a few words (for logs and messages)."""
        return self.name

    def rename(self, names: dict | list) -> None:
        """Apply `data.class_names` (display names keyed by class name, or a list in class order)."""
        self.class_names = display_names(self.class_names, self.class_names, names, self.describe())


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (found on first read, remembered by its source)."""


def require(root: Path, what: str, homepage: str, expected: str) -> None:
    """A dataset root that does not exist is a one-line error saying where to get the data."""
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
                hint = suggest(key, keys, listing=None) or f" (classes: {', '.join(folders)})"
                raise UserError(f"data.class_names: {key!r} is not a class of {where}{hint}")
            out[keys[key]] = value
    seen: dict[str, str] = {}
    for folder, name in zip(folders, out, strict=True):
        if name in seen:
            raise UserError(f"data.class_names: classes '{seen[name]}' and '{folder}' of {where} would both be "
                            f"shown as {name!r}; give each class its own name")
        seen[name] = folder
    return out


def datasets_root() -> Path:
    """Where system-installed datasets live: $CNNPRIOR_DATASETS, else /usr/share/datasets (Debian's packages)."""
    return Path(os.environ.get(DATASETS_ENV) or SYSTEM_DATASETS)


ImageFile.LOAD_TRUNCATED_IMAGES = False
