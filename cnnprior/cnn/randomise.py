"""Model-parameter randomisation: a target CNN's stages top-down, and seeded re-initialised copies.

Used by the model-randomisation sanity checks (Adebayo et al. 2018; Quantus' MPRT, sMPRT and eMPRT) and to make
training data from partially random copies of a CNN. A "stage" is a block of the network (ResNet: `fc`, `layer4`,
..., the stem), listed top-down by `model_stages`. Orders (`ORDERS`), for step k = 1..K of K stages:

- `top_down`: the cascade from the classifier down: the first k stages (`randomised_copy`, what the generators
  were trained on);
- `bottom_up`: the cascade from the stem up: the last k stages (Quantus' default order for MPRT, sMPRT, eMPRT);
- `independent`: stage k alone (model_stages order); every other stage keeps its trained weights.

Init schemes (`INITS`): `default` (each module's own `reset_parameters`, PyTorch's init), `kaiming_normal`
(He normal, fan_in, ReLU gain), `xavier_uniform` (Glorot uniform, gain 1) and `normal` (N(0, 0.01^2)); the last
three draw conv and linear weights and zero their biases, and set norm layers to identity (batch norm: weight 1,
bias 0, running mean 0, running variance 1). Stage j (its model_stages index) is always re-initialised from the
torch seed `seed * 1_000_003 + j + INIT_SEED_OFFSET[init]`, so it gets the same weights at every step and in
every order; `default` has offset 0 (the seeds `randomised_copy` has always used), the other schemes multiples of
1000, so no two schemes share a seed while a network has fewer than 1000 stages.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "full_reinit", "init_module", "INIT_SEED_OFFSET", "INITS", "model_stages", "ORDERS", "randomise", "randomised_copy",
    "randomised_stages", "reset_module", "Stage", "step_labels"
]

Stage = tuple[str, list[nn.Module]]

ORDERS = ("top_down", "bottom_up", "independent")
INITS = ("default", "kaiming_normal", "xavier_uniform", "normal")
INIT_SEED_OFFSET = {"default": 0, "kaiming_normal": 1000, "xavier_uniform": 2000, "normal": 3000}
NORMAL_STD = 0.01  # the `normal` scheme's standard deviation
_SEED_STRIDE = 1_000_003  # stage j of seed s: torch seed s * stride + j (+ the scheme's offset)
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


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


def init_module(module: nn.Module, init: str = "default") -> None:
    """Re-initialise every submodule of `module` that can, in place, with the scheme `init` (one of INITS),
    drawing from torch's global CPU generator (seed it first).

    default: `reset_module`. Otherwise conv and linear layers get their weight from the scheme (kaiming_normal:
    `nn.init.kaiming_normal_(mode="fan_in", nonlinearity="relu")`; xavier_uniform: `nn.init.xavier_uniform_`;
    normal: N(0, NORMAL_STD^2)) and a zero bias; every other submodule with `reset_parameters()` calls it (batch,
    group and layer norms: identity; batch norms also reset their running statistics).
    """
    _check(init, INITS, "init")
    if init == "default":
        reset_module(module)
        return
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, _WEIGHTED):
                if init == "kaiming_normal":
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                elif init == "xavier_uniform":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.normal_(m.weight, 0.0, NORMAL_STD)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()


def _check(name: str, choices: tuple[str, ...], what: str) -> None:
    if name not in choices:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(choices)}")


def randomised_stages(num_stages: int, order: str, step: int) -> list[int]:
    """Indices (model_stages order, top-down) of the stages that step `step` of `order` re-initialises.

    Args:
        num_stages: K, the number of stages of the model.
        order: one of ORDERS.
        step: 0..K (0: none).

    Returns:
        top_down: [0, ..., step-1]; bottom_up: [K-step, ..., K-1]; independent: [step-1] ([] at step 0).
    """
    _check(order, ORDERS, "order")
    if not 0 <= step <= num_stages:
        raise ValueError(f"step must be in 0..{num_stages} (the model has {num_stages} stages), got {step}")
    if order == "top_down":
        return list(range(step))
    if order == "bottom_up":
        return list(range(num_stages - step, num_stages))
    return [step - 1] if step else []


def _reinit_copy(model: nn.Module, indices: list[int], seed: int, init: str) -> nn.Module:
    """A deep copy of `model` with the stages `indices` re-initialised, stage j from its own seed (see module)."""
    device = next(model.parameters()).device
    out = copy.deepcopy(model).cpu()
    stages = model_stages(out)
    if len(stages) >= 1000 and init != "default":
        raise ValueError(f"{len(stages)} stages: the per-scheme seed offsets assume fewer than 1000")
    with torch.random.fork_rng(devices=[]):
        for j in indices:
            torch.manual_seed(seed * _SEED_STRIDE + j + INIT_SEED_OFFSET[init])
            for m in stages[j][1]:
                init_module(m, init)
    return out.to(device)


def randomised_copy(model: nn.Module, steps: int, seed: int) -> nn.Module:
    """A deep copy of `model` with its first `steps` stages (model_stages order) re-initialised.

    Deterministic for (steps, seed) on any device: stage j is re-initialised on the CPU from its own seed
    (seed, j), so stage j gets the same random weights at every step of the cascade. The caller's RNG state
    and the original model are left untouched; the copy keeps the original's device and train/eval mode.
    Same as `randomise(model, "top_down", steps, seed)`.
    """
    stages = model_stages(model)
    if not 0 <= steps <= len(stages):
        raise ValueError(f"steps must be in 0..{len(stages)} (the model has {len(stages)} stages), got {steps}")
    return _reinit_copy(model, list(range(steps)), seed, "default")


def randomise(model: nn.Module, order: str, step: int, seed: int, init: str = "default") -> nn.Module:
    """A deep copy of `model` with the stages of step `step` of `order` re-initialised by the scheme `init`.

    Args:
        model: the trained CNN (a TargetCNN or a bare torchvision network); left untouched.
        order: one of ORDERS (see the module docstring; `randomised_stages` gives the stages of a step).
        step: 0..K for a model of K stages (0: an identical copy).
        seed: stage j is re-initialised from the torch seed seed * 1_000_003 + j + INIT_SEED_OFFSET[init], on the
            CPU, so its weights are the same at every step, in every order and on every device.
        init: one of INITS.

    Returns:
        The copy, on the original's device and in its train/eval mode; the caller's RNG state is kept.
        `randomise(model, "top_down", k, seed)` equals `randomised_copy(model, k, seed)` bit for bit.
    """
    _check(init, INITS, "init")
    indices = randomised_stages(len(model_stages(model)), order, step)
    return _reinit_copy(model, indices, seed, init)


def full_reinit(model: nn.Module, seed: int, init: str = "default") -> nn.Module:
    """A deep copy of `model` with every stage re-initialised by `init` (the last step of either cascade)."""
    return randomise(model, "top_down", len(model_stages(model)), seed, init)


def step_labels(model: nn.Module, order: str) -> list[str]:
    """The label of each step 0..K of `order`: "none" for step 0, then the stage that step adds (top_down: the
    stage the cascade has reached going down; bottom_up: going up from the stem; independent: the one stage
    re-initialised). Reports read them as "down to X", "up to X" and "only X"."""
    names = [name for name, _ in model_stages(model)]
    labels = ["none"]
    for step in range(1, len(names) + 1):
        idx = randomised_stages(len(names), order, step)
        labels.append(names[idx[-1] if order == "top_down" else idx[0]])
    return labels
