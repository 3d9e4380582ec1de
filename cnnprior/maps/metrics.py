"""Metrics for explanation maps: fidelity to a reference map, faithfulness to the model, localisation.

Maps are float tensors in [0, 1] of shape (B, H, W) or (B, 1, H, W). Unless stated otherwise a
metric returns a per-sample tensor of shape (B,); averaging over a data set is the caller's job.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from torch import Tensor, nn

__all__ = [
    "average_drop", "bootstrap_ci", "class_probs", "deletion_insertion_auc", "energy_pointing_game",
    "explanation_masked", "fidelity", "increase_in_confidence", "l1", "pearson", "pointing_game",
    "ROAD_PERCENTILES", "road_scores", "ssim", "ssim_or_nan", "SSIM_WINDOW"
]

ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def _as_maps(x: Tensor, name: str = "map") -> Tensor:
    """Return a (B, H, W) float view of a (B, H, W) or (B, 1, H, W) map batch."""
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B,H,W) or (B,1,H,W), got {tuple(x.shape)}")
    return x if x.is_floating_point() else x.float()


def _check_same_shape(a: Tensor, b: Tensor) -> None:
    """Raise ValueError unless two map batches have the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")


# ---------------------------------------------------------------------------------------------
# Fidelity: generated map vs reference (Grad-CAM) map
# ---------------------------------------------------------------------------------------------


def l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error per sample, shape (B,)."""
    pred, target = _as_maps(pred, "pred"), _as_maps(target, "target")
    _check_same_shape(pred, target)
    return (pred - target).abs().flatten(1).mean(1)


def pearson(pred: Tensor, target: Tensor) -> Tensor:
    """Pearson correlation over pixels per sample, shape (B,); r = 0 where either map is constant.

    A constant map has zero variance, so r is undefined (0/0); we report 0 ("no linear relation")
    instead of NaN so that batch means stay finite.
    """
    pred, target = _as_maps(pred, "pred"), _as_maps(target, "target")
    _check_same_shape(pred, target)
    p, t = pred.flatten(1), target.flatten(1)
    # Constancy is decided exactly (max == min): centring a constant float map by its float mean
    # can leave rounding noise whose "correlation" would be meaningless.
    constant = (p.amax(1) == p.amin(1)) | (t.amax(1) == t.amin(1))
    pc, tc = p - p.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    cov = (pc * tc).sum(1)
    denom = (pc.square().sum(1) * tc.square().sum(1)).sqrt()
    r = cov / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    return torch.where(constant, torch.zeros_like(r), r.clamp(-1.0, 1.0))


SSIM_WINDOW = 11  # ssim's window: maps must be at least this size


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised 2-D Gaussian window of shape (1, 1, size, size)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    w = torch.outer(g, g)
    return (w / w.sum()).to(dtype=dtype, device=device)[None, None]


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean SSIM per sample, shape (B,) (Wang et al. 2004: 11x11 Gaussian, sigma 1.5, K1=0.01, K2=0.03).

    Local statistics use 'valid' convolution (no padding) and population (biased) variances, which
    matches skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False). Maps must be at least 11x11.
    SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    C1 = (K1 L)^2, C2 = (K2 L)^2, L = data_range.
    """
    pred, target = _as_maps(pred, "pred"), _as_maps(target, "target")
    _check_same_shape(pred, target)
    size, sigma, k1, k2 = SSIM_WINDOW, 1.5, 0.01, 0.03
    if pred.shape[-1] < size or pred.shape[-2] < size:
        raise ValueError(f"ssim needs maps of at least {size}x{size}, got {tuple(pred.shape[-2:])}")
    dtype = torch.promote_types(pred.dtype, target.dtype)
    x, y = pred.to(dtype)[:, None], target.to(dtype)[:, None]
    # Moments are taken about each map's own mean: variances are shift-invariant, and E[x^2] - mu^2
    # on raw float32 values cancels badly for flat maps (errors ~1e-7 are large next to C2 ~ 1e-3).
    cx, cy = x.mean(dim=(2, 3), keepdim=True), y.mean(dim=(2, 3), keepdim=True)
    x, y = x - cx, y - cy
    win = _gaussian_window(size, sigma, dtype, x.device)
    # One convolution over the five stacked moments instead of five separate calls.
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), win)
    m_x, m_y, e_xx, e_yy, e_xy = stats.chunk(5)
    var_x, var_y, cov = e_xx - m_x**2, e_yy - m_y**2, e_xy - m_x * m_y
    mu_x, mu_y = m_x + cx, m_y + cy
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(1)


