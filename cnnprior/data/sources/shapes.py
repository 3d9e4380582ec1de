"""The synthetic `shapes` source: generated images with an exact ground-truth mask of the class shape."""

from __future__ import annotations

import math

import numpy as np

from cnnprior.data.sources.base import ImageSource

__all__ = ["cubic_upsampling_matrix", "SHAPE_CLASSES", "ShapesSource"]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "star")


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
        self._up = cubic_upsampling_matrix(4, size)
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


def cubic_upsampling_matrix(n: int, size: int) -> np.ndarray:
    """(size, n) matrix of Keys' cubic convolution (a = -0.5) with half-pixel centres, the kernel cut at the
    borders and renormalised (Pillow's BICUBIC upsampling): upsampled signal = this matrix @ signal."""
    pos = (np.arange(size) + 0.5) * n / size - 0.5  # output centres in input coordinates
    t = np.abs(pos[:, None] - np.arange(n)[None, :])
    m = np.where(t <= 1, 1.5 * t ** 3 - 2.5 * t ** 2 + 1, np.where(t < 2, -0.5 * t ** 3 + 2.5 * t ** 2 - 4 * t + 2, 0))
    return (m / m.sum(1, keepdims=True)).astype(np.float32)
