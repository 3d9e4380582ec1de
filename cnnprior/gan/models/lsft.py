"""LSFT generator: one condition per prior, consumed in order by the SFT blocks of the trunk."""

from __future__ import annotations

import torch
from torch import Tensor

from cnnprior.gan.models.sft import ResBlock, SFTGenerator, SFTResBlock

__all__ = ["LSFTGenerator", "plain_blocks_per_gap"]


def plain_blocks_per_gap(n_sft: int, n_plain: int) -> list[int]:
    """How many plain ResBlocks follow each SFT block: spread evenly over the gaps between them."""
    if n_sft == 1:
        return [n_plain]
    gaps = n_sft - 1
    counts = [n_plain // gaps + (1 if g < n_plain % gaps else 0) for g in range(gaps)]
    return counts + [0]


class LSFTGenerator(SFTGenerator, name="lsft", order=10):
    """Layer-wise SFT generator (paper: 8 priors -> 8 SFT blocks interleaved with 7 plain blocks).

    Args:
        n_priors: priors per sample; one SFT block per prior.
        width: trunk channels (gan.width).
        n_plain: plain residual blocks spread between the SFT blocks (gan.depth).
        cond_channels, cond_hidden: the condition network's output and hidden channels (gan.cond_*).
    """

    def __init__(self, n_priors: int = 8, width: int = 64, n_plain: int = 7, cond_channels: int = 32,
                 cond_hidden: int = 128) -> None:
        # one condition network call per prior map
        super().__init__(n_priors, width, 1, n_plain=n_plain, cond_channels=cond_channels, cond_hidden=cond_hidden)
        for i, n_after in enumerate(plain_blocks_per_gap(n_priors, n_plain)):
            self.blocks.append(SFTResBlock(width, cond_channels, cond_index=i))
            for _ in range(n_after):
                self.blocks.append(ResBlock(width))
        self.to(memory_format=torch.channels_last)

    depth_arg = "n_plain"  # gan.depth: the plain residual blocks

    def conditions(self, priors: Tensor) -> Tensor:
        """Priors (B, n, S, S) -> stacked conditions (n, B, C, S, S) from ONE CondNet call on n*B maps."""
        self.check_priors(priors)
        b, n, s, t = priors.shape
        # Prior-major order makes each condition cond[i] a contiguous slice of the CondNet output.
        flat = priors.transpose(0, 1).reshape(n * b, 1, s, t).to(memory_format=torch.channels_last)
        cond = self.cond_net(flat)
        return cond.view(n, b, *cond.shape[1:])

    def forward_per_sample_loop(self, image: Tensor, priors: Tensor) -> Tensor:
        """Reference only (tests, bench): the released code's CondNet call per sample per prior."""
        self.check_priors(priors)
        b, n = priors.shape[:2]
        cond = torch.cat([self.cond_net(priors[j : j + 1, i : i + 1]) for i in range(n) for j in range(b)])
        return self.decode(image, cond.view(n, b, *cond.shape[1:]))
