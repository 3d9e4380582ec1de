"""Shared generator parts: SFT layer, condition network, residual blocks and the generator base."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cnnprior.core.config import GANConfig
from cnnprior.gan.models.base import Generator

__all__ = [
    "chunk_bounds", "Cond", "CondNet", "conv1x1", "conv3x3", "CPU_CHUNK_BYTES_PER_THREAD", "inference_rows",
    "Pair", "pick_condition", "ResBlock", "SFT_SLOPE", "SFTGenerator", "SFTLayer", "SFTResBlock"
]

# A (features, cond) pair travels through the trunk so blocks compose in nn.Sequential (SFTGAN style).
# cond is one condition (B, C, S, S), or a tuple of k of them from which each block picks its own: a
# tuple rather than a stacked tensor, since indexing a tensor costs a full-stack zero fill per block in
# the backward pass.
Cond = Tensor | Sequence[Tensor]
Pair = tuple[Tensor, Cond]

SFT_SLOPE = 0.1

# CPU inference runs big batches in chunks of about this many bytes per thread for the widest activation
# (about one core's L2): measured here, CondNet on 256 64x64 maps took 1.4 s in 2 MiB chunks against
# 2.4 s in one piece (1 thread), and past glibc's mmap threshold (at most 32 MiB) every op page-faults
# its output afresh. Training (grad enabled) and GPUs always take the whole batch.
CPU_CHUNK_BYTES_PER_THREAD = 2 << 20


def inference_rows(x: Tensor, channels: int) -> int:
    """Rows of x per chunk for a (rows, channels, H, W) float activation; all rows unless CPU inference."""
    if torch.is_grad_enabled() or x.device.type != "cpu":
        return x.shape[0]
    budget = CPU_CHUNK_BYTES_PER_THREAD * torch.get_num_threads()
    return max(1, budget // (4 * channels * x.shape[-2] * x.shape[-1]))


def chunk_bounds(total: int, rows: int) -> list[tuple[int, int]]:
    """(start, stop) of about equal chunks of at most `rows` rows covering range(total)."""
    if total <= 0:
        return [(0, 0)]
    n_chunks = -(-total // max(1, rows))
    step = -(-total // max(1, n_chunks))
    return [(i, min(i + step, total)) for i in range(0, total, step)]


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 stride-1 convolution with explicit padding 1 (output size = input size)."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_channels, out_channels, 1)


def pick_condition(cond: Cond, index: int | None) -> Tensor:
    """The condition a block uses: the single one (index None) or entry `index` of a tuple."""
    if index is None:
        assert isinstance(cond, Tensor), "a block without cond_index needs a single condition tensor"
        return cond
    return cond[index]


class SFTLayer(nn.Module):
    """Spatial feature transform: out = x * (scale + 1) + shift, scale and shift predicted from cond."""

    def __init__(self, channels: int, cond_channels: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.scale = nn.Sequential(
            conv1x1(cond_channels, hidden), nn.LeakyReLU(SFT_SLOPE, inplace=True), conv1x1(hidden, channels)
        )
        self.shift = nn.Sequential(
            conv1x1(cond_channels, hidden), nn.LeakyReLU(SFT_SLOPE, inplace=True), conv1x1(hidden, channels)
        )

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """Modulate x (B, channels, H, W) by cond (B, cond_channels, H, W)."""
        hidden_conv, act, out = self.scale
        # The "+ 1" rides on the conv bias (a vector) instead of a pass over the full feature map.
        scale_plus_one = F.conv2d(act(hidden_conv(cond)), out.weight, out.bias + 1.0)
        # In place on a fresh conv output: conv backward does not need its own output.
        return self.shift(cond).addcmul_(x, scale_plus_one)


class CondNet(nn.Module):
    """Condition network: priors (B, in_channels, S, S) -> condition (B, cond_channels, S, S)."""

    def __init__(self, in_channels: int, cond_channels: int = 32, hidden: int = 128) -> None:
        super().__init__()
        # The paper uses a k4 'same' conv; an odd kernel keeps the padding symmetric.
        layers: list[nn.Module] = [conv3x3(in_channels, hidden), nn.LeakyReLU(SFT_SLOPE, inplace=True)]
        for _ in range(3):
            layers += [conv1x1(hidden, hidden), nn.LeakyReLU(SFT_SLOPE, inplace=True)]
        layers.append(conv1x1(hidden, cond_channels))
        self.body = nn.Sequential(*layers)

    def forward(self, priors: Tensor) -> Tensor:
        """Map priors to a condition tensor of the same spatial size."""
        bounds = chunk_bounds(priors.shape[0], inference_rows(priors, self.body[0].out_channels))
        if len(bounds) == 1:
            return self.body(priors)
        return torch.cat([self.body(priors[a:b]) for a, b in bounds])


class ResBlock(nn.Module):
    """Plain residual block conv-relu-conv + skip; passes the condition through untouched."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(width, width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)

    def forward(self, pair: Pair) -> Pair:
        """(features, cond) -> (features + body(features), cond)."""
        x, cond = pair
        return self.conv2(self.relu(self.conv1(x))).add_(x), cond


