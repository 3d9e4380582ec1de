"""Pictures of explanation maps: colormaps and their inverse, overlays, contact sheets, HTML index, charts."""

from __future__ import annotations

import functools
import html
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from cnnprior.core.runtime import atomic_write
from cnnprior.present.report import HTML_STYLE

__all__ = [
    "band_chart", "colorize", "colormap_table", "grouped_bar_chart", "invert_colormap", "line_chart", "make_sheet", "overlay",
    "PathLike", "save_png", "SHEET_CAPTION_H", "SHEET_HEADER_H", "SHEET_PAD", "sheet_size", "upscale",
    "write_index_html"
]

PathLike = str | os.PathLike

# Contact-sheet geometry (pixels): gap around cells, column-header band, per-row caption band.
SHEET_PAD = 4
SHEET_HEADER_H = 22
SHEET_CAPTION_H = 18
_FONT_SIZE = 14
_MIN_FONT_SIZE = 8

# Pixels handled per step in invert_colormap; bounds its temporary memory to a few tens of MB.
_INVERT_CHUNK = 1 << 20
_DIST_CHUNK = 1 << 14


@functools.lru_cache(maxsize=16)
def _table(name: str, n: int) -> np.ndarray:
    """Cached, read-only colour table (see colormap_table)."""
    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {name!r}") from None
    if n < 2:
        raise ValueError(f"colormap table needs n >= 2, got {n}")
    # bytes=True is matplotlib's own float->uint8 conversion, so the table matches images saved by matplotlib.
    table = np.ascontiguousarray(cmap.resampled(n)(np.arange(n), bytes=True)[:, :3])
    table.setflags(write=False)
    return table


def colormap_table(name: str = "jet", n: int = 256) -> np.ndarray:
    """(n, 3) uint8 RGB table of a matplotlib colormap."""
    return _table(name, n).copy()


