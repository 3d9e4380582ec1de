"""Generators by name (base.py: the contract and the registry), their modules (lsft, gsft and their shared SFT parts
in sft.py; the learned baselines linear and convnet: L1-trained regressors), and the PatchGAN discriminator.
A new generator is one module here defining one `Generator` subclass with a `name`."""

from __future__ import annotations

from torch import nn

from cnnprior.core.config import GANConfig
from cnnprior.gan.models.base import DEFAULT, Generator, get, names
from cnnprior.gan.models.discriminator import PatchDiscriminator
from cnnprior.gan.models.gsft import GSFTGenerator
from cnnprior.gan.models.lsft import LSFTGenerator
from cnnprior.gan.models.sft import SFTGenerator

__all__ = [
    "build_discriminator",
    "build_generator",
    "DEFAULT",
    "Generator",
    "get",
    "GSFTGenerator",
    "LSFTGenerator",
    "names",
    "PatchDiscriminator",
    "SFTGenerator",
]


def build_generator(
    variant: str, n_priors: int, width: int, depth: int, cond_channels: int, cond_hidden: int
) -> Generator:
    """The registered generator `variant` as `from_config` builds it from these gan.* values (each generator's
    docstring says what depth sets)."""
    gan = GANConfig(variant=variant, width=width, depth=depth, cond_channels=cond_channels, cond_hidden=cond_hidden)
    return get(variant).from_config(gan, n_priors)


def build_discriminator(width: int = 64, n_layers: int = 3) -> nn.Module:
    """Build the image-conditioned PatchGAN discriminator (4 input channels: RGB + map)."""
    return PatchDiscriminator(4, width, n_layers)
