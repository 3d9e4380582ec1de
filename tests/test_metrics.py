"""Tests for cnnprior.maps.metrics: every metric against hand-computed values on tiny arrays."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from cnnprior.explain import scores
from cnnprior.maps import metrics

# ---------------------------------------------------------------------------------------------
# Fidelity
# ---------------------------------------------------------------------------------------------


def test_l1_hand_computed_and_accepts_channel_dim() -> None:
    pred = torch.tensor([[[0.0, 1.0], [0.5, 0.5]], [[0.2, 0.2], [0.2, 0.2]]])
    target = torch.tensor([[[0.0, 0.0], [1.0, 0.5]], [[0.2, 0.2], [0.2, 0.2]]])
    # sample 0: |diff| = 0, 1, 0.5, 0 -> 1.5 / 4 = 0.375; sample 1: identical -> 0
    expected = torch.tensor([0.375, 0.0])
    torch.testing.assert_close(metrics.l1(pred, target), expected)
    torch.testing.assert_close(metrics.l1(pred[:, None], target[:, None]), expected)


def test_l1_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        metrics.l1(torch.zeros(1, 2, 2), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError):
        metrics.l1(torch.zeros(2, 2), torch.zeros(2, 2))


def test_pearson_hand_computed_mixed_batch() -> None:
    p = torch.tensor([0.0, 0.5, 0.5, 1.0]).view(2, 2)
    t = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(2, 2)
    const = torch.full((2, 2), 0.3)
    pred = torch.stack([p, t, p, const, const])
    target = torch.stack([t, 1 - t, 2 * p + 0.1, t, const])
    # 0: pc = (-.5, 0, 0, .5), tc = (-.5, -.5, .5, .5): cov = .25 + .25 = .5,
    #    sum pc^2 = .5, sum tc^2 = 1 -> r = .5 / sqrt(.5) = 1/sqrt(2)
    # 1: t vs 1 - t -> -1;  2: affine copy -> 1;  3, 4: a constant map -> 0 by convention
    expected = torch.tensor([1 / math.sqrt(2), -1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(metrics.pearson(pred, target), expected)


def test_pearson_constant_map_with_inexact_float_mean_is_zero() -> None:
    # 0.1 * 49 / 49 is not exactly 0.1 in float32: centring leaves rounding noise, yet r must be 0.
    const = torch.full((1, 7, 7), 0.1)
    target = torch.rand(1, 7, 7, generator=torch.Generator().manual_seed(0))
    assert metrics.pearson(const, target).item() == 0.0
    assert metrics.pearson(target, const).item() == 0.0


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Loop-based SSIM over every valid 11x11 window, float64, written independently of the module."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (win * a).sum(), (win * b).sum()
            va, vb = (win * (a - ma) ** 2).sum(), (win * (b - mb) ** 2).sum()
            cov = (win * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_identical_is_one_and_constants_match_formula() -> None:
    x = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(metrics.ssim(x, x), torch.ones(2))
    a, b = torch.full((1, 12, 12), 0.2), torch.full((1, 12, 12), 0.6)
    # constants: variances and covariance are 0, so the contrast-structure term is C2 / C2 = 1 and
    # SSIM = (2ab + C1) / (a^2 + b^2 + C1) = (0.24 + 1e-4) / (0.04 + 0.36 + 1e-4) = 0.2401 / 0.4001
    torch.testing.assert_close(metrics.ssim(a, b), torch.tensor([0.2401 / 0.4001]))
    # same formula for 0.37 vs 0.81: (0.5994 + 1e-4) / (0.1369 + 0.6561 + 1e-4) = 0.5995 / 0.7931; a naive
    # E[x^2] - mu^2 in float32 leaves variances ~1e-8 here, a visible error next to C2 = 9e-4
    a, b = torch.full((1, 40, 40), 0.37), torch.full((1, 40, 40), 0.81)
    torch.testing.assert_close(metrics.ssim(a, b), torch.tensor([0.5995 / 0.7931]), rtol=2e-6, atol=0)


def test_ssim_matches_loop_reference_and_data_range() -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 13, 14, generator=gen), torch.rand(2, 13, 14, generator=gen)
    y[1] = 0.7 * x[1] + 0.1  # a correlated pair as well as an unrelated one
    expected = torch.tensor([_ssim_reference(x[i].double().numpy(), y[i].double().numpy()) for i in range(2)])
    torch.testing.assert_close(metrics.ssim(x, y), expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics.ssim(2 * x[:, None], 2 * y[:, None], data_range=2.0), metrics.ssim(x, y))


def test_ssim_rejects_maps_smaller_than_window() -> None:
    with pytest.raises(ValueError):
        metrics.ssim(torch.zeros(1, 10, 20), torch.zeros(1, 10, 20))


def _skimage_ssim(x: np.ndarray, y: np.ndarray, sigma: float = 1.5, data_range: float = 1.0) -> float:
    """SSIM as scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    defines it, written out independently in numpy: scipy's truncated Gaussian window (radius int(3.5 sigma + 0.5)),
    local means and (population) variances over 'valid' windows only (skimage crops the border of half a window),
    C1 = (0.01 R)^2, C2 = (0.03 R)^2, mean of the SSIM map. Checked against
    scikit-image 0.26.0 on the three shapes of the test below: equal to 1e-15 (scikit-image is not a dependency)."""
    radius = int(3.5 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    window = np.outer(taps, taps) / taps.sum() ** 2
    k = 2 * radius + 1

    def local(a: np.ndarray) -> np.ndarray:
        h, w = a.shape[0] - k + 1, a.shape[1] - k + 1
        return np.array([[(a[i:i + k, j:j + k] * window).sum() for j in range(w)] for i in range(h)])

    ux, uy = local(x), local(y)
    vx, vy, vxy = local(x * x) - ux ** 2, local(y * y) - uy ** 2, local(x * y) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


@pytest.mark.parametrize("shape", [(24, 20), (11, 11), (40, 33)])
def test_ssim_matches_scikit_images_definition(shape) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, *shape, generator=gen, dtype=torch.float64)
    y = (0.6 * x + 0.4 * torch.rand(1, *shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    assert metrics.ssim(x, y).item() == pytest.approx(_skimage_ssim(x[0].numpy(), y[0].numpy()), abs=1e-9)
    assert metrics.ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)


def test_fidelity_keys_and_values() -> None:
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand(3, 12, 12, generator=gen), torch.rand(3, 12, 12, generator=gen)
    out = metrics.fidelity(x, y)
    assert set(out) == {"l1", "r", "ssim"}
    torch.testing.assert_close(out["l1"], metrics.l1(x, y))
    torch.testing.assert_close(out["r"], metrics.pearson(x, y))
    torch.testing.assert_close(out["ssim"], metrics.ssim(x, y))


# ---------------------------------------------------------------------------------------------
# Bootstrap intervals
# ---------------------------------------------------------------------------------------------


def test_bootstrap_ci_hand_checked_small_vectors() -> None:
    # [0, 1]: a resampled mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4 -> the 2.5 % and 97.5 % points are 0, 1
    assert metrics.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    # [0, 0, 0, 1]: the mean is k/4, k ~ Binomial(4, 1/4): P(k = 0) = 0.32 > 2.5 %, P(k <= 2) = 0.949 < 97.5 % <
    # P(k <= 3) = 0.996 -> [0, 0.75]; at level 0.5: P(k <= 1) = 0.738 < 75 % -> [0, 0.5]
    for seed in (0, 1, 2):
        assert metrics.bootstrap_ci([0.0, 0.0, 0.0, 1.0], seed=seed) == (0.0, 0.75)
    assert metrics.bootstrap_ci([0.0, 0.0, 0.0, 1.0], level=0.5) == (0.0, 0.5)
    # [1, 2, 3, 4]: the sum of 4 draws is <= 5 with p = 5/256 = 0.020 and <= 6 with p = 15/256 = 0.059, so the
    # 2.5 % point is a sum of 6 (mean 1.5) and, by symmetry, the 97.5 % point a sum of 14 (mean 3.5)
    assert metrics.bootstrap_ci([1.0, 2.0, 3.0, 4.0], seed=0) == (1.5, 3.5)


def test_bootstrap_ci_seeded_constant_nan_and_empty() -> None:
    values = np.random.default_rng(5).normal(0.5, 0.2, 30)
    assert metrics.bootstrap_ci(values, seed=3) == metrics.bootstrap_ci(values, seed=3)
    assert metrics.bootstrap_ci(values, seed=3) != metrics.bootstrap_ci(values, seed=4)
    # the documented algorithm: 2000 resamples of the indices from numpy's default_rng(seed), percentile points
    idx = np.random.default_rng(3).integers(0, 30, size=(2000, 30))
    assert metrics.bootstrap_ci(values, seed=3) == tuple(np.quantile(values[idx].mean(1), [0.025, 0.975]))
    assert metrics.bootstrap_ci(torch.tensor(values)) == metrics.bootstrap_ci(values)
    assert metrics.bootstrap_ci([0.25] * 7) == (0.25, 0.25)  # no spread, no interval width
    assert metrics.bootstrap_ci([2.0, math.nan, 4.0], seed=1) == metrics.bootstrap_ci([2.0, 4.0], seed=1)
    assert all(math.isnan(x) for x in metrics.bootstrap_ci([]))
    assert all(math.isnan(x) for x in metrics.bootstrap_ci([math.nan, math.inf]))


def test_inference_scores_carry_intervals_and_a_paired_margin() -> None:
    """scores.build_metrics (an inference run's metrics.json): every mean with its `<score>_ci95`; the margin over the
    best baseline is paired per image, so a constant difference has the interval [d, d]."""
    gan = np.array([[0.1, 0.9, np.nan], [0.2, 0.7, np.nan], [0.3, 0.8, np.nan]])  # L1, r, SSIM (NaN: tiny maps)
    scores_ = {"gan": gan, "mean_prior": gan + np.array([0.25, -0.5, np.nan])}
    chosen = {"best_baseline": "mean_prior", "chosen_on": None, "best_prior_index": None, "image_inverted": None,
              "val_r": None, "priors": []}
    m = scores.build_metrics(scores_, chosen, [{"index": i} for i in range(3)], {})
    g = m["mean"]["gan"]
    assert g["l1"] == 0.2 and g["r"] == 0.8 and g["ssim"] is None and g["ssim_ci95"] == [None, None]
    assert g["l1_ci95"] == [pytest.approx(v, abs=1e-6) for v in metrics.bootstrap_ci(gan[:, 0])]
    assert m["margin"] == {"over": "mean_prior", "l1": -0.25, "l1_ci95": [-0.25, -0.25], "r": 0.5,
                           "r_ci95": [0.5, 0.5], "ssim": None, "ssim_ci95": [None, None]}
    text = scores.format_table(m)
    assert re.search(r"^GAN +0\.800 \[0\.\d{3}, 0\.\d{3}\] +0\.200 \[0\.\d{3}, 0\.\d{3}\] +-$", text, re.M)
    assert "GAN r - mean prior r: +0.500, 95% CI [0.500, 0.500]" in text
    assert "GAN L1 - mean prior L1: -0.250 [-0.250, -0.250]" in text


# ---------------------------------------------------------------------------------------------
# Faithfulness
# ---------------------------------------------------------------------------------------------

# Pixel weights of the stub classifier over a 2x2 image in raster order.
WEIGHTS = torch.tensor([0.4, 0.2, 0.1, 0.0])
# Map A ranks pixels 0 (0.9), then the tie 2, 3 (0.5; index order), then 1 (0.1).
MAP_A = torch.tensor([[0.9, 0.1], [0.5, 0.5]])


class LinearProb(nn.Module):
    """Stub classifier: P(class 1) = s = 0.1 + sum_p WEIGHTS_p * mean_c x[c, p], P(class 0) = 1 - s."""

    def forward(self, x: Tensor) -> Tensor:
        s = 0.1 + (x.mean(1).flatten(1) * WEIGHTS).sum(1)
        return torch.stack([1 - s, s], 1).log()  # softmax(log p) = p


def test_class_probs_per_image_class_and_chunking() -> None:
    inputs = torch.stack([torch.ones(3, 2, 2), torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    # ones -> s = 0.1 + 0.7 = 0.8; zeros -> s = 0.1; class 0 gets 1 - s
    expected = torch.tensor([0.8, 0.1, 0.2])
    torch.testing.assert_close(metrics.class_probs(LinearProb(), inputs, [1, 1, 0]), expected)
    chunked = metrics.class_probs(LinearProb(), inputs, torch.tensor([1, 1, 0]), batch_size=2)
    torch.testing.assert_close(chunked, expected)
    with pytest.raises(ValueError):
        metrics.class_probs(LinearProb(), inputs, [1, 0])


def test_explanation_masked_hand_computed() -> None:
    inputs = torch.full((1, 3, 2, 2), 2.0)
    m = torch.tensor([[[1.0, 0.0], [0.5, 0.25]]])
    # baseline (0, 1, -1): ch0 = 2m = (2, 0, 1, .5); ch1 = 2m + (1 - m) = m + 1 = (2, 1, 1.5, 1.25);
    # ch2 = 2m - (1 - m) = 3m - 1 = (2, -1, .5, -.25)
    expected = torch.tensor([[2.0, 0.0, 1.0, 0.5], [2.0, 1.0, 1.5, 1.25], [2.0, -1.0, 0.5, -0.25]])
    expected = expected.view(1, 3, 2, 2)
    torch.testing.assert_close(metrics.explanation_masked(inputs, m, torch.tensor([0.0, 1.0, -1.0])), expected)
    torch.testing.assert_close(metrics.explanation_masked(inputs, m[:, None]), 2 * m[:, None].expand(1, 3, 2, 2))


def test_average_drop_and_increase_in_confidence_hand_computed() -> None:
    p_orig = torch.tensor([0.8, 0.5, 0.4, 0.0])
    p_expl = torch.tensor([0.4, 0.6, 0.4, 0.3])
    # drops: (0.8-0.4)/0.8 = 0.5, 0 (increase), 0 (equal), 0 (p_orig = 0 contributes 0) -> 100 * 0.5 / 4
    assert metrics.average_drop(p_orig, p_expl) == pytest.approx(12.5)
    # increases: F, T, F (equal is not an increase), T -> 100 * 2 / 4
    assert metrics.increase_in_confidence(p_orig, p_expl) == pytest.approx(50.0)


def test_average_drop_end_to_end_with_stub_model() -> None:
    model, inputs = LinearProb(), torch.ones(1, 3, 2, 2)
    p_orig = metrics.class_probs(model, inputs, [1])
    p_expl = metrics.class_probs(model, metrics.explanation_masked(inputs, MAP_A[None]), [1])
    # masked image = map: s = 0.1 + .4*.9 + .2*.1 + .1*.5 + 0 = 0.53; drop = (0.8 - 0.53) / 0.8 = 0.3375
    assert metrics.average_drop(p_orig, p_expl) == pytest.approx(33.75, abs=1e-4)
    assert metrics.increase_in_confidence(p_orig, p_expl) == 0.0


def test_deletion_insertion_auc_hand_computed_mixed_batch() -> None:
    inputs = torch.ones(3, 3, 2, 2)
    maps = torch.stack([MAP_A, torch.zeros(2, 2), MAP_A])
    dele, ins = metrics.deletion_insertion_auc(LinearProb(), inputs, maps, [1, 1, 0], steps=4, batch_size=2)
    # sample 0, order 0, 2, 3, 1; removing pixel p subtracts WEIGHTS_p from s = 0.8 (baseline 0 -> s = 0.1)
    #   deletion  0.8, 0.4, 0.3, 0.3, 0.1 -> 0.25 * (0.6 + 0.35 + 0.3 + 0.2) = 0.3625
    #   insertion 0.1, 0.5, 0.6, 0.6, 0.8 -> 0.25 * (0.3 + 0.55 + 0.6 + 0.7) = 0.5375
    #   (the reversed tie order 0, 3, 2, 1 would give deletion 0.8, 0.4, 0.4, 0.3, 0.1 -> 0.375)
    # sample 1, zero map: all tie, raster order 0, 1, 2, 3
    #   deletion  0.8, 0.4, 0.2, 0.1, 0.1 -> 0.25 * (0.6 + 0.3 + 0.15 + 0.1) = 0.2875
    #   insertion 0.1, 0.5, 0.7, 0.8, 0.8 -> 0.25 * (0.3 + 0.6 + 0.75 + 0.8) = 0.6125
    # sample 2, class 0: prob is 1 - s so the AUCs are 1 - 0.3625 and 1 - 0.5375
    torch.testing.assert_close(dele, torch.tensor([0.3625, 0.2875, 0.6375]))
    torch.testing.assert_close(ins, torch.tensor([0.5375, 0.6125, 0.4625]))


def test_deletion_insertion_auc_baselines() -> None:
    inputs = torch.ones(1, 3, 2, 2)
    half = torch.full((3,), 0.5)
    dele, ins = metrics.deletion_insertion_auc(LinearProb(), inputs, MAP_A[None], [1], steps=4, baseline=half)
    # baseline 0.5 halves each removed weight: deletion 0.8, 0.6, 0.55, 0.55, 0.45 ->
    #   0.25 * (0.7 + 0.575 + 0.55 + 0.5) = 0.58125; insertion starts at s = 0.1 + 0.35 = 0.45:
    #   0.45, 0.65, 0.7, 0.7, 0.8 -> 0.25 * (0.55 + 0.675 + 0.7 + 0.75) = 0.66875
    torch.testing.assert_close(dele, torch.tensor([0.58125]))
    torch.testing.assert_close(ins, torch.tensor([0.66875]))
    # a per-sample baseline equal to the image: nothing changes, both curves sit at 0.8
    same = inputs.clone()
    dele, ins = metrics.deletion_insertion_auc(LinearProb(), inputs, MAP_A[None], [1], steps=4, baseline=same)
    torch.testing.assert_close(dele, torch.tensor([0.8]))
    torch.testing.assert_close(ins, torch.tensor([0.8]))


def test_deletion_auc_when_steps_do_not_divide_pixels() -> None:
    inputs = torch.ones(1, 3, 2, 2)
    dele, _ = metrics.deletion_insertion_auc(LinearProb(), inputs, MAP_A[None], [1], steps=3)
    # n_k = round(4k/3) = 0, 1, 3, 4 pixels at x = 0, .25, .75, 1; probs 0.8, 0.4, 0.3, 0.1
    # trapezoid: .25 * 1.2/2 + .5 * .7/2 + .25 * .4/2 = 0.15 + 0.175 + 0.05 = 0.375
    torch.testing.assert_close(dele, torch.tensor([0.375]))
    dele, ins = metrics.deletion_insertion_auc(LinearProb(), inputs, MAP_A[None], [1], steps=1)
    # two points: (0.8 + 0.1) / 2 and (0.1 + 0.8) / 2
    torch.testing.assert_close(dele, torch.tensor([0.45]))
    torch.testing.assert_close(ins, torch.tensor([0.45]))


class BlobLogit(nn.Module):
    """Stub classifier on 8x8 images: class-1 logit = 8 * (mean pixel - 0.2), class-0 logit = 0."""

    def forward(self, x: Tensor) -> Tensor:
        z = 8 * (x.mean(dim=(1, 2, 3)) - 0.2)
        return torch.stack([torch.zeros_like(z), z], 1)


def _blob_batch() -> tuple[Tensor, Tensor]:
    """Two 8x8 images with a bright Gaussian blob; their relevance for BlobLogit is the image itself."""
    r = torch.arange(8.0)
    blobs = []
    for cy, cx in [(2.5, 3.0), (5.0, 4.5)]:
        blobs.append(torch.exp(-((r[:, None] - cy) ** 2 + (r[None, :] - cx) ** 2) / (2 * 1.5**2)))
    maps = torch.stack(blobs)
    return maps[:, None].expand(2, 3, 8, 8).contiguous(), maps


# grad-cam's own ROADCombined, called below for reference, warns under NumPy 2.
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")
def test_road_scores_finite_ordered_and_seeded() -> None:
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, (inputs, maps) = BlobLogit(), _blob_batch()
    pct = (20, 50, 80)
    state = torch.get_rng_state()
    out = metrics.road_scores(model, inputs, maps, [1, 1], percentiles=pct, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the seeded run leaves the global generator alone
    assert set(out) == {"combined", "morf", "lerf"}
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in out.values())
    # true relevance: removing the blob first hurts more than removing the background first
    assert (out["morf"] < 0).all() and (out["morf"] < out["lerf"]).all()
    torch.testing.assert_close(out["combined"], (out["lerf"] - out["morf"]) / 2)
    # the inverted map ranks the background first, so its combined score is worse
    inverted = metrics.road_scores(model, inputs, 1 - maps, [1, 1], percentiles=pct, seed=0)
    assert (inverted["combined"] < out["combined"]).all()
    # same seed, same order of imputations -> ROADCombined's own numbers
    torch.manual_seed(0)
    ref = ROADCombined(list(pct))(inputs, maps.numpy(), [ClassifierOutputSoftmaxTarget(1)] * 2, model)
    torch.testing.assert_close(out["combined"], torch.as_tensor(ref, dtype=torch.float32))
    again = metrics.road_scores(model, inputs, maps, [1, 1], percentiles=pct, seed=0)
    torch.testing.assert_close(again["combined"], out["combined"], rtol=0, atol=0)
    # a constant map orders nothing: both orders impute the whole image, combined ~ 0 (noise only)
    flat = metrics.road_scores(model, inputs, torch.zeros_like(maps), [1, 1], percentiles=pct, seed=0)
    assert torch.isfinite(flat["combined"]).all() and (flat["combined"].abs() < 1e-3).all()


# ---------------------------------------------------------------------------------------------
# Localisation
# ---------------------------------------------------------------------------------------------


def test_pointing_game_hits_ties_and_edge_cases() -> None:
    maps = torch.zeros(5, 3, 3)
    masks = torch.zeros(5, 3, 3)
    maps[0, 0, 2] = 1.0
    masks[0, 0, 2] = 1  # max on the mask -> hit
    maps[1, 2, 2] = 1.0
    masks[1, 0, 0] = 1  # max at (2, 2), mask at (0, 0) -> miss
    maps[2, 0, 1] = maps[2, 2, 2] = 1.0
    masks[2, 2, 2] = 1  # tie: first in raster order is (0, 1), off the mask -> miss
    masks[3, 0, 0] = 1  # zero map points at (0, 0) -> hit
    maps[4, 1, 1] = 1.0  # empty mask -> miss
    torch.testing.assert_close(metrics.pointing_game(maps, masks), torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]))
    hits = metrics.pointing_game(maps[:, None], masks.bool())
    torch.testing.assert_close(hits, torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]))


def test_pointing_game_tolerance_is_euclidean() -> None:
    m = torch.zeros(1, 3, 3)
    m[0, 1, 1] = 1.0
    diag = torch.zeros(1, 3, 3)
    diag[0, 0, 0] = 1  # distance sqrt(2) from (1, 1)
    side = torch.zeros(1, 3, 3)
    side[0, 0, 1] = 1  # distance 1
    assert metrics.pointing_game(m, diag, tolerance=1).item() == 0.0
    assert metrics.pointing_game(m, diag, tolerance=2).item() == 1.0
    assert metrics.pointing_game(m, side, tolerance=0).item() == 0.0
    assert metrics.pointing_game(m, side, tolerance=1).item() == 1.0


def test_energy_pointing_game_hand_computed() -> None:
    maps = torch.stack([torch.tensor([[0.5, 0.25], [0.25, 0.0]]), torch.zeros(2, 2), torch.full((2, 2), 0.3)])
    masks = torch.tensor([[[1, 0], [0, 1]], [[1, 1], [1, 1]], [[0, 1], [0, 0]]]).bool()
    # 0: inside 0.5 + 0 of total 1.0 -> 0.5;  1: zero map -> 0;  2: uniform, one pixel of four -> 0.25
    torch.testing.assert_close(metrics.energy_pointing_game(maps, masks), torch.tensor([0.5, 0.0, 0.25]))