def _as_map(m: np.ndarray) -> np.ndarray:
    """Validate a 2-D finite map and return it as float32 clipped to [0, 1]."""
    m = np.asarray(m, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"map must be 2-D (H, W), got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("map contains NaN or infinite values")
    return np.clip(m, 0.0, 1.0)


def colorize(m: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Colour a [0, 1] map (clipped) with a colormap: (H, W) float -> (H, W, 3) uint8."""
    table = _table(cmap, 256)
    return table[np.rint(_as_map(m) * 255.0).astype(np.intp)]


@functools.lru_cache(maxsize=16)
def _inverse_table(cmap: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct table colours (K, 3) float32, their squared norms (K,), and their map values (K,)."""
    table = _table(cmap, 256).astype(np.int64)
    packed = (table[:, 0] << 16) | (table[:, 1] << 8) | table[:, 2]
    uniq, inverse = np.unique(packed, return_inverse=True)
    # A colour repeated in the table (jet repeats pure blue at 29..32) maps to the mean of its indices.
    values = np.bincount(inverse, weights=np.arange(256)) / np.bincount(inverse) / 255.0
    colours = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=1).astype(np.float32)
    norms = (colours**2).sum(axis=1)
    out = (colours, norms, values.astype(np.float32))
    for a in out:
        a.setflags(write=False)
    return out


def _nearest_values(rgb: np.ndarray, cmap: str) -> np.ndarray:
    """Map value of the nearest table colour for each row of an (N, 3) float32 array."""
    colours, norms, values = _inverse_table(cmap)
    out = np.empty(len(rgb), dtype=np.float32)
    for start in range(0, len(rgb), _DIST_CHUNK):
        x = rgb[start : start + _DIST_CHUNK]
        # |x - t|^2 minus the constant |x|^2; every term is an integer below 2^24, so float32 is exact.
        dist = norms[None, :] - 2.0 * (x @ colours.T)
        out[start : start + _DIST_CHUNK] = values[np.argmin(dist, axis=1)]
    return out


def invert_colormap(rgb: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Recover map values in [0, 1] from colormapped uint8 pixels (..., 3) (alpha in (..., 4) is ignored)."""
    rgb = np.asarray(rgb)
    if rgb.ndim < 1 or rgb.shape[-1] not in (3, 4):
        raise ValueError(f"expected (..., 3) RGB pixels, got shape {rgb.shape}")
    if not np.issubdtype(rgb.dtype, np.integer):
        raise ValueError(f"expected integer RGB values in 0..255, got dtype {rgb.dtype}")
    if rgb.size and (rgb.min() < 0 or rgb.max() > 255):
        raise ValueError("RGB values must lie in 0..255")
    lead = rgb.shape[:-1]
    flat = rgb[..., :3].reshape(-1, 3)
    out = np.empty(len(flat), dtype=np.float32)
    for start in range(0, len(flat), _INVERT_CHUNK):
        chunk = flat[start : start + _INVERT_CHUNK].astype(np.uint32)
        packed = (chunk[:, 0] << 16) | (chunk[:, 1] << 8) | chunk[:, 2]
        # Maps have few distinct colours, so solve each distinct colour once.
        uniq, inverse = np.unique(packed, return_inverse=True)
        colours = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=1).astype(np.float32)
        out[start : start + len(chunk)] = _nearest_values(colours, cmap)[inverse.reshape(-1)]
    return out.reshape(lead)


def _as_rgb_image(image: np.ndarray) -> np.ndarray:
    """Validate a uint8 (H, W) or (H, W, 3) image and return it as (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {image.shape}")
    return image


def overlay(image: np.ndarray, m: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a colourised map over a uint8 image; the map is resized bilinearly to the image if needed."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = _as_rgb_image(image)
    m = _as_map(m)
    h, w = image.shape[:2]
    if m.shape != (h, w):
        m = np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR), dtype=np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(m, cmap).astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def save_png(path: PathLike, array: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as a PNG, atomically."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"save_png needs uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
    img = Image.fromarray(np.ascontiguousarray(array))
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def upscale(array: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of the first two axes by an integer factor."""
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    factor = int(factor)
    return np.repeat(np.repeat(np.asarray(array), factor, axis=0), factor, axis=1)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at a size (the bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> tuple[str, ImageFont.ImageFont]:
    """Shrink the font, then truncate with an ellipsis, until text fits in width pixels."""
    for size in range(_FONT_SIZE, _MIN_FONT_SIZE - 1, -1):
        font = _font(size)
        if draw.textlength(text, font=font) <= width:
            return text, font
    font = _font(_MIN_FONT_SIZE)
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return (text + "…" if text else ""), font


def _cell_image(image: np.ndarray, cell: int) -> Image.Image:
    """Scale an image by nearest neighbour to fit a cell x cell box, keeping its aspect ratio."""
    img = Image.fromarray(np.ascontiguousarray(_as_rgb_image(image)))
    scale = cell / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.NEAREST)


def sheet_size(n_rows: int, n_cols: int, cell: int, captions: bool) -> tuple[int, int]:
    """(width, height) in pixels of a make_sheet image."""
    width = n_cols * cell + (n_cols + 1) * SHEET_PAD
    row_h = cell + SHEET_PAD + (SHEET_CAPTION_H if captions else 0)
    return width, SHEET_HEADER_H + SHEET_PAD + n_rows * row_h


def make_sheet(
    rows: Sequence[Sequence[np.ndarray]],
    columns: Sequence[str],
    path: PathLike,
    cell: int = 128,
    titles: Sequence[str] | None = None,
) -> None:
    """Write a labelled grid of images (one list per row) as a PNG, atomically."""
    n_cols = len(columns)
    if n_cols == 0 or not rows:
        raise ValueError("make_sheet needs at least one column and one row")
    if any(len(row) > n_cols for row in rows):
        raise ValueError(f"a row has more images than the {n_cols} column headers")
    if titles is not None and len(titles) != len(rows):
        raise ValueError(f"{len(titles)} titles for {len(rows)} rows")
    captions = titles is not None
    sheet = Image.new("RGB", sheet_size(len(rows), n_cols, cell, captions), "white")
    draw = ImageDraw.Draw(sheet)
    black = (0, 0, 0)

    def x_of(col: int) -> int:
        return SHEET_PAD + col * (cell + SHEET_PAD)

    for col, label in enumerate(columns):
        text, font = _fit_text(draw, str(label), cell)
        draw.text((x_of(col) + cell // 2, SHEET_HEADER_H // 2), text, fill=black, font=font, anchor="mm")
    y = SHEET_HEADER_H + SHEET_PAD
    for r, row in enumerate(rows):
        if captions:
            text, font = _fit_text(draw, str(titles[r]), sheet.width - 2 * SHEET_PAD)
            draw.text((SHEET_PAD, y + SHEET_CAPTION_H // 2), text, fill=black, font=font, anchor="lm")
            y += SHEET_CAPTION_H
        for col, image in enumerate(row):
            tile = _cell_image(image, cell)
            sheet.paste(tile, (x_of(col) + (cell - tile.width) // 2, y + (cell - tile.height) // 2))
        y += cell + SHEET_PAD
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))


def _cell_text(value: object) -> str:
    """Table cell text: floats to 3 decimals, everything else as str."""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3f}"
    return str(value)


def write_index_html(
    path: PathLike,
    title: str,
    sheet_rel_path: str,
    table_header: Sequence[str],
    table_rows: Sequence[Sequence[str | float]],
    provenance: Mapping[str, str],
    notes: Sequence[str] = (),
) -> None:
    """Write a self-contained HTML page: the sheet image, a score table, and how it was produced."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{HTML_STYLE}</style>",
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p><img src="{e(sheet_rel_path)}" alt="{e(title)}"></p>',
        "<h2>Scores</h2>",
        "<table>",
        "<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in table_header) + "</tr>",
    ]
    for row in table_rows:
        cells = []
        for value in row:
            cls = ' class="num"' if isinstance(value, (int, float, np.number)) else ""
            cells.append(f"<td{cls}>{e(_cell_text(value))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    if notes:
        parts.append("<h2>Notes</h2><ul>")
        parts.extend(f"<li>{e(str(n))}</li>" for n in notes)
        parts.append("</ul>")
    parts.append("<h2>How it was produced</h2><dl>")
    for key, value in provenance.items():
        parts.append(f"<dt>{e(str(key))}</dt><dd>{e(str(value))}</dd>")
    parts.append("</dl></body></html>\n")
    text = "\n".join(parts).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))


def _save_figure(fig: Figure, path: PathLike) -> None:
    """Render a Figure with the Agg canvas to a PNG, atomically."""
    canvas = FigureCanvasAgg(fig)
    atomic_write(path, lambda f: canvas.print_png(f))


def _finish(fig: Figure, ax: Any, path: PathLike, title: str, xlabel: str, ylabel: str, legend: bool) -> None:
    """Title, axis labels, grid and legend of a one-panel chart, then the PNG (atomically)."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    _save_figure(fig, path)


def grouped_bar_chart(
    labels: Sequence[str],
    values: Mapping[str, Sequence[float]],
    path: PathLike,
    title: str,
    xlabel: str,
) -> None:
    """Write horizontal grouped bars as a PNG, atomically: one group per label (top to bottom), one bar per
    named series, each bar labelled with its value."""
    for name, vals in values.items():
        if len(vals) != len(labels):
            raise ValueError(f"series {name!r} has {len(vals)} values for {len(labels)} labels")
    fig = Figure(figsize=(8.0, 0.5 * len(labels) * max(1, len(values)) / 2 + 1.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    h = 0.8 / max(1, len(values))
    for i, (name, vals) in enumerate(values.items()):
        bars = ax.barh(y + (i - (len(values) - 1) / 2) * h, vals, height=h, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    ax.set_yticks(y, list(labels), fontsize=8)
    ax.invert_yaxis()  # the first label on top
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.15)
    ax.legend(fontsize=8, loc="lower right")
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def line_chart(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: PathLike,
    title: str,
    xlabel: str,
    ylabel: str,
) -> None:
    """Write one line per named series against shared xs as a PNG, atomically."""
    for name, ys in series.items():
        if len(ys) != len(xs):
            raise ValueError(f"series {name!r} has {len(ys)} points for {len(xs)} xs")
    fig = Figure(figsize=(6.0, 3.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for name, ys in series.items():
        ax.plot(xs, ys, label=str(name), marker="o" if len(xs) <= 20 else None, markersize=3)
    _finish(fig, ax, path, title, xlabel, ylabel, legend=bool(series))


def band_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]],
    path: PathLike,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
) -> None:
    """Write one line per named series, each (xs, mean, lo, hi) with its own xs, and a shaded band from lo to hi,
    as a PNG, atomically (learning curves: the mean over seeds and their spread)."""
    fig = Figure(figsize=(6.5, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for name, (xs, mean, lo, hi) in series.items():
        if not len(xs) == len(mean) == len(lo) == len(hi):
            raise ValueError(f"series {name!r}: xs, mean, lo and hi differ in length")
        (line,) = ax.plot(xs, mean, label=str(name), marker="o", markersize=3)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if logx:
        ax.set_xscale("log")
    _finish(fig, ax, path, title, xlabel, ylabel, legend=bool(series))
