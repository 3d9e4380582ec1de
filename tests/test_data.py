"""Tests for cnnprior.data: every image source on tiny data, RGB conversion, exact shape masks, split determinism."""

from __future__ import annotations

import gzip
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnprior.config import load_config
from cnnprior.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEBIAN,
    SHAPE_CLASSES,
    ImageFolderSource,
    ShapesSource,
    SplitView,
    fashion_mnist,
    load_split,
    open_source,
    split_indices,
    stratified_take,
    to_rgb,
)
from cnnprior.errors import UserError

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


def test_imagefolder_converts_every_mode_and_skips_bad_files_with_one_warning(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "folder")
    assert Image.open(root / "dogs" / "deep16.png").mode == "I;16"  # the case we mean to cover
    assert Image.open(root / "dogs" / "cmyk.jpg").mode == "CMYK"
    with pytest.warns(UserWarning) as record:
        src = ImageFolderSource(str(root))
    assert len(record) == 1
    assert "skipped 2 non-image or unreadable file(s)" in str(record[0].message)
    assert src.class_names == ["cats", "dogs"]  # the empty class folder is dropped, labels stay contiguous
    assert len(src) == len(FOLDER_IMAGES)
    view = SplitView(src, np.arange(len(src)), 32, "all")
    seen = {}
    for i in range(len(view)):
        item = view[i]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert not item["has_mask"] and float(item["mask"].abs().sum()) == 0.0
        rel = Path(src.files[item["index"]]).relative_to(root).as_posix()
        assert item["label"] == ["cats", "dogs"].index(rel.split("/")[0])
        seen[rel] = (item["image"] * 255).round().to(torch.int64)
    assert set(seen) == set(FOLDER_IMAGES)
    for rel, (_, rgb, tol) in FOLDER_IMAGES.items():
        want = torch.tensor(rgb).view(3, 1, 1)
        assert int((seen[rel] - want).abs().max()) <= tol, (rel, seen[rel][:, 0, 0].tolist())


def test_imagefolder_through_load_split(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "folder")
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}", "data.image_size=40",
                             "data.val_fraction=0.34", "data.test_fraction=0.34"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = {s: load_split(cfg.data, s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 2, 2]  # 3 per class: 1 / 1 / 1
    assert sorted(int(i) for s in splits.values() for i in s.indices) == list(range(6))
    assert splits["val"][0]["image"].shape == (3, 40, 40)


def test_imagefolder_missing_empty_or_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"imagefolder dataset not found.*nope.*Get it from https://x\.org"):
        ImageFolderSource(str(tmp_path / "nope"), homepage="https://x.org")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no readable images found"):
        ImageFolderSource(str(tmp_path / "empty"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"is not a folder"):
        ImageFolderSource(str(tmp_path / "afile"))
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    (bad / "x.jpg").write_bytes(b"nope")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(UserError, match="no readable images"):
        ImageFolderSource(str(tmp_path / "bad"))
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


# ------------------------------------------------------------------------------------------ torchvision sources
def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=offset)


def test_fashion_mnist_small_limit(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.source=fashion_mnist", "data.limit=50", "data.image_size=28",
                             "data.val_fraction=0.2", "data.test_fraction=0.2", "data.seed=4"])
    train, val, test = (load_split(cfg.data, s) for s in ("train", "val", "test"))
    # the lazily extracted files went to CNNPRIOR_CACHE (a temp dir here), not ~/.cache
    raws = list((Path(os.environ["CNNPRIOR_CACHE"]) / "fashion_mnist").glob("*/FashionMNIST/raw"))
    assert len(raws) == 1 and (raws[0] / "t10k-images-idx3-ubyte").stat().st_size == 16 + 10000 * 28 * 28
    assert train.class_names == list(FASHION_MNIST_CLASSES)
    # limit caps the official training pool (5 per class), val is 20 % of it; test = 20 % of limit
    assert (len(train), len(val), len(test)) == (40, 10, 10)
    assert np.bincount(train.labels, minlength=10).tolist() == [4] * 10
    assert np.bincount(val.labels, minlength=10).tolist() == [1] * 10
    assert np.bincount(test.labels, minlength=10).tolist() == [1] * 10
    assert not set(train.indices) & set(val.indices)
    # pixels and labels agree with an independent read of the Debian .gz files
    images = _idx(Path(FASHION_MNIST_DEBIAN) / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _idx(Path(FASHION_MNIST_DEBIAN) / "t10k-labels-idx1-ubyte.gz", 8)
    for i in (0, 9):
        item = test[i]
        assert item["image"].shape == (3, 28, 28)
        got = (item["image"] * 255).round().to(torch.uint8).numpy()
        assert (got == images[item["index"]][None]).all()  # grey copied to all three channels
        assert item["label"] == labels[item["index"]]
    cfg32 = load_config(None, ["data.source=fashion_mnist", "data.limit=20", "data.image_size=32"])
    assert load_split(cfg32.data, "train")[0]["image"].shape == (3, 32, 32)


def test_fashion_mnist_missing_folder(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.source=fashion_mnist", f"data.root={tmp_path / 'none'}"])
    with pytest.raises(UserError, match=r"fashion_mnist dataset not found.*apt-get install -y dataset-fashion-mnist"):
        load_split(cfg.data, "train")
    assert len(fashion_mnist("", "test")) == 10000  # fills the cache from the Debian folder ...
    (tmp_path / "partial").mkdir()  # ... which must not stand in for another, incomplete folder
    (tmp_path / "partial" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    cfg = load_config(None, ["data.source=fashion_mnist", f"data.root={tmp_path / 'partial'}"])
    with pytest.raises(UserError, match=r"incomplete.*lacks train-labels-idx1-ubyte\.gz"):
        load_split(cfg.data, "train")


def test_cifar10_without_files_and_no_download(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.source=cifar10", f"data.root={tmp_path}"])
    with pytest.raises(UserError) as info:
        load_split(cfg.data, "test")
    msg = str(info.value)
    assert "cifar-10-batches-py" in msg and "data.download: true" in msg and str(tmp_path) in msg


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
    from cnnprior.data import _cubic_upsampling_matrix
    coarse = np.random.default_rng(size).uniform(0.15, 0.85, size=(4, 4)).astype(np.float32)
    up = _cubic_upsampling_matrix(4, size)
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