def ssim_or_nan(pred: Tensor, target: Tensor) -> Tensor:
    """`ssim` per sample, (B,); NaN (in pred's dtype) when the maps are smaller than its window."""
    if min(pred.shape[-2:]) < SSIM_WINDOW:
        return torch.full((pred.shape[0],), math.nan, dtype=pred.dtype, device=pred.device)
    return ssim(pred, target)


def fidelity(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Per-sample L1, Pearson r and SSIM of predicted vs reference maps, keys "l1", "r", "ssim"."""
    return {"l1": l1(pred, target), "r": pearson(pred, target), "ssim": ssim(pred, target)}


def bootstrap_ci(values: Tensor | np.ndarray | Sequence[float], level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `values` (NaNs dropped); (nan, nan) if empty.

    For a margin between two methods scored on the same images pass the per-image differences (paired).
    """
    v = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------
# Faithfulness: does the map point at what the classifier uses?
# ---------------------------------------------------------------------------------------------


def _as_classes(classes: Tensor | Sequence[int] | int, n: int, device: torch.device) -> Tensor:
    """Return class indices as a long tensor of shape (n,) on device."""
    c = torch.as_tensor(classes, dtype=torch.long, device=device).reshape(-1)
    if c.numel() == 1:
        c = c.expand(n)
    if c.numel() != n:
        raise ValueError(f"need one class per image: {n} images, {c.numel()} classes")
    return c


def _as_baseline(baseline: Tensor | None, inputs: Tensor) -> Tensor:
    """Expand a baseline (None -> zeros, (3,) per-channel, or broadcastable to inputs) to inputs' shape."""
    if baseline is None:
        return torch.zeros_like(inputs)
    baseline = baseline.to(device=inputs.device, dtype=inputs.dtype)
    if baseline.dim() == 1:
        baseline = baseline.view(1, -1, 1, 1)
    return baseline.expand_as(inputs)


@torch.no_grad()
def class_probs(
    model: nn.Module, inputs: Tensor, classes: Tensor | Sequence[int] | int, batch_size: int = 64
) -> Tensor:
    """Softmax probability of each image's given class, shape (B,).

    inputs are the model's (normalised) input tensors (B, 3, H, W); the model is used as is, so put
    it in eval mode first.
    """
    cls = _as_classes(classes, inputs.shape[0], inputs.device)
    out = []
    for i in range(0, inputs.shape[0], batch_size):
        logits = model(inputs[i : i + batch_size])
        probs = logits.float().softmax(dim=1)
        out.append(probs.gather(1, cls[i : i + batch_size, None].to(probs.device))[:, 0])
    return torch.cat(out).to(inputs.device)


def explanation_masked(inputs: Tensor, maps: Tensor, baseline: Tensor | None = None) -> Tensor:
    """Images shown only through their maps: inputs * map + baseline * (1 - map), shape (B, 3, H, W).

    baseline: None (zeros, i.e. the plain product inputs * map of Grad-CAM++; for normalised inputs
    zero is the per-channel data mean), a per-channel tensor (3,), or a tensor broadcastable to inputs.
    """
    m = _as_maps(maps, "maps")[:, None].to(device=inputs.device, dtype=inputs.dtype)
    if m.shape[-2:] != inputs.shape[-2:] or m.shape[0] != inputs.shape[0]:
        raise ValueError(f"maps {tuple(m.shape)} do not match inputs {tuple(inputs.shape)}")
    return inputs * m + _as_baseline(baseline, inputs) * (1 - m)


def average_drop(p_orig: Tensor, p_expl: Tensor) -> float:
    """Average Drop in percent (Chattopadhay et al. 2018): 100 * mean_i max(0, p_orig_i - p_expl_i) / p_orig_i.

    p_orig_i is the class probability on image i, p_expl_i on the explanation-masked image
    (see explanation_masked). Lower is better. A sample with p_orig_i = 0 contributes 0.
    """
    drop = (p_orig - p_expl).clamp_min(0)
    return float(100 * (drop / p_orig.clamp_min(torch.finfo(p_orig.dtype).tiny)).mean())


def increase_in_confidence(p_orig: Tensor, p_expl: Tensor) -> float:
    """Increase in Confidence in percent (Chattopadhay et al. 2018): 100 * mean_i 1[p_expl_i > p_orig_i].

    Strict inequality: equal probabilities do not count as an increase. Higher is better.
    """
    return float(100 * (p_expl > p_orig).float().mean())


def _pixel_ranks(maps: Tensor) -> Tensor:
    """Rank of each pixel by map value, descending, ties by raster index; shape (B, H*W), 0 = most relevant."""
    flat = maps.flatten(1)
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


@torch.no_grad()
def deletion_insertion_auc(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | Sequence[int] | int,
    steps: int = 16,
    baseline: Tensor | None = None,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Per-sample deletion AUC (lower is better) and insertion AUC (higher is better), each shape (B,).

    Pixels are ranked by map value, descending; ties go to the lower raster index (stable sort).
    At step k = 0..steps the top n_k = round(k * N / steps) of the N pixels are replaced by the
    baseline (deletion) or are the only pixels taken from the image, the rest being baseline
    (insertion); all channels of a pixel move together. The curve is the class probability at the
    steps + 1 points x_k = n_k / N (= k / steps when steps divides N), integrated by the trapezoid rule
    over x in [0, 1].
    baseline: None = zeros in input space, which for normalised inputs is the per-channel data mean
    (a grey image); or a per-channel tensor (3,) (e.g. the normalised value of black), or a tensor
    (B, 3, H, W) (e.g. a blurred copy of the images).
    """
    m = _as_maps(maps, "maps")
    b, _, h, w = inputs.shape
    if m.shape != (b, h, w):
        raise ValueError(f"maps {tuple(m.shape)} do not match inputs {tuple(inputs.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cls = _as_classes(classes, b, inputs.device)
    base = _as_baseline(baseline, inputs)
    n = h * w
    ranks = _pixel_ranks(m.to(inputs.device)).view(b, 1, h, w)
    counts = [(2 * k * n + steps) // (2 * steps) for k in range(steps + 1)]  # round half up, exact ints
    deletion, insertion = [], []
    for n_k in counts:
        top = ranks < n_k
        deletion.append(class_probs(model, torch.where(top, base, inputs), cls, batch_size))
        insertion.append(class_probs(model, torch.where(top, inputs, base), cls, batch_size))
    x = torch.tensor([c / n for c in counts], dtype=deletion[0].dtype, device=deletion[0].device)
    auc_del = torch.trapezoid(torch.stack(deletion, 1), x, dim=1)
    return auc_del, torch.trapezoid(torch.stack(insertion, 1), x, dim=1)


def road_scores(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor | Sequence[int] | int,
    percentiles: Sequence[int] = ROAD_PERCENTILES,
    seed: int | None = 0,
) -> dict[str, Tensor]:
    """ROAD (Rong et al. 2022) via pytorch-grad-cam; per-sample tensors (B,) under "combined", "morf", "lerf".

    "morf"/"lerf": change of the class softmax probability (after - before) when the most / least
    relevant pixels are replaced by noisy linear imputation, averaged over percentiles. Grad-CAM's
    percentile p KEEPS about p% of the pixels (the least relevant for MoRF, the most relevant for
    LeRF) and imputes the other (100 - p)%; over the symmetric default 10..90 the mean is the same as
    removing p%. "morf" lower is better, "lerf" higher is better; "combined" = (lerf - morf) / 2,
    higher is better (ROADCombined's formula).
    Slow: one sparse linear solve per image, percentile and order (2 * len(percentiles) * B solves,
    on the CPU); meant for inference reports, not per-epoch validation. A constant map has no
    ordering: grad-cam then imputes every pixel at every percentile, so MoRF = LeRF up to the noise
    and "combined" is ~0.
    seed: the imputer adds Gaussian noise from torch's global CPU generator; with a seed the noise is
    reproducible and the caller's generator state is left untouched; None uses the global state.
    """
    m = _as_maps(maps, "maps")
    b, _, h, w = inputs.shape
    if m.shape != (b, h, w):
        raise ValueError(f"maps {tuple(m.shape)} do not match inputs {tuple(inputs.shape)}")
    cls = _as_classes(classes, b, torch.device("cpu")).tolist()
    targets = [ClassifierOutputSoftmaxTarget(c) for c in cls]
    cams = m.detach().cpu().float().numpy()
    inputs = inputs.detach()  # the imputer calls .numpy() on each image
    pct = list(percentiles)

    def run() -> tuple[np.ndarray, np.ndarray]:
        # Same order as ROADCombined (LeRF first), so a seeded run reproduces its numbers while
        # each averager runs once instead of ROADCombined + two more for the parts.
        with warnings.catch_warnings():
            # grad-cam's imputer calls np.argwhere on a torch tensor; NumPy 2 warns, result is right.
            warnings.filterwarnings("ignore", message=r"__array_wrap__ must accept", category=DeprecationWarning)
            lerf = ROADLeastRelevantFirstAverage(pct)(inputs, cams, targets, model)
            morf = ROADMostRelevantFirstAverage(pct)(inputs, cams, targets, model)
        return lerf, morf

    if seed is None:
        lerf, morf = run()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lerf, morf = run()
    lerf_t = torch.as_tensor(np.asarray(lerf, dtype=np.float32)).reshape(b)
    morf_t = torch.as_tensor(np.asarray(morf, dtype=np.float32)).reshape(b)
    return {"combined": (lerf_t - morf_t) / 2, "morf": morf_t, "lerf": lerf_t}


# ---------------------------------------------------------------------------------------------
# Localisation against ground-truth masks
# ---------------------------------------------------------------------------------------------


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Pointing-game hit (1.0) or miss (0.0) per sample, shape (B,) (Zhang et al. 2016).

    The map's maximum point (ties: first in raster order) is a hit if a mask pixel lies within
    Euclidean distance `tolerance` of it. Default 0 = the point itself must be in the mask; the
    original protocol uses 15 px at 224x224. An all-zero map points at (0, 0); an empty mask misses.
    """
    m = _as_maps(maps, "maps")
    gt = _as_maps(masks, "masks") > 0.5
    _check_same_shape(m, gt)
    _, h, w = m.shape
    idx = m.flatten(1).argmax(1)  # torch returns the first maximal index
    row, col = (idx // w).view(-1, 1, 1), (idx % w).view(-1, 1, 1)
    rr = torch.arange(h, device=m.device).view(1, h, 1)
    cc = torch.arange(w, device=m.device).view(1, 1, w)
    near = (rr - row) ** 2 + (cc - col) ** 2 <= tolerance**2
    return (near & gt).flatten(1).any(1).to(m.dtype)


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy-based pointing game per sample, sum(map * mask) / sum(map) (Wang et al. 2020); 0 for a zero map."""
    m = _as_maps(maps, "maps")
    gt = _as_maps(masks, "masks").to(m.dtype)
    _check_same_shape(m, gt)
    total = m.flatten(1).sum(1)
    inside = (m * gt).flatten(1).sum(1)
    share = inside / total.clamp_min(torch.finfo(m.dtype).tiny)
    return torch.where(total > 0, share, torch.zeros_like(total))
