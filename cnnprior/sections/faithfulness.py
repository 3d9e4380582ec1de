"""Options of the existing `faithfulness` section (its code is still in cnnprior.evaluate)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from cnnprior.sections.base import option, register_options


@dataclass
class FaithfulnessOptions:
    """Options of the `faithfulness` section."""

    insertion: str = option("black", choices=("black", "blurred"),
                            help="insertion also starting from a blurred copy of the image, as RISE does (an extra "
                                 "column; deletion always goes to black)")
    blur_sigma: float = option(5.0, lo=0.1, hi=1000.0, help="blurred start: Gaussian sigma in pixels at the CNN's "
                                                            "input size (RISE: 5 at 224 px)")


register_options("faithfulness", FaithfulnessOptions)


def blurred_images(images: Tensor, sigma: float) -> Tensor:
    """(B, 3, R, R) images blurred by a Gaussian of `sigma` pixels (reflect padding): insertion's start."""
    from torchvision.transforms.functional import gaussian_blur

    size = min(images.shape[-2:])
    k = min(2 * math.ceil(3 * sigma) + 1, size - (size + 1) % 2)
    return gaussian_blur(images, [k, k], [sigma, sigma]) if k > 1 else images
