"""The `convnet` learned baseline: a small convolutional regressor (image, priors) -> map, trained with L1 only."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cnnprior.core.config import GANConfig
from cnnprior.core.errors import UserError
from cnnprior.gan.models.base import Generator

__all__ = ["ConvRegressor"]

KERNEL = 5


class ConvRegressor(Generator, name="convnet", adversarial=False, order=40):
    """`depth` 5x5 convolutions of `width` channels with ReLU, then a 5x5 convolution to one channel and a sigmoid,
    on the image (scaled to [-1, 1]) stacked with the priors: depth + 1 convolutions in all (4 at the default and
    shipped depth 3). The reviewer's question to a conditional GAN: does it beat a regressor this small trained on
    the same data?

    Args:
        n_priors: priors per sample.
        width: channels of the hidden convolutions.
        depth: hidden convolutions (>= 1), not counting the output convolution.
    """

    def __init__(self, n_priors: int = 8, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        if n_priors < 1 or width < 1 or depth < 1:
            raise ValueError(f"need n_priors, width, depth >= 1, got {n_priors}, {width}, {depth}")
        self.n_priors, self.width, self.depth = n_priors, width, depth
        layers: list[nn.Module] = []
        channels = n_priors + 3
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, KERNEL, padding=KERNEL // 2), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.Conv2d(channels, 1, KERNEL, padding=KERNEL // 2))
        self.body = nn.Sequential(*layers)
        self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, gan: GANConfig, n_priors: int) -> ConvRegressor:
        """gan.depth: the hidden 5x5 convolutions (>= 1; the output convolution comes on top); gan.width: their
        channels; gan.cond_*: unused."""
        if gan.depth < 1:
            raise UserError(f"gan.depth: the convnet baseline needs >= 1 hidden convolution, got {gan.depth}")
        return cls(n_priors, gan.width, gan.depth)

    def config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild this model."""
        return {"n_priors": self.n_priors, "width": self.width, "depth": self.depth}

    def forward(self, image: Tensor, priors: Tensor) -> Tensor:
        """Image (B, 3, S, S) and priors (B, n, S, S) in [0, 1] -> map (B, 1, S, S) in [0, 1]."""
        self.check_priors(priors)
        x = torch.cat([image * 2.0 - 1.0, priors], 1).contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(self.body(x))
