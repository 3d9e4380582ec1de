"""The zoo's architecture families: small CNNs built from a member's descriptor (sample.py draws them).

Every member is a `ZooNet` with the children `stem`, `stage1`, `stage2`, `stage3`, `final` (normalisation and
activation of the final feature map) and `classifier` (global average pooling and one linear layer), wrapped in a
`TargetCNN` whose arch is `zoo_<family>`. The rest of the project needs nothing special for them: the Grad-CAM
target is the module whose output global pooling reads (`cnn.layers.final_layer`: `net.final`), the left-out block
follows the one prior rule (`cnn.layers.last_block`), and the stages of randomised copies are the top-level children
that hold parameters (`cnn.randomise.model_stages`: classifier, final, stage3, stage2, stage1, stem).

Families (`FAMILIES`), stage widths w, 2w, 4w and resolutions S/2, S/4, S/8 (the stem has stride 2):

- `plain`: VGG-like blocks of two conv -> norm -> activation units, max-pooling between stages;
- `residual`: pre-activation residual blocks (norm -> act -> conv, twice, plus the shortcut; a 1x1 projection
  where the shape changes);
- `dense`: DenseNet-BC dense blocks (each layer norm -> act -> 1x1 conv -> norm -> act -> conv, its output
  concatenated to its input), 1x1 transitions with average pooling; `width` is the growth rate;
- `mobile`: MobileNet-V2 inverted residuals (1x1 expansion, depthwise conv, linear 1x1 projection) and a final
  1x1 conv to 2 x 4w channels.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnprior.cnn.model import TargetCNN
from cnnprior.cnn.randomise import init_module
from cnnprior.core.errors import UserError

__all__ = [
    "ACTIVATION_MODULES", "build_member", "DenseBlock", "FAMILIES", "family_arch", "NORMS", "ZooNet"
]

FAMILIES = ("plain", "residual", "dense", "mobile")
NORMS = ("batch", "group", "none")
ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU,
                      "hardswish": nn.Hardswish, "mish": nn.Mish}


def family_arch(family: str) -> str:
    """The `arch` a member of `family` records (checkpoints, prior sidecars; gan.leave_out takes it)."""
    return f"zoo_{family}"


class _Parts:
    """Norm and activation factories of one member."""

    def __init__(self, norm: str, activation: str, kernel: int):
        if norm not in NORMS:
            raise UserError(f"zoo: normalisation {norm!r} is not one of {', '.join(NORMS)}")
        if activation not in ACTIVATION_MODULES:
            raise UserError(f"zoo: activation {activation!r} is not one of {', '.join(ACTIVATION_MODULES)}")
        self.norm_kind, self.activation, self.kernel = norm, activation, kernel

    def norm(self, channels: int) -> list[nn.Module]:
        if self.norm_kind == "batch":
            return [nn.BatchNorm2d(channels)]
        if self.norm_kind == "group":
            groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
            return [nn.GroupNorm(groups, channels)]
        return []

    def act(self) -> nn.Module:
        return ACTIVATION_MODULES[self.activation]()

    def conv(self, cin: int, cout: int, stride: int = 1, kernel: int | None = None, groups: int = 1) -> nn.Conv2d:
        k = self.kernel if kernel is None else kernel
        return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups,
                         bias=self.norm_kind == "none")

    def unit(self, cin: int, cout: int, stride: int = 1) -> nn.Sequential:
        """conv -> norm -> activation."""
        return nn.Sequential(self.conv(cin, cout, stride), *self.norm(cout), self.act())

    def pre(self, channels: int) -> list[nn.Module]:
        """norm -> activation (the pre-activation of the residual and dense families, and `final`)."""
        return [*self.norm(channels), self.act()]


class _PreActBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x)))))), a 1x1 projection if needed."""

    def __init__(self, p: _Parts, cin: int, cout: int, stride: int):
        super().__init__()
        self.pre1 = nn.Sequential(*p.pre(cin))
        self.conv1 = p.conv(cin, cout, stride)
        self.pre2 = nn.Sequential(*p.pre(cout))
        self.conv2 = p.conv(cout, cout)
        self.shortcut = p.conv(cin, cout, stride, kernel=1) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.conv2(self.pre2(self.conv1(self.pre1(x)))) + skip


class _DenseLayer(nn.Module):
    """DenseNet-BC layer: norm -> act -> 1x1 conv (4 x growth) -> norm -> act -> conv (growth)."""

    def __init__(self, p: _Parts, cin: int, growth: int):
        super().__init__()
        self.pre1 = nn.Sequential(*p.pre(cin))
        self.conv1 = p.conv(cin, 4 * growth, kernel=1)
        self.pre2 = nn.Sequential(*p.pre(4 * growth))
        self.conv2 = p.conv(4 * growth, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.pre2(self.conv1(self.pre1(x))))


