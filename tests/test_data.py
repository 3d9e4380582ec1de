"""Tests for cnnprior.data.splits: every image source on tiny data, RGB conversion, exact shape masks, split determinism.

Fashion-MNIST and CIFAR-10 run on tiny files in their real on-disk formats, written here, through torchvision's
readers; the real datasets are only read by tests marked `real_data` (deselected unless -m real_data).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnprior.core.config import load_config
from cnnprior.core.errors import UserError
from cnnprior.data.sources.base import datasets_root, to_rgb
from cnnprior.data.sources.imagefolder import ImageFolderSource
from cnnprior.data.sources.shapes import SHAPE_CLASSES, ShapesSource
from cnnprior.data.sources.torchvision_sets import FASHION_MNIST_CLASSES, fashion_mnist
from cnnprior.data.splits import SplitView, load_split, open_source, split_indices, stratified_take

# ------------------------------------------------------------------------------------------ imagefolder
# file -> (writer, expected RGB of the uniform image after conversion, tolerance)
FOLDER_IMAGES = {
    "cats/gray.png": (lambda p: Image.new("L", (20, 30), 100).save(p), (100, 100, 100), 0),
    "cats/palette.png": (lambda p: _palette_image().save(p), (255, 0, 0), 0),
    # 50 % transparent blue over white
    "cats/rgba.png": (lambda p: Image.new("RGBA", (31, 17), (0, 0, 255, 128)).save(p), (127, 127, 255), 1),
    "cats/nested/deep.bmp": (lambda p: Image.new("RGB", (8, 8), (1, 2, 3)).save(p), (1, 2, 3), 0),
    # CMYK (0,255,255,0) is red; JPEG quantisation wobbles a few levels
    "dogs/cmyk.jpg": (lambda p: Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(p, quality=95), (255, 0, 0), 3),
    # 16-bit 40000/65535 -> 155.7 -> 156
    "dogs/deep16.png": (lambda p: Image.fromarray(np.full((12, 40), 40000, np.uint16)).save(p), (156, 156, 156), 0),
}


def _palette_image() -> Image.Image:
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    return img


def _make_folder(root: Path) -> Path:
    for rel, (write, _, _) in FOLDER_IMAGES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write(root / rel)
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (root / "dogs" / ".hidden.png").write_bytes(b"ignored: dot files are not counted")
    (root / "empty_class").mkdir()
    return root


def test_imagefolder_converts_every_mode_and_replaces_the_unreadable_file(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "folder")
    assert Image.open(root / "dogs" / "deep16.png").mode == "I;16"  # the case we mean to cover
    assert Image.open(root / "dogs" / "cmyk.jpg").mode == "CMYK"
    with pytest.warns(UserWarning) as record:
        src = ImageFolderSource(str(root))
    assert len(record) == 1  # at start-up only the extension is looked at: notes.txt is skipped, broken.png kept
    assert "skipped 1 non-image file(s)" in str(record[0].message) and "notes.txt" in str(record[0].message)
    assert src.class_names == ["cats", "dogs"]  # the empty class folder is dropped, labels stay contiguous
    assert len(src) == len(FOLDER_IMAGES) + 1 and src.layout == "classes"
    view = SplitView(src, np.arange(len(src)), 32, "all")
    seen = {}
    with pytest.warns(UserWarning, match=r"1 unreadable image file\(s\) in pass 1 over the all split.*broken\.png"):
        items = [view[i] for i in range(len(view))]
    for item in items:
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert not item["has_mask"] and float(item["mask"].abs().sum()) == 0.0
        rel = Path(src.files[item["index"]]).relative_to(root).as_posix()
        assert item["label"] == ["cats", "dogs"].index(rel.split("/")[0])
        seen[rel] = (item["image"] * 255).round().to(torch.int64)
    assert set(seen) == set(FOLDER_IMAGES) | {"dogs/broken.png"}
    for rel, (_, rgb, tol) in FOLDER_IMAGES.items():
        want = torch.tensor(rgb).view(3, 1, 1)
        assert int((seen[rel] - want).abs().max()) <= tol, (rel, seen[rel][:, 0, 0].tolist())
    # broken.png (the first dog file in sorted order) is served as the next readable dog: cmyk.jpg
    assert torch.equal(seen["dogs/broken.png"], seen["dogs/cmyk.jpg"])


def test_imagefolder_through_load_split(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "folder")
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}", "data.image_size=40",
                             "data.val_fraction=0.34", "data.test_fraction=0.34"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = {s: load_split(cfg.data, s) for s in ("train", "val", "test")}
    # cats 4 -> 2/1/1 (round(1.36) = 1 each), dogs 3 (broken.png counts) -> 1/1/1
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 2, 2]
    assert sorted(int(i) for s in splits.values() for i in s.indices) == list(range(7))
    assert splits["val"][0]["image"].shape == (3, 40, 40)
    assert splits["train"].sizes == {"train": (3, ""), "val": (2, ""), "test": (2, "")}


def test_imagefolder_missing_empty_or_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"imagefolder dataset not found.*nope.*Get it from https://x\.org"):
        ImageFolderSource(str(tmp_path / "nope"), homepage="https://x.org")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no images found"):
        ImageFolderSource(str(tmp_path / "empty"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"is not a folder"):
        ImageFolderSource(str(tmp_path / "afile"))
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    (bad / "x.jpg").write_bytes(b"nope")
    (bad / "y.png").write_bytes(b"")
    view = SplitView(ImageFolderSource(str(tmp_path / "bad")), np.arange(2), 8, "train")
    with pytest.raises(UserError, match=r"every image of class 'cls' in the train split is unreadable.*x\.jpg"):
        view[0]
    cfg = load_config(None, ["data.source=imagefolder"])
    with pytest.raises(UserError, match=r"'data.root' is empty"):
        open_source(cfg.data)


def test_to_rgb_float_and_32bit_modes() -> None:
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255]
    i32 = Image.fromarray(np.array([[0, 1000, 65535]], np.int32), "I")
    assert np.asarray(to_rgb(i32))[0, :, 1].tolist() == [0, 4, 255]
    la = Image.new("LA", (2, 2), (0, 0))  # fully transparent black -> white
    assert np.asarray(to_rgb(la)).reshape(-1).tolist() == [255] * 12


# ------------------------------------------------------------------------------------------ Fashion-MNIST
def write_idx(path: Path, arr: np.ndarray) -> None:
    """An idx ubyte file as Fashion-MNIST ships it (magic 0x0000080N, big-endian sizes, bytes); gzipped if .gz."""
    data = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data += np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def make_fashion(root: Path, n_train: int = 50, n_test: int = 20, seed: int = 0, gz: bool = True) -> dict:
    """Tiny Fashion-MNIST files (Debian's names) with random 28x28 images and balanced labels; returns the arrays."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{stem}-images-idx3-ubyte{'.gz' if gz else ''}", images)
        write_idx(root / f"{stem}-labels-idx1-ubyte{'.gz' if gz else ''}", labels)
        arrays[stem] = (images, labels)
    return arrays


def test_fashion_mnist_tiny_idx_files_through_torchvision(tmp_path: Path) -> None:
    arrays = make_fashion(tmp_path / "fm")
    cfg = load_config(None, ["data.source=fashion_mnist", f"data.root={tmp_path / 'fm'}", "data.limit=50",
                             "data.image_size=28", "data.val_fraction=0.2", "data.test_fraction=0.2", "data.seed=4"])
    train, val, test = (load_split(cfg.data, s) for s in ("train", "val", "test"))
    # the lazily extracted files went to CNNPRIOR_CACHE (a temp dir here), not ~/.cache
    raws = list((Path(os.environ["CNNPRIOR_CACHE"]) / "fashion_mnist").glob("*/FashionMNIST/raw"))
    sizes = {r: (r / "t10k-images-idx3-ubyte").stat().st_size for r in raws}
    assert 16 + 20 * 28 * 28 in sizes.values()
    assert train.class_names == list(FASHION_MNIST_CLASSES)
    # limit caps the official training pool (5 per class), val is 20 % of it; test = 20 % of limit
    assert (len(train), len(val), len(test)) == (40, 10, 10)
    assert np.bincount(train.labels, minlength=10).tolist() == [4] * 10
    assert np.bincount(val.labels, minlength=10).tolist() == [1] * 10
    assert np.bincount(test.labels, minlength=10).tolist() == [1] * 10
    assert not set(train.indices) & set(val.indices)
    for view, (images, labels) in ((test, arrays["t10k"]), (train, arrays["train"])):
        for i in (0, 9):
            item = view[i]
            assert item["image"].shape == (3, 28, 28)
            got = (item["image"] * 255).round().to(torch.uint8).numpy()
            assert (got == images[item["index"]][None]).all()  # grey copied to all three channels
            assert item["label"] == labels[item["index"]]
    cfg32 = load_config(None, ["data.source=fashion_mnist", f"data.root={tmp_path / 'fm'}", "data.limit=20",
                               "data.image_size=32"])
    assert load_split(cfg32.data, "train")[0]["image"].shape == (3, 32, 32)
    assert train.describe() == (f"fashion_mnist '{tmp_path / 'fm'}': 10 classes [{', '.join(FASHION_MNIST_CLASSES)}]; "
                                f"40 train (official training set) / 10 val (from the official training set)")


def test_fashion_mnist_plain_idx_files_and_torchvision_layout(tmp_path: Path) -> None:
    arrays = make_fashion(tmp_path / "plain", n_train=12, n_test=10, seed=1, gz=False)
    src = fashion_mnist(str(tmp_path / "plain"), "test")
    assert len(src) == 10 and (src.data == arrays["t10k"][0]).all() and (src.labels == arrays["t10k"][1]).all()
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"  # what torchvision's own download leaves
    make_fashion(raw, n_train=12, n_test=10, seed=2, gz=False)
    assert len(fashion_mnist(str(tmp_path / "tv"), "train")) == 12


def test_fashion_mnist_default_root_follows_cnnprior_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # under pytest the default root is an empty folder (conftest): the system's datasets are never read
    assert datasets_root() != Path("/usr/share/datasets") and not any(datasets_root().iterdir())
    with pytest.raises(UserError, match=rf"fashion_mnist dataset not found.*'{datasets_root()}/fashion-mnist'"):
        fashion_mnist("", "train")
    arrays = make_fashion(tmp_path / "ds" / "fashion-mnist", n_train=10, n_test=30)
    monkeypatch.setenv("CNNPRIOR_DATASETS", str(tmp_path / "ds"))
    src = fashion_mnist("", "test")
    assert len(src) == 30 and (src.labels == arrays["t10k"][1]).all()


def test_fashion_mnist_missing_incomplete_or_corrupt(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.source=fashion_mnist", f"data.root={tmp_path / 'none'}"])
    with pytest.raises(UserError, match=r"fashion_mnist dataset not found.*apt-get install -y dataset-fashion-mnist"):
        load_split(cfg.data, "train")
    make_fashion(tmp_path / "full")
    assert len(fashion_mnist(str(tmp_path / "full"), "test")) == 20  # fills the cache from that folder ...
    (tmp_path / "partial").mkdir()  # ... which must not stand in for another, incomplete folder
    (tmp_path / "partial" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    cfg = load_config(None, ["data.source=fashion_mnist", f"data.root={tmp_path / 'partial'}"])
    with pytest.raises(UserError, match=r"incomplete.*lacks train-labels-idx1-ubyte\.gz"):
        load_split(cfg.data, "train")
    make_fashion(tmp_path / "bad")
    (tmp_path / "bad" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08"))  # cut header
    with pytest.raises(UserError, match=r"torchvision could not read the idx files of .*bad"):
        fashion_mnist(str(tmp_path / "bad"), "test")
    make_fashion(tmp_path / "bad2")
    (tmp_path / "bad2" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"cannot decompress .*t10k-labels-idx1-ubyte\.gz"):
        fashion_mnist(str(tmp_path / "bad2"), "test")


def test_fashion_mnist_cache_filled_by_concurrent_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # two stages started together (e.g. two classifier runs) both decompress the .gz files into the cache: here
    # the second one runs while the first is decompressing; both must end with complete, readable copies (a
    # shared partial folder made the first one fail with FileNotFoundError)
    from cnnprior.data.sources import torchvision_sets
    arrays = make_fashion(tmp_path / "fm", n_train=12, n_test=10)
    real, inner = torchvision_sets.tv_utils.extract_archive, []

    def extract(src, dst, *args, **kwargs):
        out = real(src, dst, *args, **kwargs)
        if not inner:  # the other stage, started during the first decompression
            inner.append(None)
            inner[0] = len(fashion_mnist(str(tmp_path / "fm"), "train"))
        return out

    monkeypatch.setattr(torchvision_sets.tv_utils, "extract_archive", extract)
    assert len(fashion_mnist(str(tmp_path / "fm"), "train")) == 12 and inner == [12]
    src = fashion_mnist(str(tmp_path / "fm"), "test")
    assert (src.data == arrays["t10k"][0]).all()
    assert not [p for p in Path(os.environ["CNNPRIOR_CACHE"]).rglob(".partial*")]  # nothing left behind


@pytest.mark.real_data
def test_fashion_mnist_real_debian_files(real_datasets: Path) -> None:
    """Opt-in (python -m pytest -m real_data): Debian's dataset-fashion-mnist through the default root."""
    if not (real_datasets / "fashion-mnist").is_dir():
        pytest.skip(f"{real_datasets / 'fashion-mnist'} not present (apt-get install -y dataset-fashion-mnist)")
    train, test = fashion_mnist("", "train"), fashion_mnist("", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(test.labels).tolist() == [1000] * 10
    with gzip.open(real_datasets / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", "rb") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    assert (test.data == images).all()


# ------------------------------------------------------------------------------------------ CIFAR-10
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar(root: Path, per_batch: int = 4, n_test: int = 6, archive: bool = False) -> dict:
    """Tiny CIFAR-10 python batches (pickled dicts of (n, 3072) uint8 rows, labels) as the real archive holds them;
    with `archive`, only cifar-10-python.tar.gz. Returns {"train"/"test": (images NHWC, labels)}."""
    rng = np.random.default_rng(5)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out: dict = {"train": ([], [])}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n)]
        with open(folder / name, "wb") as fh:
            pickle.dump({"batch_label": name, "labels": labels, "data": rows, "filenames": [f"{k}.png" for k in range(n)]},
                        fh)
        nhwc = rows.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
        if name == "test_batch":
            out["test"] = (nhwc, labels)
        else:
            out["train"][0].append(nhwc)
            out["train"][1].extend(labels)
    out["train"] = (np.concatenate(out["train"][0]), out["train"][1])
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"num_cases_per_batch": per_batch, "label_names": CIFAR_NAMES, "num_vis": 3072}, fh)
    if archive:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        shutil.rmtree(folder)
    return out


@pytest.fixture
def cifar_md5_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny fixtures cannot match CIFAR-10's MD5 sums: accept every file (torchvision's and our checks)."""
    import torchvision.datasets.cifar
    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


def test_cifar10_missing_says_where_to_put_which_files(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.source=cifar10", f"data.root={tmp_path}"])
    with pytest.raises(UserError) as info:
        load_split(cfg.data, "test")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("cifar10 dataset not found: put cifar-10-python.tar.gz")
    for part in (f"in '{tmp_path}'", f"at '{tmp_path / 'cifar-10-batches-py'}'", "data_batch_1..5, test_batch, "
                 "batches.meta", "https://www.cs.toronto.edu/~kriz/cifar.html", "data.download: true"):
        assert part in msg, part


def test_cifar10_tiny_archive_fails_the_md5_check_in_one_line(tmp_path: Path) -> None:
    make_cifar(tmp_path, archive=True)
    cfg = load_config(None, ["data.source=cifar10", f"data.root={tmp_path}"])
    with pytest.raises(UserError, match=r"^cifar10: '.*cifar-10-python\.tar\.gz' is not CIFAR-10's python archive "
                                        r"\(its MD5 is not c58f30108f718f92721af3b95e74349a\)"):
        load_split(cfg.data, "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]  # nothing half-extracted


def test_cifar10_extracted_folder_names_the_bad_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar(tmp_path)
    cfg = load_config(None, ["data.source=cifar10", f"data.root={tmp_path}"])
    with pytest.raises(UserError, match=r"^cifar10: '.*data_batch_1' is corrupted \(MD5 differs.*\); replace '.*"
                                        r"cifar-10-batches-py' with the cifar-10-batches-py/ folder of "
                                        r"cifar-10-python\.tar\.gz \(data_batch_1\.\.5, test_batch, batches\.meta"):
        load_split(cfg.data, "train")
    import torchvision.datasets.cifar
    import torchvision.datasets.utils

    for module in (torchvision.datasets.utils, torchvision.datasets.cifar):  # only existence is checked now
        monkeypatch.setattr(module, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(UserError, match=r"^cifar10: '.*cifar-10-batches-py/test_batch' is missing; replace "):
        load_split(cfg.data, "test")


def test_cifar10_archive_is_extracted_offline_and_read_by_torchvision(tmp_path: Path, cifar_md5_ok: None) -> None:
    want = make_cifar(tmp_path / "c", archive=True)
    cfg = load_config(None, ["data.source=cifar10", f"data.root={tmp_path / 'c'}", "data.image_size=32",
                             "data.val_fraction=0.25", "data.class_names={airplane: plane, automobile: car}"])
    train, val, test = (load_split(cfg.data, s) for s in ("train", "val", "test"))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert (len(train) + len(val), len(test)) == (20, 6)
    assert train.class_names == ["plane", "car"] + CIFAR_NAMES[2:]
    for view, (images, labels) in ((train, want["train"]), (test, want["test"])):
        for i in range(len(view)):
            item = view[i]
            got = (item["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert (got == images[item["index"]]).all() and item["label"] == labels[item["index"]]
    # data.root may also name the extracted folder itself
    direct = load_config(None, ["data.source=cifar10", f"data.root={tmp_path / 'c' / 'cifar-10-batches-py'}"])
    assert len(load_split(direct.data, "test")) == 6


# ------------------------------------------------------------------------------------------ shapes
def test_shapes_deterministic_per_seed_and_index() -> None:
    a, b, c = ShapesSource(12, 32, seed=1), ShapesSource(12, 32, seed=1), ShapesSource(12, 32, seed=2)
    for i in (0, 7, 11):
        (ia, ma), (ib, mb), (ic, _) = a.load(i), b.load(i), c.load(i)
        assert ia.dtype == np.uint8 and ia.shape == (32, 32, 3) and ma.shape == (32, 32)
        assert ia.tobytes() == ib.tobytes() and ma.tobytes() == mb.tobytes()
        assert ia.tobytes() != ic.tobytes()
    assert a.load(3)[0].tobytes() != a.load(4)[0].tobytes()
    assert a.load(7)[0].tobytes() == a.load(7)[0].tobytes()  # random access: order of loads is irrelevant
    assert len(a.class_names) >= 4 and a.class_names == list(SHAPE_CLASSES)
    assert a.labels.tolist() == [i % len(SHAPE_CLASSES) for i in range(12)]


def test_shapes_mask_is_exactly_the_painted_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    size = 64
    src = ShapesSource(10, size, seed=5)
    real, calls = src.shape_mask, []

    def spy(*args):
        mask = real(*args)
        calls.append((args, mask))
        return mask

    for i in range(10):
        monkeypatch.setattr(src, "shape_mask", spy)
        img, mask = src.load(i)
        (label, cx, cy, r, angle), drawn = calls[-1]
        m = mask.astype(bool)
        assert label == i % 5 and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert (m == drawn).all() and (m == real(label, cx, cy, r, angle)).all()
        # geometry: centroid at (cx, cy) (every shape is centred there), area = the analytic area
        yy, xx = np.nonzero(m)
        assert abs((xx + 0.5).mean() / size - cx) < 0.01 and abs((yy + 0.5).mean() / size - cy) < 0.01
        area = {0: math.pi, 1: 1.6 ** 2, 2: 1.5 ** 2 / math.sqrt(3), 3: 2.04}.get(label)
        if area is not None:
            assert m.sum() == pytest.approx(area * (r * size) ** 2, rel=0.12)
        # same image without the shape (the RNG stream is identical): outside the mask nothing changed ...
        monkeypatch.setattr(src, "shape_mask", lambda *a: np.zeros((size, size), bool))
        bare, _ = src.load(i)
        assert (img[~m] == bare[~m]).all()
        # ... and inside it every pixel was repainted with one colour times a grey shading factor
        assert (img[m] != bare[m]).any(axis=1).mean() > 0.97
        pix = img[m].astype(np.float64)
        direction = pix.mean(0) / np.linalg.norm(pix.mean(0))
        cos = pix @ direction / np.maximum(np.linalg.norm(pix, axis=1), 1e-9)
        assert cos.min() > 0.995
        bg = img[~m].astype(np.float64)  # the noisy background is not one colour
        assert (bg @ direction / np.maximum(np.linalg.norm(bg, axis=1), 1e-9)).min() < 0.99


@pytest.mark.parametrize("size", [17, 64, 128])
def test_shapes_background_upsampling_is_pillows_bicubic(size: int) -> None:
    from cnnprior.data.sources.shapes import cubic_upsampling_matrix
    coarse = np.random.default_rng(size).uniform(0.15, 0.85, size=(4, 4)).astype(np.float32)
    up = cubic_upsampling_matrix(4, size)
    ours = up @ coarse @ up.T
    pil = np.asarray(Image.fromarray(coarse, "F").resize((size, size), Image.BICUBIC))
    assert np.abs(ours - pil).max() < 1e-5
    assert np.allclose(up.sum(1), 1.0)


def test_shapes_pixel_noise_comes_from_the_bank_and_shapes_stay_inside() -> None:
    src = ShapesSource(200, 64, seed=0)
    noisy = [src.load(i) for i in range(200)]
    for i, (_, m) in enumerate(noisy):
        assert 0.01 < m.mean() < 0.25, i  # every image has its shape, none covers the image
    pixel, shade = src._noise_bank()
    assert pixel.shape == (128, 128, 3) and shade.shape == (128, 128)
    assert abs(pixel.std() - 0.06) < 0.002 and abs(shade.std() - 0.08) < 0.003
    # without the bank the same images come out (same RNG stream), minus a noise of std 0.06 * 255
    src._bank = (np.zeros_like(pixel), np.zeros_like(shade))
    for i in (0, 1, 57):
        img, mask = noisy[i]
        clean, clean_mask = src.load(i)
        assert (clean_mask == mask).all()
        diff = img.astype(np.float64) - clean
        inside = (clean > 20) & (clean < 235) & ~mask.astype(bool)[..., None]  # background, away from clipping
        assert 13.0 < diff[inside].std() < 17.0 and abs(diff[inside].mean()) < 1.0


def test_shapes_split_view_masks_follow_the_image_size() -> None:
    src = ShapesSource(10, 64, seed=0)
    view = SplitView(src, np.array([2, 5]), 32, "x")
    item = view[1]
    _, mask64 = src.load(5)
    assert item["index"] == 5 and item["label"] == 0 and item["has_mask"]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert float(item["mask"].sum()) == pytest.approx(mask64.sum() / 4, rel=0.15)


# ------------------------------------------------------------------------------------------ splits
def test_split_indices_deterministic_disjoint_stratified() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 7, 33])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    a = split_indices(labels, 0.2, 0.1, seed=1)
    b = split_indices(labels, 0.2, 0.1, seed=1)
    c = split_indices(labels, 0.2, 0.1, seed=2)
    for k in ("train", "val", "test"):
        assert (a[k] == b[k]).all()
    assert any(not np.array_equal(a[k], c[k]) for k in ("train", "val", "test"))
    allidx = np.concatenate([a["train"], a["val"], a["test"]])
    assert sorted(allidx.tolist()) == list(range(len(labels)))  # disjoint and complete
    for k, frac in (("val", 0.2), ("test", 0.1)):
        counts = np.bincount(labels[a[k]], minlength=4).tolist()
        assert counts == [round(n * frac) for n in (10, 20, 7, 33)] == ([2, 4, 1, 7] if k == "val" else [1, 2, 1, 3])
    assert np.bincount(labels[a["train"]], minlength=4).tolist() == [7, 14, 5, 23]


def test_stratified_take_caps_and_balances() -> None:
    labels = np.repeat(np.arange(3), [50, 50, 200])
    take = stratified_take(labels, 30, seed=3)
    assert len(take) == 30 and len(set(take.tolist())) == 30
    assert (take == stratified_take(labels, 30, seed=3)).all()
    assert not np.array_equal(take, stratified_take(labels, 30, seed=4))
    # every class is taken in proportion to its share of the pool
    assert np.bincount(labels[take]).tolist() == [5, 5, 20]
    assert (stratified_take(labels, 0, 3) == np.arange(300)).all()
    assert (stratified_take(labels, 999, 3) == np.arange(300)).all()


def test_shapes_load_split_limit_and_determinism() -> None:
    cfg = load_config(None, ["data.source=shapes", "data.shapes_count=100", "data.limit=30", "data.image_size=32",
                             "data.val_fraction=0.2", "data.test_fraction=0.2", "data.seed=6"])
    parts = {s: load_split(cfg.data, s) for s in ("train", "val", "test")}
    again = {s: load_split(cfg.data, s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [20, 5, 5]
    for s in parts:
        assert (parts[s].indices == again[s].indices).all()
        assert np.bincount(parts[s].labels, minlength=5).tolist() == [len(parts[s]) // 5] * 5
    pooled = np.concatenate([parts[s].indices for s in parts])
    assert len(set(pooled.tolist())) == 30 and pooled.max() < 100
    other = load_config(None, ["data.source=shapes", "data.shapes_count=100", "data.limit=30", "data.seed=7",
                               "data.val_fraction=0.2", "data.test_fraction=0.2"])
    assert not np.array_equal(load_split(other.data, "train").indices, parts["train"].indices)
    with pytest.raises(ValueError):
        load_split(cfg.data, "dev")
