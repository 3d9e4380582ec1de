"""The study's intervals: a hierarchical bootstrap over training seeds, then images, and the interpolation of a
run's per-image scores at a common budget (equal training FLOPs).

A study arm's score is a matrix (seeds, images): the r of each run's map of each image. Two sources of
variation matter: which seeds were trained (runs of one arm differ), and which images were scored. The
hierarchical bootstrap resamples both: each resample draws the seeds of each arm with replacement
(independently per arm: arm A's seed s and arm B's seed s are separate trainings) and the images with
replacement (the same draw for both arms: they were scored on the same images, so the margin is paired per
image), and takes mean(A) - mean(B) over the drawn seeds and images. The interval is the percentile interval of
those resampled margins. With one seed per arm it is the paired image bootstrap of the evaluation reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["hierarchical_bootstrap", "interpolate_scores"]


def _resampled_means(scores: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(R,) means over seeds drawn with replacement of the image-weighted scores: weights (R, N) sum to 1 per
    row."""
    per_seed = weights @ scores.T  # (R, S): each seed's mean over the resampled images
    r, s = per_seed.shape
    seeds = rng.integers(0, s, size=(r, s))
    return np.take_along_axis(per_seed, seeds, 1).mean(1)


def hierarchical_bootstrap(a: np.ndarray | Sequence, b: np.ndarray | Sequence | None = None, resamples: int = 2000,
                           seed: int = 0, level: float = 0.95, chunk: int = 500) -> dict[str, float]:
    """The mean of `a` (seeds, images) - or the margin mean(a) - mean(b) when `b` (seeds', images) is given - with
    its percentile interval from a hierarchical bootstrap: seeds of each arm resampled independently, images
    resampled jointly (paired). Non-finite scores are not allowed (a run that scored an image NaN is a bug).

    Returns {mean, lo, hi, seeds_a, seeds_b, images}; lo/hi NaN when there is nothing to resample.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = None if b is None else np.atleast_2d(np.asarray(b, dtype=np.float64))
    n = a.shape[1]
    if b is not None and b.shape[1] != n:
        raise ValueError(f"paired scores differ in images: {n} vs {b.shape[1]}")
    if not np.isfinite(a).all() or (b is not None and not np.isfinite(b).all()):
        raise ValueError("scores must be finite")
    out = {"seeds_a": a.shape[0], "seeds_b": 0 if b is None else b.shape[0], "images": n}
    if a.size == 0 or (b is not None and b.size == 0):
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, **out}
    mean = float(a.mean() - (0.0 if b is None else b.mean()))
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=r).astype(np.float64) / n  # (r, N) image draws
        stat = _resampled_means(a, weights, rng)
        if b is not None:
            stat = stat - _resampled_means(b, weights, rng)
        stats.append(stat)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.concatenate(stats), [alpha, 1.0 - alpha])
    return {"mean": mean, "lo": float(lo), "hi": float(hi), **out}


def interpolate_scores(budgets: Sequence[float], scores: np.ndarray, at: float, log: bool = True) -> np.ndarray:
    """Per-image scores of one run at budget `at`, linearly interpolated between the two milestones around it
    (in log budget when `log`: training FLOPs span orders of magnitude). `budgets` (M,) ascending, `scores` (M, N).
    `at` outside [budgets[0], budgets[-1]] is an error: a curve is never extrapolated."""
    x = np.asarray(budgets, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if len(x) != len(s) or len(x) == 0:
        raise ValueError(f"{len(x)} budgets for {len(s)} score rows")
    if np.any(np.diff(x) <= 0):
        raise ValueError("budgets must increase")
    lo_b, hi_b = x[0], x[-1]
    eps = 1e-9 * max(abs(hi_b), 1.0)
    if at < lo_b - eps or at > hi_b + eps:
        raise ValueError(f"budget {at:g} is outside the curve's [{lo_b:g}, {hi_b:g}]")
    at = min(max(at, lo_b), hi_b)
    j = int(np.searchsorted(x, at, side="left"))
    if j < len(x) and math.isclose(x[j], at, rel_tol=1e-12, abs_tol=eps):
        return s[j].copy()
    x0, x1 = x[j - 1], x[j]
    if log:
        if x0 <= 0:
            raise ValueError("log interpolation needs budgets > 0")
        t = (math.log(at) - math.log(x0)) / (math.log(x1) - math.log(x0))
    else:
        t = (at - x0) / (x1 - x0)
    return (1.0 - t) * s[j - 1] + t * s[j]
