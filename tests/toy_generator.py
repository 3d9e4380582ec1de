"""A generator in one file (docs/development.md, "Add a generator"): registered as "toy" when imported."""

import torch
from torch import nn

from cnnprior.gan.models import Generator

__all__ = ["ToyGenerator"]


class ToyGenerator(Generator, name="toy"):
    """sigmoid(1x1 convolution of the image and the priors). gan.depth, gan.width: unused."""

    def __init__(self, n_priors: int = 8) -> None:
        super().__init__()
        self.n_priors = n_priors
        self.mix = nn.Conv2d(3 + n_priors, 1, kernel_size=1)

    @classmethod
    def from_config(cls, gan, n_priors):
        return cls(n_priors)

    def config(self):
        return {"n_priors": self.n_priors}

    def forward(self, image, priors):
        return torch.sigmoid(self.mix(torch.cat([image, priors], 1)))
