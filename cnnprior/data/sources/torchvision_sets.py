"""Torchvision data sets as sources (`fashion_mnist`, `cifar10`): offline, from the files users download."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10, FashionMNIST
from torchvision.datasets import utils as tv_utils

from cnnprior.core.errors import UserError
from cnnprior.data.sources.base import DATASETS_ENV, ImageSource, datasets_root, require

__all__ = [
    "cifar10", "CIFAR10_FILES", "CIFAR10_HOME", "fashion_mnist", "FASHION_MNIST_CLASSES", "FASHION_MNIST_FILES",
    "TorchvisionSource"
]

FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
CIFAR10_HOME = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_FILES = "data_batch_1..5, test_batch, batches.meta"


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
        img, _ = self.load_native(index)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        return img, None

    def load_native(self, index: int) -> tuple[np.ndarray, None]:
        """The stored image: (H, W) for Fashion-MNIST, (H, W, 3) RGB for CIFAR-10."""
        return self.data[index], None


def _fashion_mnist_raw(r: Path) -> Path:
    """A torchvision FashionMNIST root holding the (decompressed) files of the folder r, in the cache."""
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
            # one partial folder per process: two stages started together each decompress into their own and
            # the atomic rename lets the last one win (a shared folder made one of them fail)
            tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=raw))
            try:
                tv_utils.extract_archive(str(src), str(tmp))  # torchvision's own decompressor
                os.replace(tmp / stem, raw / stem)
            except (OSError, EOFError) as exc:
                raise UserError(f"fashion_mnist: cannot decompress '{src}' ({exc}); replace the file") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            link = raw / f".{stem}.{os.getpid()}"
            os.symlink(src.resolve(), link)
            os.replace(link, raw / stem)
    return base


def fashion_mnist(root: str, split: str) -> TorchvisionSource:
    """Fashion-MNIST through torchvision, from idx(.gz) files (Debian's package by default) or a torchvision layout."""
    r = Path(root) if root else datasets_root() / "fashion-mnist"
    if (r / "FashionMNIST" / "raw").is_dir():
        base = r
    else:
        require(r, "fashion_mnist", "`apt-get install -y dataset-fashion-mnist` (Debian)",
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
    if not tv_utils.check_integrity(str(archive), CIFAR10.tgz_md5):
        raise UserError(f"cifar10: '{archive}' is not CIFAR-10's python archive (its MD5 is not "
                        f"{CIFAR10.tgz_md5}); download it again from {CIFAR10_HOME}")
    tmp = root / ".cifar10-partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tv_utils.extract_archive(str(archive), str(tmp))
    os.replace(tmp / CIFAR10.base_folder, root / CIFAR10.base_folder)
    shutil.rmtree(tmp, ignore_errors=True)


def _cifar10_bad_file(folder: Path) -> str:
    """The first of CIFAR-10's batch files that is missing or fails its MD5 check, as a phrase ('' if none)."""
    for name, md5 in CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]:
        if not (folder / name).is_file():
            return f"'{folder / name}' is missing"
        if not tv_utils.check_integrity(str(folder / name), md5):
            return f"'{folder / name}' is corrupted (MD5 differs from CIFAR-10's)"
    return ""


def cifar10(root: str, split: str, download: bool) -> TorchvisionSource:
    """CIFAR-10 through torchvision: its extracted batches, or its archive (extracted offline); downloads only
    with data.download: true."""
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
