"""Generators (LSFT, GSFT), their shared SFT parts, the learned baselines (linear, convnet: L1-trained regressors
in linear.py, convnet.py), and the PatchGAN discriminator."""

from __future__ import annotations

from torch import nn

from cnnprior.core import generators
from cnnprior.gan.models.discriminator import PatchDiscriminator
from cnnprior.gan.models.gsft import GSFTGenerator
from cnnprior.gan.models.lsft import LSFTGenerator
from cnnprior.gan.models.sft import SFTGenerator

__all__ = [
    "GSFTGenerator",
    "LSFTGenerator",
    "PatchDiscriminator",
    "SFTGenerator",
    "build_discriminator",
    "build_generator",
]


def build_generator(
    variant: str, n_priors: int, width: int, depth: int, cond_channels: int, cond_hidden: int
) -> nn.Module:
    """Build a generator of a registered variant (cnnprior.core.generators); depth sets the variant's depth argument
    (lsft: n_plain, gsft: n_blocks, convnet: hidden convs, linear: unused)."""
    if variant not in generators.VARIANTS:
        raise ValueError(f"unknown generator variant {variant!r}; choose one of {', '.join(generators.ALL)}")
    v = generators.VARIANTS[variant]
    return v.generator_class()(n_priors, width, **{v.depth_arg: depth}, cond_channels=cond_channels,
                               cond_hidden=cond_hidden)


def build_discriminator(width: int = 64, n_layers: int = 3) -> nn.Module:
    """Build the image-conditioned PatchGAN discriminator (4 input channels: RGB + map)."""
    return PatchDiscriminator(4, width, n_layers)
