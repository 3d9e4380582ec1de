"""The `linear` learned baseline: a per-pixel affine combination of the inputs, trained with L1 only."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LinearBaseline"]


class LinearBaseline(nn.Module):
    """map(x) = clamp(sum_k w_k prior_k(x) + sum_c v_c image_c(x) + b, 0, 1): one weight per input channel, shared
    by every pixel (a 1x1 convolution). Starts as the mean of the priors. A baseline, not a product: it tells what
    a learned re-weighting of the priors alone reaches.

    Args:
        n_priors: priors per sample.
        width, depth, cond_channels, cond_hidden: accepted for the registry's common signature; unused.
    """

    variant = "linear"

    def __init__(self, n_priors: int = 8, width: int = 0, depth: int = 0, **unused: Any) -> None:
        super().__init__()
        self.n_priors = n_priors
        self.mix = nn.Conv2d(n_priors + 3, 1, kernel_size=1)
        with torch.no_grad():
            self.mix.weight.zero_()
            self.mix.weight[0, :n_priors] = 1.0 / n_priors
            self.mix.bias.zero_()

    def config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild this model."""
        return {"n_priors": self.n_priors}

    def forward(self, image: Tensor, priors: Tensor) -> Tensor:
        """Image (B, 3, S, S) and priors (B, n, S, S) in [0, 1] -> map (B, 1, S, S) in [0, 1]."""
        if priors.dim() != 4 or priors.shape[1] != self.n_priors:
            raise ValueError(f"expected priors of shape (B, {self.n_priors}, H, W), got {tuple(priors.shape)}")
        return self.mix(torch.cat([priors, image], 1)).clamp(0, 1)
