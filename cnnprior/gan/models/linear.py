"""The `linear` learned baseline: a per-pixel affine combination of the inputs, trained with L1 only."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cnnprior.core.config import GANConfig
from cnnprior.gan.models.base import Generator

__all__ = ["LinearBaseline"]


class LinearBaseline(Generator, name="linear", adversarial=False, order=30):
    """map(x) = clamp(sum_k w_k prior_k(x) + sum_c v_c image_c(x) + b, 0, 1): one weight per input channel, shared
    by every pixel (a 1x1 convolution). Starts as the mean of the priors. A baseline, not a product: it tells what
    a learned re-weighting of the priors alone reaches.

    Args:
        n_priors: priors per sample.
    """

    def __init__(self, n_priors: int = 8) -> None:
        super().__init__()
        self.n_priors = n_priors
        self.mix = nn.Conv2d(n_priors + 3, 1, kernel_size=1)
        with torch.no_grad():
            self.mix.weight.zero_()
            self.mix.weight[0, :n_priors] = 1.0 / n_priors
            self.mix.bias.zero_()

    @classmethod
    def from_config(cls, gan: GANConfig, n_priors: int) -> LinearBaseline:
        """gan.depth, gan.width and gan.cond_*: unused (one weight per input channel)."""
        return cls(n_priors)

    def config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild this model."""
        return {"n_priors": self.n_priors}

    def forward(self, image: Tensor, priors: Tensor) -> Tensor:
        """Image (B, 3, S, S) and priors (B, n, S, S) in [0, 1] -> map (B, 1, S, S) in [0, 1]."""
        self.check_priors(priors)
        return self.mix(torch.cat([priors, image], 1)).clamp(0, 1)