class SFTResBlock(nn.Module):
    """SFT-conv-relu-SFT-conv + skip; uses the shared condition or entry `cond_index` of a stack."""

    def __init__(
        self, width: int, cond_channels: int = 32, hidden: int = 32, cond_index: int | None = None
    ) -> None:
        super().__init__()
        self.cond_index = cond_index
        self.sft1 = SFTLayer(width, cond_channels, hidden)
        self.conv1 = conv3x3(width, width)
        self.relu = nn.ReLU(inplace=True)
        self.sft2 = SFTLayer(width, cond_channels, hidden)
        self.conv2 = conv3x3(width, width)

    def forward(self, pair: Pair) -> Pair:
        """(features, cond) -> (features + body(features, cond), cond)."""
        x, cond = pair
        c = pick_condition(cond, self.cond_index)
        y = self.relu(self.conv1(self.sft1(x, c)))
        return self.conv2(self.sft2(y, c)).add_(x), cond


class SFTGenerator(Generator):
    """Base of the LSFT/GSFT generators (not registered itself): image stem, conditions, trunk, global skip,
    sigmoid head.

    Subclasses fill `blocks` (and optionally `final_sft`), define `conditions`, and keep their weights
    channels_last (the layout oneDNN and cuDNN run fastest; activations follow the weights). `config` holds the
    subclass's other constructor arguments (its block counts `n_*`, `cond_channels`, `cond_hidden`); the
    condition network reads `cond_inputs` maps at a time.
    """

    def __init__(self, n_priors: int, width: int, cond_inputs: int, **config: Any) -> None:
        super().__init__()
        if n_priors < 1 or width < 1:
            raise ValueError(f"need n_priors >= 1 and width >= 1, got {n_priors}, {width}")
        for key, value in config.items():
            if key.startswith("n_") and value < 0:
                raise ValueError(f"need {key} >= 0, got {value}")
        self._config = {"n_priors": n_priors, "width": width, **config}
        self.n_priors = n_priors
        self.stem = conv3x3(3, width)
        self.blocks = nn.Sequential()
        self.final_sft: SFTLayer | None = None
        self.tail = conv3x3(width, width)
        self.head = conv3x3(width, 1)
        self.cond_net = CondNet(cond_inputs, config["cond_channels"], config["cond_hidden"])

    depth_arg: ClassVar[str] = ""  # the block count that gan.depth sets (a subclass names one of its `n_*`)

    @classmethod
    def from_config(cls, gan: GANConfig, n_priors: int) -> SFTGenerator:
        """gan.width, gan.cond_channels, gan.cond_hidden, and gan.depth as the subclass's `depth_arg`."""
        return cls(n_priors, gan.width, **{cls.depth_arg: gan.depth}, cond_channels=gan.cond_channels,
                   cond_hidden=gan.cond_hidden)

    def config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild this generator."""
        return dict(self._config)

    def conditions(self, priors: Tensor) -> Tensor:
        """Priors (B, n, S, S) -> condition stack (k, B, C, S, S) the trunk consumes."""
        raise NotImplementedError

    def trunk(self, pair: Pair) -> Tensor:
        """(stem features, conditions) -> blocks, then the final SFT layer (on condition 0) if any."""
        x, cond = self.blocks(pair)
        return x if self.final_sft is None else self.final_sft(x, pick_condition(cond, 0))

    def decode(self, image: Tensor, cond: Tensor) -> Tensor:
        """Image (B, 3, S, S) and condition stack (k, B, C, S, S) -> map (B, 1, S, S) in [0, 1]."""
        bounds = chunk_bounds(image.shape[0], inference_rows(image, self.stem.out_channels))
        if len(bounds) > 1:
            return torch.cat([self.decode(image[a:b], cond[:, a:b]) for a, b in bounds])
        features = self.stem(image.to(memory_format=torch.channels_last) * 2.0 - 1.0)
        out = self.tail(self.trunk((features, cond.unbind(0)))).add_(features)
        return torch.sigmoid(self.head(out))

    def forward(self, image: Tensor, priors: Tensor) -> Tensor:
        """Image (B, 3, S, S) and priors (B, n, S, S), both in [0, 1] -> map (B, 1, S, S) in [0, 1]."""
        return self.decode(image, self.conditions(priors))
