"""Smooth MPRT (sMPRT) and efficient MPRT (eMPRT) of Hedström et al. 2023 ("Sanity checks revisited"), as
Quantus defines them: the input perturbation and explanation averaging of sMPRT, the histogram entropy and the
complexity-rise score of eMPRT. Pure functions on tensors; the MPRT section runs the models.

Read in Quantus (github.com/understandable-machine-intelligence-lab/Quantus):

- `quantus/metrics/randomisation/smooth_mprt.py`, class `SmoothMPRT`: defaults `layer_order="bottom_up"`,
  `nr_samples=50`, `noise_magnitude=0.1`, `similarity_func=correlation_spearman` (scipy's spearmanr of the two
  flattened maps), `abs=True`, `normalise=True` (`normalise_by_max`). `explain_smooth_batch` sets the noise
  std per sample to `noise_magnitude * (x.max() - x.min())` over all non-batch axes of the input;
  `explain_smooth_batch_numpy` explains `x + eps` for n = 0..nr_samples-1 with `eps = randn * std` (Gaussian,
  unseeded `np.random`) except the last sample, whose eps is zero (the clean input), and sums `a / nr_samples`:
  the RAW explanations are averaged, and only then normalised (`normalise_by_max`, called without axes, i.e.
  by the maximum |a| of the whole batch) and made absolute. Both the trained model's and every randomised
  model's explanations are smoothed this way; the score per layer and sample is the similarity of the two.
- `quantus/metrics/randomisation/efficient_mprt.py`, class `EfficientMPRT`: defaults `layer_order="bottom_up"`,
  `skip_layers=True` (only the trained and the last, fully randomised state are explained), `abs=False`,
  `normalise=False`, `complexity_func=discrete_entropy` with `n_bins` = 100 (`find_n_bins`: no rule given ->
  `n_bins_default=100`, one value for the whole batch). The score per sample is the relative rise in complexity
  `(H_random - H_trained) / H_trained` (`evaluation_scores`; no guard for H_trained = 0); the plain fraction
  `H_random / H_trained` (NaN where H_trained = 0) is an extra score (`scores_fraction_explanation`).
- `quantus/functions/complexity_func.py`, `discrete_entropy(a, x, n_bins=100)`:
  `scipy.stats.entropy(np.histogram(a, bins=n_bins)[0])`: n_bins equal-width bins over [min(a), max(a)] of the
  one explanation (numpy widens a constant map's range by ±0.5, so all of it lands in one bin), natural log of
  the normalised counts. A constant map scores 0, a map with equal counts in all bins log(n_bins).
- `quantus/helpers/model/pytorch_model.py`, `get_random_layer_generator`: layers are the modules with
  `reset_parameters`, in definition order (input first); `top_down` reverses them, `independent` reloads the
  trained weights before each layer, anything else (`bottom_up`) cascades from the input; each layer is reset
  with `torch.manual_seed(seed + 1)`, PyTorch's default init.

Where this module differs (each documented at its function): the noise is seeded (`seed`, copy index), so the
trained and the randomised models see the same noisy copies (common random numbers; Quantus draws fresh noise
for each model); `normalise_by_max` scales per sample, not by the batch's maximum (Quantus' result would depend
on the batch); eMPRT gives NaN, not ±inf, where the trained map's entropy is 0. The randomised CNNs come from
`cnnprior.cnn.randomise` (whole stages, not single modules; see there).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "complexity_ratio", "discrete_entropy", "EMPRT_BINS", "emprt_score", "noisy_copies", "noisy_copy",
    "normalise_by_max", "SMPRT_MAGNITUDE", "SMPRT_SAMPLES", "smoothed"
]

SMPRT_SAMPLES = 50  # Quantus' SmoothMPRT nr_samples
SMPRT_MAGNITUDE = 0.1  # Quantus' SmoothMPRT noise_magnitude: noise std / the input's value range
EMPRT_BINS = 100  # Quantus' EfficientMPRT n_bins (n_bins_default, no binning rule)
_SEED_STRIDE = 1_000_003  # copy i of seed s draws from the generator seed s * stride + i


# ----------------------------------------------------------------------------------------- sMPRT
def _noise_std(images: Tensor, magnitude: float) -> Tensor:
    """Per-sample noise std, (B, 1, ..., 1): magnitude × (max − min) of each input over its non-batch axes."""
    flat = images.reshape(images.shape[0], -1)
    span = flat.amax(1) - flat.amin(1)
    return (magnitude * span).view(-1, *([1] * (images.dim() - 1)))


def noisy_copy(images: Tensor, index: int, n: int, magnitude: float, seed: int) -> Tensor:
    """Noisy copy `index` (0..n-1) of a batch of inputs, as sMPRT explains them.

    Args:
        images: (B, ...) inputs, as fed to the model.
        index: which copy; the last one (index n − 1) is the clean input, as in Quantus.
        n: number of copies (Quantus: nr_samples, SMPRT_SAMPLES).
        magnitude: noise std relative to each input's value range max − min (Quantus: noise_magnitude).
        seed: copy i draws its Gaussian noise from a CPU generator seeded with seed * 1_000_003 + i, so the same
            (images shape, index, seed) gives the same noise on any device, whatever the caller's RNG state.
            Image b gets the b-th slice of the copy's noise: callers that split the images into batches should
            give each batch its own seed.

    Returns:
        images + eps with eps ~ N(0, std_b^2) per element, std_b = magnitude × (max − min) of image b; the same
        dtype and device as `images`.
    """
    if not 0 <= index < n:
        raise ValueError(f"index must be in 0..{n - 1}, got {index}")
    if index == n - 1:
        return images.clone()
    gen = torch.Generator().manual_seed(seed * _SEED_STRIDE + index)
    eps = torch.randn(images.shape, generator=gen, dtype=torch.float64)
    std = _noise_std(images.detach().double().cpu(), magnitude)
    return (images.double() + (eps * std).to(images.device)).to(images.dtype)


def noisy_copies(images: Tensor, n: int, magnitude: float, seed: int) -> Tensor:
    """All n noisy copies of a batch, (n, B, ...): `noisy_copy` for index 0..n-1 (the last is the clean input).
    Holds n times the batch in memory; `smoothed` explains them one copy at a time instead."""
    return torch.stack([noisy_copy(images, i, n, magnitude, seed) for i in range(n)])


def smoothed(maps_fn: Callable[[Tensor], dict[str, Tensor]], images: Tensor, n: int = SMPRT_SAMPLES,
             magnitude: float = SMPRT_MAGNITUDE, seed: int = 0) -> dict[str, Tensor]:
    """sMPRT's denoised explanations: the mean of `maps_fn` over the n noisy copies of the inputs.

    Args:
        maps_fn: a batch of inputs -> {method: (B, 1, H, W) maps}; called once per copy.
        images: (B, C, H, W) inputs.
        n, magnitude, seed: as in `noisy_copy`. Use the same seed for the trained and the randomised model.

    Returns:
        {method: mean over copies}, in the dtype maps_fn returns. As in Quantus the maps are averaged as the
        explainer returns them, BEFORE any normalisation or absolute value (Quantus then applies
        normalise_by_max and abs; `normalise_by_max` here, per sample; the Spearman similarity of |maps| does not
        depend on it). The sum is kept in float64 and divided by n once, so maps that do not depend on the input
        come back exactly.
    """
    total: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for i in range(n):
        out = maps_fn(noisy_copy(images, i, n, magnitude, seed))
        if i and set(out) != set(total):
            raise ValueError(f"maps_fn returned methods {sorted(out)}, before {sorted(total)}")
        for method, maps in out.items():
            maps = maps.detach()
            dtypes[method] = maps.dtype
            total[method] = maps.double() if i == 0 else total[method] + maps.double()
    return {m: (t / n).to(dtypes[m]) for m, t in total.items()}


def normalise_by_max(maps: Tensor) -> Tensor:
    """Quantus' normalise_by_max per sample: each map divided by its maximum |value| (an all-zero map is left
    as it is). Quantus' SmoothMPRT calls it without axes, i.e. by the maximum of the whole batch; per sample
    keeps a map's value independent of the other maps in its batch."""
    peak = maps.reshape(maps.shape[0], -1).abs().amax(1).view(-1, *([1] * (maps.dim() - 1)))
    return torch.where(peak > 0, maps / torch.where(peak > 0, peak, torch.ones_like(peak)), maps)


