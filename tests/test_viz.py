"""Tests for cnnprior.present.viz: colormap round trips, overlays, sheets, HTML index, charts, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from cnnprior.present import viz


def _read(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _no_temp_files(directory) -> bool:
    return not [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_colormap_table_shape_and_ends():
    table = viz.colormap_table("jet")
    assert table.shape == (256, 3) and table.dtype == np.uint8
    # matplotlib jet runs from dark blue to dark red.
    assert table[0].tolist() == [0, 0, 127] and table[-1].tolist() == [127, 0, 0]
    assert viz.colormap_table("viridis", 16).shape == (16, 3)
    table[0] = 1  # a copy: the cached table stays intact
    assert viz.colormap_table("jet")[0].tolist() == [0, 0, 127]


def test_colorize_ends_and_clip():
    table = viz.colormap_table("jet")
    m = np.array([[0.0, 1.0], [-0.5, 7.0]])
    rgb = viz.colorize(m)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == table[0]).all() and (rgb[0, 1] == table[-1]).all()
    assert (rgb[1, 0] == table[0]).all() and (rgb[1, 1] == table[-1]).all()
    assert (viz.colorize(np.full((1, 1), 100 / 255))[0, 0] == table[100]).all()
    with pytest.raises(ValueError):
        viz.colorize(np.array([[np.nan]]))


def test_invert_exact_table_colours():
    table = viz.colormap_table("jet")
    got = viz.invert_colormap(table)
    idx = np.arange(256)
    packed = table.astype(int) @ [65536, 256, 1]
    distinct = np.array([(packed == p).sum() == 1 for p in packed])
    assert distinct.sum() >= 250
    np.testing.assert_array_equal(got[distinct], (idx[distinct] / 255).astype(np.float32))
    # A colour repeated in the table decodes to the mean of its indices.
    for p in np.unique(packed[~distinct]):
        same = packed == p
        assert got[same] == pytest.approx(idx[same].mean() / 255, abs=1e-6)


def test_invert_round_trip_random_maps():
    rng = np.random.default_rng(0)
    m = rng.random((3, 64, 64)).astype(np.float32)
    rgb = np.stack([viz.colorize(x) for x in m])
    back = viz.invert_colormap(rgb)
    assert back.shape == (3, 64, 64) and back.dtype == np.float32
    assert np.abs(back - m).mean() <= 0.005
    # Against the quantised value, only the repeated pure-blue run (indices 29..32) can differ.
    q = np.rint(m * 255) / 255
    assert np.abs(back - q).max() <= 1.5 / 255 + 1e-6


def test_invert_with_jpeg_like_noise():
    rng = np.random.default_rng(1)
    m = rng.random((128, 128)).astype(np.float32)
    rgb = viz.colorize(m).astype(np.int16) + rng.integers(-3, 4, size=(128, 128, 3))
    back = viz.invert_colormap(np.clip(rgb, 0, 255).astype(np.uint8))
    assert np.abs(back - m).mean() <= 0.01


def test_invert_chunked_matches_unchunked(monkeypatch):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(50, 40, 3), dtype=np.uint8)
    whole = viz.invert_colormap(rgb)
    monkeypatch.setattr(viz, "_INVERT_CHUNK", 97)
    monkeypatch.setattr(viz, "_DIST_CHUNK", 13)
    np.testing.assert_array_equal(viz.invert_colormap(rgb), whole)
    # Brute force: the colour behind each returned value is at minimal squared distance from the pixel.
    table = viz.colormap_table("jet").astype(int)
    px = rgb.reshape(-1, 3).astype(int)
    dist = ((px[:, None, :] - table[None, :, :]) ** 2).sum(-1)
    chosen = table[np.rint(whole.reshape(-1) * 255).astype(int)]
    np.testing.assert_array_equal(((px - chosen) ** 2).sum(-1), dist.min(1))


def test_invert_rejects_bad_input():
    with pytest.raises(ValueError):
        viz.invert_colormap(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        viz.invert_colormap(np.zeros((4, 4, 2), dtype=np.uint8))
    rgba = np.concatenate([viz.colorize(np.eye(4)), np.full((4, 4, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(viz.invert_colormap(rgba), np.eye(4, dtype=np.float32))


def test_overlay():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    m = rng.random((32, 48))
    out = viz.overlay(image, m)
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(viz.overlay(image, m, alpha=0.0), image)
    np.testing.assert_array_equal(viz.overlay(image, m, alpha=1.0), viz.colorize(m))
    expected = np.rint(0.5 * image.astype(float) + 0.5 * viz.colorize(m).astype(float)).astype(np.uint8)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    # A constant small map resized to the image stays constant.
    small = viz.overlay(image, np.full((4, 6), 0.25), alpha=1.0)
    assert small.shape == (32, 48, 3)
    np.testing.assert_array_equal(small, viz.colorize(np.full((32, 48), 0.25)))
    gray = viz.overlay(image[:, :, 0], m, alpha=0.0)
    np.testing.assert_array_equal(gray, np.repeat(image[:, :, :1], 3, axis=2))


def test_save_png_and_upscale(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    big = viz.upscale(a, 3)
    assert big.shape == (9, 12) and (big[3:6, 6:9] == a[1, 2]).all()
    path = tmp_path / "sub" / "a.png"
    viz.save_png(path, big)
    np.testing.assert_array_equal(_read(path), big)
    rgb = viz.colorize(np.eye(5))
    viz.save_png(path, rgb)  # overwrite in place
    np.testing.assert_array_equal(_read(path), rgb)
    assert _no_temp_files(path.parent) and os.listdir(path.parent) == ["a.png"]
    with pytest.raises(ValueError):
        viz.save_png(path, np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        viz.upscale(a, 0)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    viz.save_png(path, np.zeros((2, 2), np.uint8))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(RuntimeError):
        viz.save_png(path, np.full((2, 2), 9, np.uint8))
    assert os.listdir(tmp_path) == ["x.png"]
    assert (_read(path) == 0).all()  # old file untouched


def test_make_sheet_size_and_pixels(tmp_path):
    rng = np.random.default_rng(4)
    cell = 64
    rows = []
    for _ in range(3):
        inp = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        m = rng.random((16, 16))
        rows.append([inp, viz.colorize(m), viz.overlay(inp, m)])
    columns = ["input", "Grad-CAM (target)", "GAN"]
    path = tmp_path / "sheet.png"
    titles = ["#0 Sneaker r=0.91", "#1 Bag r=0.5", "#2 a very long caption " * 5]
    viz.make_sheet(rows, columns, path, cell=cell, titles=titles)
    sheet = _read(path)
    pad, header, caption = viz.SHEET_PAD, viz.SHEET_HEADER_H, viz.SHEET_CAPTION_H
    width = 3 * cell + 4 * pad
    height = header + pad + 3 * (caption + cell + pad)
    assert sheet.shape == (height, width, 3)
    assert viz.sheet_size(3, 3, cell, True) == (width, height)
    # Row 1, column 2 (overlay): top-left corner of that cell.
    y0 = header + pad + 1 * (caption + cell + pad) + caption
    x0 = pad + 2 * (cell + pad)
    np.testing.assert_array_equal(sheet[y0 : y0 + cell, x0 : x0 + cell], viz.upscale(rows[1][2], cell // 16))
    # Row 0, column 0 (input).
    y0 = header + pad + caption
    np.testing.assert_array_equal(sheet[y0 : y0 + cell, pad : pad + cell], viz.upscale(rows[0][0], 4))
    # Header band has dark label pixels, and the padding between cells is white.
    assert sheet[:header].min() < 100
    assert (sheet[header : header + pad] == 255).all()
    assert _no_temp_files(tmp_path)


def test_make_sheet_without_titles_and_short_rows(tmp_path):
    path = tmp_path / "s.png"
    img = np.full((8, 8, 3), 200, np.uint8)
    viz.make_sheet([[img], [img, img]], ["a", "b"], path, cell=32)
    assert _read(path).shape[1::-1] == viz.sheet_size(2, 2, 32, False) == (2 * 32 + 3 * 4, 22 + 4 + 2 * 36)
    with pytest.raises(ValueError):
        viz.make_sheet([[img, img, img]], ["a", "b"], path)
    with pytest.raises(ValueError):
        viz.make_sheet([[img]], ["a"], path, titles=["x", "y"])


def test_write_index_html(tmp_path):
    path = tmp_path / "index.html"
    rows = [["0", "<b>Sneaker</b>", 0.91234], ["1", "Bag & Co", np.float32(0.5)], ["2", "Coat", 1]]
    viz.write_index_html(
        path,
        title="Priors <test>",
        sheet_rel_path="sheets/sheet 1.png",
        table_header=["#", "class", "r"],
        table_rows=rows,
        provenance={"checkpoint": "runs/a/gen.pt", "command": "python -m x --flag \"<y>\""},
        notes=["maps are min-max normalised"],
    )
    text = path.read_text(encoding="utf-8")
    assert "&lt;b&gt;Sneaker&lt;/b&gt;" in text and "<b>Sneaker" not in text
    assert "Bag &amp; Co" in text and "Priors &lt;test&gt;" in text
    assert 'src="sheets/sheet 1.png"' in text
    assert "0.912" in text and "0.91234" not in text and "0.500" in text and ">1<" in text
    assert text.count("<tr>") == 1 + len(rows)
    assert "runs/a/gen.pt" in text and "&quot;&lt;y&gt;&quot;" in text
    assert "maps are min-max normalised" in text
    assert "http" not in text and "<script" not in text and "<link" not in text
    assert _no_temp_files(tmp_path)


def test_charts(tmp_path):
    bar = tmp_path / "bar.png"
    labels = ["layer1", "layer2", "layer3"]
    viz.grouped_bar_chart(labels, {"zeros": [0.8, 0.6, 0.3], "mean": [0.5, 0.4, 0.1]}, bar, "Relevance per prior",
                          "r")
    line = tmp_path / "line.png"
    series = {"D(real)": [0.9, 0.8, 0.7, 0.6], "D(fake)": [0.1, 0.2, 0.3, 0.4]}
    viz.line_chart([1, 2, 3, 4], series, line, "Training", "epoch", "p")
    for p in (bar, line):
        with Image.open(p) as img:
            img.load()
            assert img.format == "PNG" and img.width > 200 and img.height > 150
            # Not blank: a chart has both white background and dark ink.
            arr = np.asarray(img.convert("L"))
            assert arr.max() == 255 and arr.min() < 80
    assert sorted(os.listdir(tmp_path)) == ["bar.png", "line.png"]
    with pytest.raises(ValueError):
        viz.grouped_bar_chart(["a", "b"], {"s": [1.0]}, bar, "t", "y")
    with pytest.raises(ValueError):
        viz.line_chart([1, 2], {"s": [1.0]}, line, "t", "x", "y")
