"""Generators (LSFT, GSFT), their shared SFT parts, and the PatchGAN discriminator."""

from __future__ import annotations

from torch import nn

from cnnprior.models.discriminator import PatchDiscriminator
from cnnprior.models.gsft import GSFTGenerator
from cnnprior.models.lsft import LSFTGenerator
from cnnprior.models.sft import SFTGenerator

VARIANTS = ("lsft", "gsft")

__all__ = [
    "VARIANTS",
    "GSFTGenerator",
    "LSFTGenerator",
    "PatchDiscriminator",
    "SFTGenerator",
    "build_discriminator",
    "build_generator",
]


def build_generator(
    variant: str, n_priors: int, width: int, depth: int, cond_channels: int, cond_hidden: int
) -> SFTGenerator:
    """Build a generator; depth = n_blocks for gsft, n_plain for lsft."""
    if variant == "lsft":
        return LSFTGenerator(n_priors, width, n_plain=depth, cond_channels=cond_channels, cond_hidden=cond_hidden)
    if variant == "gsft":
        return GSFTGenerator(n_priors, width, n_blocks=depth, cond_channels=cond_channels, cond_hidden=cond_hidden)
    raise ValueError(f"unknown generator variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def build_discriminator(width: int = 64, n_layers: int = 3) -> nn.Module:
    """Build the image-conditioned PatchGAN discriminator (4 input channels: RGB + map)."""
    return PatchDiscriminator(4, width, n_layers)