# ----------------------------------------------------------------------------------------- eMPRT
def _entropy_of(values: np.ndarray, n_bins: int) -> float:
    """Quantus' discrete_entropy of one explanation: scipy.stats.entropy(np.histogram(values, n_bins)[0])."""
    if values.size == 0 or not np.all(np.isfinite(values)):
        return math.nan
    counts, _ = np.histogram(values, bins=n_bins)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: -0.0 (one full bin) reads 0.0


def discrete_entropy(maps: Tensor, n_bins: int = EMPRT_BINS) -> Tensor:
    """Per-sample discrete entropy of the maps' value histogram, (B,) float64, as Quantus' discrete_entropy.

    Args:
        maps: (B, ...) explanations; each sample is flattened and histogrammed on its own.
        n_bins: equal-width bins over [min, max] of the sample (numpy.histogram; a constant map: one full bin).

    Returns:
        −Σ p_k ln p_k over the bins with p_k = count_k / P (P values per map): 0 for a constant map, ln(n_bins)
        for equal counts in every bin; NaN for a map holding a non-finite value (numpy.histogram refuses it).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    flat = maps.detach().reshape(maps.shape[0], -1).double().cpu().numpy()
    return torch.tensor([_entropy_of(row, n_bins) for row in flat], dtype=torch.float64)


def emprt_score(maps_trained: Tensor, maps_random: Tensor, n_bins: int = EMPRT_BINS) -> Tensor:
    """eMPRT per sample, (B,): Quantus' EfficientMPRT score, the relative rise in explanation complexity
    (H_random − H_trained) / H_trained with H = `discrete_entropy`; higher is better (the explanation got more
    complex when the model was randomised), 0 = unchanged. `maps_random` is the explanation of the fully
    randomised model (Quantus: skip_layers=True, the last state of the bottom-up cascade), both maps raw
    (Quantus: abs=False, normalise=False). NaN where H_trained is 0 (a constant trained map, where Quantus
    divides by zero) or either map holds a non-finite value; `mean_ci` leaves NaNs out."""
    return _rise(discrete_entropy(maps_trained, n_bins), discrete_entropy(maps_random, n_bins), relative=True)


def complexity_ratio(maps_trained: Tensor, maps_random: Tensor, n_bins: int = EMPRT_BINS) -> Tensor:
    """H_random / H_trained per sample, (B,) (Quantus' extra score `scores_fraction_explanation`; NaN where
    H_trained is 0, as there): `emprt_score` + 1, > 1 when the randomised model's map is more complex."""
    return _rise(discrete_entropy(maps_trained, n_bins), discrete_entropy(maps_random, n_bins), relative=False)


def _rise(h_trained: Tensor, h_random: Tensor, relative: bool) -> Tensor:
    if h_trained.shape != h_random.shape:
        raise ValueError(f"shape mismatch: {tuple(h_trained.shape)} vs {tuple(h_random.shape)}")
    ok = h_trained > 0  # False for NaN too
    safe = torch.where(ok, h_trained, torch.ones_like(h_trained))
    value = (h_random - h_trained) / safe if relative else h_random / safe
    return torch.where(ok, value, torch.full_like(value, math.nan))
