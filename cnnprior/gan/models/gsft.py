"""GSFT generator: all priors -> one condition shared by every SFT block of the trunk."""

from __future__ import annotations

import torch
from torch import Tensor

from cnnprior.gan.models.sft import SFTGenerator, SFTLayer, SFTResBlock

__all__ = ["GSFTGenerator"]


class GSFTGenerator(SFTGenerator, name="gsft", order=20):
    """Global SFT generator (paper: 8 priors -> one 32-channel condition, 32 SFT blocks of width 64).

    Args:
        n_priors: priors per sample, read together by one condition network.
        width: trunk channels (gan.width).
        n_blocks: SFT residual blocks, all on the one condition (gan.depth).
        cond_channels, cond_hidden: the condition network's output and hidden channels (gan.cond_*).
    """

    def __init__(self, n_priors: int = 8, width: int = 64, n_blocks: int = 32, cond_channels: int = 32,
                 cond_hidden: int = 128) -> None:
        # one condition network call on all n priors together
        super().__init__(n_priors, width, n_priors, n_blocks=n_blocks, cond_channels=cond_channels,
                         cond_hidden=cond_hidden)
        for _ in range(n_blocks):
            self.blocks.append(SFTResBlock(width, cond_channels, cond_index=0))
        self.final_sft = SFTLayer(width, cond_channels)
        self.to(memory_format=torch.channels_last)

    depth_arg = "n_blocks"  # gan.depth: the SFT residual blocks

    def conditions(self, priors: Tensor) -> Tensor:
        """Priors (B, n, S, S) -> a stack of one condition (1, B, C, S, S)."""
        self.check_priors(priors)
        return self.cond_net(priors.to(memory_format=torch.channels_last)).unsqueeze(0)