class DenseBlock(nn.Module):
    """Densely connected block: layer i reads the concatenation of the block's input and every earlier layer's
    output; the block returns the concatenation of all of them (as torchvision's `_DenseBlock`)."""

    def __init__(self, p: _Parts, cin: int, growth: int, layers: int):
        super().__init__()
        for i in range(layers):
            self.add_module(f"layer{i + 1}", _DenseLayer(p, cin + i * growth, growth))
        self.out_channels = cin + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.children():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class _InvertedResidual(nn.Module):
    """MobileNet-V2 block: 1x1 expansion -> depthwise conv -> linear 1x1 projection (+ x where shapes agree)."""

    def __init__(self, p: _Parts, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(p.conv(cin, hidden, kernel=1), *p.norm(hidden), p.act())
        self.depthwise = nn.Sequential(p.conv(hidden, hidden, stride, groups=hidden), *p.norm(hidden), p.act())
        self.project = nn.Sequential(p.conv(hidden, cout, kernel=1), *p.norm(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class ZooNet(nn.Module):
    """stem -> stage1 -> stage2 -> stage3 -> final (norm + activation) -> classifier (pool, linear)."""

    def __init__(self, stem: nn.Module, stages: list[nn.Module], final: nn.Module, channels: int, classes: int):
        super().__init__()
        self.stem = stem
        for i, stage in enumerate(stages):
            self.add_module(f"stage{i + 1}", stage)
        self.n_stages = len(stages)
        self.final = final
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(self.n_stages):
            x = getattr(self, f"stage{i + 1}")(x)
        return self.classifier(self.final(x))


def _plain(p: _Parts, w: int, depth: list[int], classes: int, expand: int) -> ZooNet:
    stages, cin = [], w
    for s, d in enumerate(depth):
        cout = w * 2 ** s
        blocks: list[nn.Module] = [nn.MaxPool2d(2)] if s else []
        for j in range(d):
            last = s == len(depth) - 1 and j == d - 1
            # two conv units per block; the network's last conv is bare: its norm and activation are `final`
            blocks.append(nn.Sequential(p.unit(cin, cout), p.conv(cout, cout) if last else p.unit(cout, cout)))
            cin = cout
        stages.append(nn.Sequential(*blocks))
    return ZooNet(p.unit(3, w, stride=2), stages, nn.Sequential(*p.pre(cin)), cin, classes)


def _residual(p: _Parts, w: int, depth: list[int], classes: int, expand: int) -> ZooNet:
    stages, cin = [], w
    for s, d in enumerate(depth):
        cout = w * 2 ** s
        blocks = []
        for j in range(d):
            blocks.append(_PreActBlock(p, cin, cout, 2 if s and j == 0 else 1))
            cin = cout
        stages.append(nn.Sequential(*blocks))
    return ZooNet(p.conv(3, w, stride=2), stages, nn.Sequential(*p.pre(cin)), cin, classes)


def _dense(p: _Parts, growth: int, depth: list[int], classes: int, expand: int) -> ZooNet:
    cin, stages = 2 * growth, []
    for s, d in enumerate(depth):
        parts: list[nn.Module] = []
        if s:  # transition: norm -> act -> 1x1 conv halving the channels -> 2x2 average pooling
            half = max(8, cin // 2 // 8 * 8)
            parts.append(nn.Sequential(*p.pre(cin), p.conv(cin, half, kernel=1), nn.AvgPool2d(2)))
            cin = half
        block = DenseBlock(p, cin, growth, d)
        parts.append(block)
        cin = block.out_channels
        stages.append(nn.Sequential(*parts) if s else block)
    return ZooNet(p.conv(3, 2 * growth, stride=2), stages, nn.Sequential(*p.pre(cin)), cin, classes)


def _mobile(p: _Parts, w: int, depth: list[int], classes: int, expand: int) -> ZooNet:
    stages, cin = [], w
    for s, d in enumerate(depth):
        cout = w * 2 ** s
        blocks: list[nn.Module] = []
        for j in range(d):
            blocks.append(_InvertedResidual(p, cin, cout, 2 if s and j == 0 else 1, expand))
            cin = cout
        if s == len(depth) - 1:  # the final 1x1 conv (bare: its norm and activation are `final`)
            blocks.append(p.conv(cin, 2 * cin, kernel=1))
            cin = 2 * cin
        stages.append(nn.Sequential(*blocks))
    return ZooNet(p.unit(3, w, stride=2), stages, nn.Sequential(*p.pre(cin)), cin, classes)


_BUILDERS = {"plain": _plain, "residual": _residual, "dense": _dense, "mobile": _mobile}


def build_member(descriptor: dict, class_names: list[str], image_size: int) -> TargetCNN:
    """The member's CNN with its initial weights: torch seeded with `descriptor["seed"]`, then every module
    initialised by `descriptor["init"]` (cnn.randomise.INITS). Same descriptor, same weights, on any machine."""
    family = descriptor["family"]
    if family not in _BUILDERS:
        raise UserError(f"zoo: family {family!r} is not one of {', '.join(FAMILIES)}")
    p = _Parts(descriptor["norm"], descriptor["activation"], int(descriptor["kernel"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(descriptor["seed"]))
        net = _BUILDERS[family](p, int(descriptor["width"]), [int(d) for d in descriptor["depth"]],
                                len(class_names), int(descriptor.get("expand", 1)))
        init_module(net, descriptor.get("init", "default"))
    return TargetCNN(net, family_arch(family), class_names, image_size)
