"""Image-conditioned PatchGAN discriminator returning logits (no sigmoid: pair with BCEWithLogitsLoss)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

__all__ = ["D_SLOPE", "PatchDiscriminator"]

D_SLOPE = 0.2


class PatchDiscriminator(nn.Module):
    """(image, map) -> patch logits (B, 1, S / 2**n_layers, S / 2**n_layers)."""

    def __init__(self, in_channels: int = 4, width: int = 64, n_layers: int = 3, spectral_norm: bool = True) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")

        def conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Module:
            layer = nn.Conv2d(cin, cout, kernel, stride=stride, padding=1)
            return _spectral_norm(layer) if spectral_norm else layer

        # k4 s2 p1 halves the size exactly; the stride-1 layers use k3 p1 (size kept, unlike pix2pix's k4)
        # so that small maps (16x16) still give a patch grid.
        layers: list[nn.Module] = []
        cin = in_channels
        for i in range(n_layers):
            cout = width * min(2**i, 8)
            layers += [conv(cin, cout, 4, 2), nn.LeakyReLU(D_SLOPE, inplace=True)]
            cin = cout
        cout = width * min(2**n_layers, 8)
        layers += [conv(cin, cout, 3, 1), nn.LeakyReLU(D_SLOPE, inplace=True), conv(cout, 1, 3, 1)]
        self.body = nn.Sequential(*layers)
        self.to(memory_format=torch.channels_last)

    def forward(self, image: Tensor, map_: Tensor) -> Tensor:
        """Image (B, 3, S, S) and map (B, 1, S, S), both in [0, 1] -> patch logits (B, 1, h, w)."""
        x = torch.cat([image, map_], dim=1).to(memory_format=torch.channels_last)
        return self.body(x * 2.0 - 1.0)
