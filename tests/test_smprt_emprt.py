"""Tests for cnnprior.evaluate.smprt_emprt: sMPRT's noisy copies and smoothed maps, eMPRT's histogram entropy and
complexity-rise score (Quantus' definitions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cnnprior.evaluate.smprt_emprt import (
    complexity_ratio,
    discrete_entropy,
    emprt_score,
    noisy_copies,
    noisy_copy,
    normalise_by_max,
    smoothed,
)


def _images(b: int = 3, size: int = 64) -> torch.Tensor:
    """(b, 3, size, size) images with different value ranges per sample (range of image i: i + 1)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, size, size, generator=gen)
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0  # exact range [0, 1] before scaling
    return x * torch.arange(1, b + 1, dtype=torch.float32).view(-1, 1, 1, 1) - 0.5


def test_noisy_copies_statistics():
    x = _images()
    copies = noisy_copies(x, n=9, magnitude=0.1, seed=3)
    assert copies.shape == (9, *x.shape) and copies.dtype == x.dtype
    assert torch.equal(copies[-1], x)  # the last copy is the clean input (Quantus: zero noise for the last)
    noise = (copies[:-1] - x).double()
    for b in range(x.shape[0]):
        expected = 0.1 * (b + 1)  # magnitude × (max − min) of image b
        assert abs(float(noise[:, b].std()) / expected - 1) < 0.01, b
        assert abs(float(noise[:, b].mean())) < 0.01 * expected, b
        # the mean of the 8 noisy copies is the image plus noise of std expected / sqrt(8)
        assert abs(float(noise[:, b].mean(0).std()) / (expected / 8**0.5) - 1) < 0.02, b


def test_noisy_copies_deterministic_and_seeded():
    x = _images(2, 16)
    a, b = noisy_copies(x, 4, 0.2, seed=1), noisy_copies(x, 4, 0.2, seed=1)
    assert torch.equal(a, b)
    torch.manual_seed(123)  # the caller's RNG state plays no part
    assert torch.equal(noisy_copy(x, 2, 4, 0.2, seed=1), a[2])
    assert not torch.equal(noisy_copies(x, 4, 0.2, seed=2)[0], a[0])
    assert not torch.equal(a[0], a[1])  # copies differ from each other
    assert torch.equal(noisy_copies(x, 4, 0.0, seed=1)[0], x)  # magnitude 0: no noise
    with pytest.raises(ValueError, match="0..3"):
        noisy_copy(x, 4, 4, 0.1, 0)


def test_smoothed_constant_maps_fn_returns_its_map_exactly():
    x = _images(2, 8)
    fixed = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    out = smoothed(lambda imgs: {"m": fixed.clone(), "h": fixed.half()}, x, n=7, magnitude=0.1, seed=0)
    assert torch.equal(out["m"], fixed) and out["h"].dtype == torch.float16 and torch.equal(out["h"], fixed.half())


def test_smoothed_averages_over_the_noisy_copies():
    x = _images(2, 8)
    out = smoothed(lambda imgs: {"id": imgs[:, :1]}, x, n=5, magnitude=0.3, seed=4)
    expected = noisy_copies(x, 5, 0.3, seed=4)[:, :, :1].double().mean(0).float()
    assert torch.allclose(out["id"], expected, atol=1e-6)
    assert not torch.allclose(out["id"], x[:, :1], atol=1e-3)  # the noise is there, and averaged


def test_normalise_by_max_per_sample():
    m = torch.tensor([[[[1.0, -4.0]]], [[[0.0, 0.0]]], [[[0.5, 0.25]]]])
    out = normalise_by_max(m)
    assert torch.equal(out, torch.tensor([[[[0.25, -1.0]]], [[[0.0, 0.0]]], [[[1.0, 0.5]]]]))


def test_discrete_entropy_constant_and_uniform():
    const = torch.full((1, 1, 8, 8), 0.3)
    assert float(discrete_entropy(const, n_bins=10)[0]) == 0.0
    uniform = torch.arange(100, dtype=torch.float64).view(1, 1, 10, 10)  # 100 values, 10 per bin
    assert math.isclose(float(discrete_entropy(uniform, n_bins=10)[0]), math.log(10), rel_tol=1e-12)
    two = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # counts (3, 0, ..., 0, 1)
    assert math.isclose(float(discrete_entropy(two, 5)[0]), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    bad = torch.tensor([[0.0, math.nan], [0.0, 1.0]])
    h = discrete_entropy(bad, 4)
    assert math.isnan(float(h[0])) and math.isclose(float(h[1]), math.log(2))


def test_discrete_entropy_matches_quantus_formula():
    stats = pytest.importorskip("scipy.stats")
    maps = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2)) ** 3
    ours = discrete_entropy(maps, n_bins=37)
    for i in range(4):  # Quantus: scipy.stats.entropy(pk=np.histogram(a, bins=n_bins)[0])
        ref = stats.entropy(pk=np.histogram(maps[i].numpy(), bins=37)[0])
        assert math.isclose(float(ours[i]), float(ref), rel_tol=1e-12), i


def test_emprt_score_and_ratio():
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / 20).view(1, 1, 32, 32)  # mostly ~0: low entropy
    trained = blob.repeat(2, 1, 1, 1)
    random = torch.rand(2, 1, 32, 32, generator=gen)  # flat histogram: high entropy
    score, ratio = emprt_score(trained, random), complexity_ratio(trained, random)
    h_t, h_r = discrete_entropy(trained), discrete_entropy(random)
    assert torch.all(h_r > h_t) and torch.all(score > 0) and torch.all(ratio > 1)
    assert torch.allclose(score, (h_r - h_t) / h_t) and torch.allclose(ratio, score + 1)
    assert torch.all(emprt_score(random, trained) < 0)  # less complex after randomisation: negative
    assert torch.allclose(emprt_score(trained, trained), torch.zeros(2, dtype=torch.float64))


def test_emprt_nan_where_undefined():
    const = torch.zeros(3, 1, 8, 8)
    noisy = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.isnan(emprt_score(const, noisy)).all() and torch.isnan(complexity_ratio(const, noisy)).all()
    noisy_nan = noisy.clone()
    noisy_nan[1, 0, 0, 0] = math.nan
    s = emprt_score(noisy, noisy_nan)
    assert torch.isnan(s[1]) and torch.isfinite(s[[0, 2]]).all()
    with pytest.raises(ValueError, match="shape"):
        emprt_score(noisy, noisy[:2])
