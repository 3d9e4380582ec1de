"""Cascading model-parameter randomisation: a target CNN's stages top-down, and seeded re-initialised copies.

Used by the model-randomisation sanity check (Adebayo et al. 2018; Quantus' MPRT) and to make training data
from partially random copies of a CNN. A "stage" is a block of the network (ResNet: `fc`, `layer4`, ...,
the stem); step k of the cascade re-initialises the first k stages, from the classifier down.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["model_stages", "randomised_copy", "reset_module", "Stage"]

Stage = tuple[str, list[nn.Module]]


def _net(model: nn.Module) -> nn.Module:
    """The torchvision network inside a TargetCNN (its `.net`), or the model itself."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def _has_params(m: nn.Module | None) -> bool:
    return m is not None and any(True for _ in m.parameters())


def _out_channels(m: nn.Module) -> int:
    """Output channels of a block: those of its last nn.Conv2d (-1 when it has none)."""
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    return convs[-1].out_channels if convs else -1


def _resnet(net: nn.Module) -> list[Stage]:
    layers = [(f"layer{i}", [getattr(net, f"layer{i}")]) for i in (4, 3, 2, 1)]
    return [("fc", [net.fc]), *layers, ("stem", [net.conv1, net.bn1])]


def _densenet(net: nn.Module) -> list[Stage]:
    f = net.features
    stages: list[Stage] = [("classifier", [net.classifier]), ("norm5+denseblock4", [f.norm5, f.denseblock4])]
    for i in (3, 2, 1):
        stages.append((f"transition{i}+denseblock{i}", [getattr(f, f"transition{i}"), getattr(f, f"denseblock{i}")]))
    return stages + [("stem", [f.conv0, f.norm0])]


def _ranges(names: list[str], groups: list[list[int]], children: list[nn.Module], prefix: str) -> list[Stage]:
    """Stages named `prefix.a-b` (or `prefix.a`) from index groups, top-down (last group first)."""
    out: list[Stage] = []
    for g in reversed(groups):
        label = f"{prefix}.{names[g[0]]}" + (f"-{names[g[-1]]}" if len(g) > 1 else "")
        out.append((label, [children[i] for i in g]))
    return out


def _split_features(features: nn.Sequential, vgg: bool) -> list[list[int]]:
    """VGG: blocks that end at each max-pool. Otherwise: consecutive blocks with the same output channels."""
    children = list(features.children())
    groups: list[list[int]] = [[]]
    for i, child in enumerate(children):
        if not vgg and groups[-1] and _out_channels(child) != _out_channels(children[groups[-1][-1]]):
            groups.append([])
        groups[-1].append(i)
        if vgg and isinstance(child, nn.MaxPool2d) and i < len(children) - 1:
            groups.append([])
    return [g for g in groups if any(_has_params(children[i]) for i in g)]


def _features_net(net: nn.Module) -> list[Stage]:
    """VGG, MobileNet, EfficientNet: the classifier, then `features` split into blocks (top-down)."""
    f: nn.Sequential = net.features
    names, children = [n for n, _ in f.named_children()], list(f.children())
    vgg = any(isinstance(c, nn.MaxPool2d) for c in children)
    return [("classifier", [net.classifier]), *_ranges(names, _split_features(f, vgg), children, "features")]


def _inception(net: nn.Module) -> list[Stage]:
    kids = dict(net.named_children())
    mixed = [[m for n, m in kids.items() if n.startswith(f"Mixed_{i}")] for i in (7, 6, 5)]
    stem = [m for n, m in kids.items() if n.startswith("Conv2d_")]
    return [("fc", [net.fc]), ("Mixed_7", mixed[0]), ("Mixed_6", mixed[1]), ("Mixed_5", mixed[2]), ("stem", stem)]


def _generic(net: nn.Module) -> list[Stage]:
    return [(name, [child]) for name, child in reversed(list(net.named_children())) if _has_params(child)]


def _kind(net: nn.Module) -> Callable[[nn.Module], list[Stage]]:
    """Which stage layout fits the network, decided from its structure (not its name)."""
    if all(hasattr(net, a) for a in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")):
        return _resnet
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential) and hasattr(features, "denseblock4") and hasattr(net, "classifier"):
        return _densenet
    if isinstance(features, nn.Sequential) and _has_params(getattr(net, "classifier", None)):
        return _features_net
    if all(hasattr(net, a) for a in ("Mixed_5b", "Mixed_6a", "Mixed_7a", "fc")):
        return _inception
    return _generic


def model_stages(model: nn.Module) -> list[Stage]:
    """The CNN's stages top-down (classifier head first, stem last) as (name, modules) pairs.

    ResNet: fc, layer4..layer1, stem (conv1+bn1). DenseNet: classifier, norm5+denseblock4,
    transition3+denseblock3, ..., stem (conv0+norm0). VGG: classifier, then the feature blocks ending at each
    max-pool. MobileNet / EfficientNet: classifier, then runs of `features` blocks with the same output
    channels. Inception-v3: fc, Mixed_7, Mixed_6, Mixed_5, stem. Other networks: their top-level children
    that hold parameters, last first.
    """
    net = _net(model)
    return _kind(net)(net)


def reset_module(module: nn.Module) -> None:
    """Re-initialise every submodule that can: `reset_parameters()`; batch norm back to weight 1, bias 0,
    running mean 0, running variance 1 (its own reset_parameters does all four)."""
    for m in module.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()


def randomised_copy(model: nn.Module, steps: int, seed: int) -> nn.Module:
    """A deep copy of `model` with its first `steps` stages (model_stages order) re-initialised.

    Deterministic for (steps, seed) on any device: stage j is re-initialised on the CPU from its own seed
    (seed, j), so stage j gets the same random weights at every step of the cascade. The caller's RNG state
    and the original model are left untouched; the copy keeps the original's device and train/eval mode.
    """
    stages = model_stages(model)
    if not 0 <= steps <= len(stages):
        raise ValueError(f"steps must be in 0..{len(stages)} (the model has {len(stages)} stages), got {steps}")
    device = next(model.parameters()).device
    out = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):
        for j, (_, modules) in enumerate(model_stages(out)[:steps]):
            torch.manual_seed(seed * 1_000_003 + j)
            for m in modules:
                reset_module(m)
    return out.to(device)
