"""Batches of explanation maps (B, 1, H, W) in [0, 1]: resizing, blurring, min-max rescaling, and the maps the
evaluation compares besides the stored ones: a generator's maps and seeded random maps."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

__all__ = ["blur", "generate", "random_maps", "rescale", "resize_maps"]


def resize_maps(x: Tensor, size: int) -> Tensor:
    """Bilinear resize (align_corners=False) of (B, C, H, W) to size x size; identity when already that size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1]).clamp(0, 1)


def blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of (B, C, H, W) by `sigma` pixels (reflect padding; the kernel is cut to fit the image)."""
    size = min(x.shape[-2:])
    k = min(2 * math.ceil(3 * sigma) + 1, size - (size + 1) % 2)  # odd, and reflect padding needs k//2 < size
    return gaussian_blur(x, [k, k], [sigma, sigma]) if k > 1 else x


def rescale(maps: Tensor) -> Tensor:
    """Per-map min-max to [0, 1] (a constant map becomes 0)."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(maps)


def random_maps(count: int, size: int, seed: int) -> Tensor:
    """Seeded uniform noise (count, 1, size, size), Gaussian-blurred (sigma = size/16), min-max scaled."""
    noise = torch.rand(count, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return rescale(blur(noise, max(size / 16, 0.5)))


@torch.no_grad()
def generate(generator: Callable[[Tensor, Tensor], Tensor], image: Tensor, priors: Tensor, batch_size: int,
             device: torch.device) -> Tensor:
    """Generator maps (B, 1, S, S) on the CPU, computed batch by batch on `device`."""
    out = [generator(image[i:i + batch_size].to(device), priors[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(image), batch_size)]
    return torch.cat(out)
