"""Which module outputs the CAMs read: every conv layer (at its activated output) and the Grad-CAM target layer.

Grad-CAM of a raw conv output that batch norm (and a ReLU) follow sums pre-activations whose sign means nothing:
on a DenseNet-121 trained on Fashion-MNIST such maps are all zero on 43 % of the images. A conv is therefore
represented by the output of the batch norm and activation that directly follow it (`activated`, the default);
`raw` keeps the conv's own output (except plain VGG's conv -> ReLU, always read after the ReLU) for
reproduction studies. The *target* is the CNN's final feature map, the layer pytorch-grad-cam's documentation
recommends per architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnprior.core.errors import UserError
from cnnprior.core.schema import suggest

__all__ = [
    "ACTIVATIONS", "Call", "cam_layers", "conv_layers", "dense_block", "final_layer", "FINAL_LAYERS", "LAYER_OUTPUTS",
    "last_block", "named_module", "NORMS", "TRUNK_SHARE", "trace_calls", "within"
]

LAYER_OUTPUTS = ("activated", "raw")
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish)
NORMS = (nn.BatchNorm2d, nn.GroupNorm)  # a conv directly followed by one of these is read after it (`activated`)
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)


@dataclass
class Call:
    """One module call of a traced forward: the module, its first input and its output (kept alive)."""

    module: nn.Module
    input: torch.Tensor | None
    output: torch.Tensor
    first: bool  # the module's first call in this forward (hooks that keep one output keep this one)


def trace_calls(model: nn.Module, image_size: int | None = None, leaves_only: bool = True) -> list[Call]:
    """Every leaf-module call (and every nn.Conv2d call) of one eval-mode forward of a zero image, in execution
    order; with `leaves_only=False` containers too (recorded when they return)."""
    size = image_size or getattr(model, "image_size", 64)
    calls: list[Call] = []
    seen: set[int] = set()

    def hook(mod, inputs, output):
        if not isinstance(output, torch.Tensor):
            return
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        calls.append(Call(mod, first, output, id(mod) not in seen))
        seen.add(id(mod))

    traced = [m for m in model.modules()
              if not leaves_only or isinstance(m, nn.Conv2d) or not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in traced]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def _names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def conv_layers(model: nn.Module, image_size: int | None = None) -> list[tuple[str, nn.Conv2d]]:
    """Every nn.Conv2d in forward-execution order, by qualified name (layers never run are left out)."""
    names = _names(model)
    order = dict.fromkeys(c.module for c in trace_calls(model, image_size) if isinstance(c.module, nn.Conv2d))
    return [(names[m], m) for m in order]


def _follower(calls: list[Call], i: int, kinds: tuple[type, ...]) -> int | None:
    """Index of the call right after calls[i] if it is a first call of one of `kinds` reading calls[i]'s output."""
    if i + 1 < len(calls):
        nxt = calls[i + 1]
        if isinstance(nxt.module, kinds) and nxt.first and nxt.input is calls[i].output:
            return i + 1
    return None


def cam_layers(model: nn.Module, image_size: int | None = None, outputs: str = "activated"
               ) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs the per-layer CAMs read, one per conv layer in forward-execution order.

    `activated`: a conv directly followed by batch (or group) norm is read after it, and after the activation module
    that directly follows that (conv -> BN -> ReLU: the ReLU's output; conv -> BN -> residual add: the BN's output);
    a conv directly followed by an activation (plain VGG) is read after the activation. `raw`: the conv's own
    output, except the plain-VGG conv -> ReLU case (Grad-CAM of VGG's raw last conv is zero on every image).
    An activation module called more than once per forward (ResNet's shared block ReLU) qualifies only at its
    first call, the one a forward hook keeps.
    """
    if outputs not in LAYER_OUTPUTS:
        raise UserError(f"priors.layer_outputs: {outputs!r} is not one of {', '.join(LAYER_OUTPUTS)}")
    calls, names = trace_calls(model, image_size), _names(model)
    chosen: dict[nn.Module, nn.Module] = {}
    for i, call in enumerate(calls):
        if not isinstance(call.module, nn.Conv2d) or not call.first:
            continue
        end = i
        if outputs == "activated":
            bn = _follower(calls, i, NORMS)
            if bn is not None:
                end = bn
        act = _follower(calls, end, ACTIVATIONS if outputs == "activated" else (nn.ReLU,))
        if act is not None and (outputs == "activated" or sum(c.module is calls[act].module for c in calls) == 1):
            end = act
        chosen[call.module] = calls[end].module
    return [(names[m], m) for m in chosen.values()]


def _last(modules: list[tuple[str, nn.Module]], kind: type) -> tuple[str, nn.Module] | None:
    found = [(n, m) for n, m in modules if isinstance(m, kind)]
    return found[-1] if found else None


def _vgg_final(model: nn.Module, image_size: int | None) -> tuple[str, nn.Module]:
    """VGG: `features[-1]` (the last max-pool) unless its map is under 4x4; then the last ReLU of `features`."""
    feats = model.net.features
    names = _names(model)
    pooled = [c for c in trace_calls(model, image_size) if c.module is feats[-1]]
    if pooled and min(pooled[0].output.shape[-2:]) >= 4:
        return names[feats[-1]], feats[-1]
    relu = _last(list(feats.named_children()), nn.ReLU)
    if relu is None:  # pragma: no cover - every torchvision VGG has ReLUs
        return names[feats[-1]], feats[-1]
    return names[relu[1]], relu[1]


# Per architecture family, the layer pytorch-grad-cam's README recommends (its "Chosing the target layer").
FINAL_LAYERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "resnet": lambda net: net.layer4[-1],
    "densenet": lambda net: net.features[-1],
    "mobilenet": lambda net: net.features[-1],
    "efficientnet": lambda net: net.features[-1],
    "inception": lambda net: net.Mixed_7c,
}


def _traced_final(model: nn.Module, image_size: int | None) -> tuple[str, nn.Module]:
    """Any other CNN: the outermost module whose output is the spatial map that global pooling (the last pooling
    module called; average pooling inside the trunk, e.g. a DenseNet transition, comes before it) reads."""
    calls, names = trace_calls(model, image_size, leaves_only=False), _names(model)
    for i, call in reversed(list(enumerate(calls))):
        if isinstance(call.module, _POOLS) and call.input is not None:
            feeders = [c.module for c in calls[:i] if c.output is call.input and c.module is not model]
            if feeders:
                return names[feeders[-1]], feeders[-1]
    spatial = [c.module for c in calls if c.output.dim() == 4 and min(c.output.shape[-2:]) > 1 and c.module is not model]
    if not spatial:
        raise UserError("cannot find the CNN's final feature map; set priors.target_layer to a module name")
    return names[spatial[-1]], spatial[-1]


def final_layer(model: nn.Module, image_size: int | None = None) -> tuple[str, nn.Module]:
    """The standard Grad-CAM target layer: the module whose output is the CNN's final feature map."""
    arch = getattr(model, "arch", "")
    if arch.startswith("vgg"):
        return _vgg_final(model, image_size)
    for family, pick in FINAL_LAYERS.items():
        if arch.startswith(family):
            layer = pick(model.net)
            return _names(model)[layer], layer
    return _traced_final(model, image_size)


TRUNK_SHARE = 0.25  # a module holding more than this share of the conv layers is a trunk, not a block


def dense_block(calls: list[Call], module: nn.Module) -> bool:
    """Whether `module` is a densely connected block in the traced forward `calls`: called once, returning its input
    and the outputs of all its children (each called once) concatenated, or the outputs of two or more children
    alone (torchvision's `_DenseBlock`, whose layers each read every earlier layer's output)."""
    own = [c for c in calls if c.module is module]
    kids = list(module.children())
    if len(own) != 1 or not kids or own[0].output.dim() != 4:
        return False
    outs = []
    for kid in kids:
        kid_calls = [c for c in calls if c.module is kid]
        if len(kid_calls) != 1 or kid_calls[0].output.dim() != 4:
            return False
        outs.append(kid_calls[0].output)
    out, first = own[0].output, own[0].input
    candidates = ([[first, *outs]] if first is not None and first.dim() == 4 else []) + ([outs] if len(outs) > 1 else [])
    for parts in candidates:
        if sum(p.shape[1] for p in parts) == out.shape[1] and all(p.shape[2:] == out.shape[2:] for p in parts) \
                and torch.equal(torch.cat(parts, 1), out):
            return True
    return False


def last_block(model: nn.Module, target: str, image_size: int | None = None) -> list[str]:
    """The modules left out of the priors with the target: the *target's last block*, found from the module tree.

    Start at the last conv layer that runs before the target's output and walk up to the smallest module holding
    at least two conv layers. If it lies in a densely connected block (`dense_block`: its output holds every dense
    layer's output, so the earlier layers feed the target directly), the block is that whole dense block
    (DenseNet-121: `features.denseblock4`, 32 conv layers). Else if that module holds at most `TRUNK_SHARE` of the
    CNN's conv layers it is the block (ResNet: `layer4[-1]`; Inception: `Mixed_7c`). Otherwise it is a trunk (VGG's
    or MobileNet's `features`), and the block is its trailing children, back from the one holding that conv,
    until they hold two conv layers (VGG: the last two convs; MobileNet/EfficientNet: the last inverted-residual
    stage and the final 1x1 conv). Returns the qualified module names, the target's own module first when it
    holds conv layers (so the layers inside it are always left out too).
    """
    names, modules = _names(model), dict(model.named_modules())
    if target not in modules:
        raise UserError(f"priors.target_layer: the CNN has no module {target!r}")
    convs: list[str] = []  # every conv in forward order; the first `before` run before the target's output
    before = None
    calls = trace_calls(model, image_size, leaves_only=False)
    for call in calls:
        if isinstance(call.module, nn.Conv2d) and names[call.module] not in convs:
            convs.append(names[call.module])
        if call.module is modules[target] and before is None:
            before = len(convs)
    total, convs = len(convs), convs[:before]
    if not convs:
        raise UserError(f"no conv layer runs before the target {target!r}; set priors.target_layer to a later module")

    def held(prefix: str) -> int:
        return sum(within(c, prefix) for c in convs)

    blocks = [target] if held(target) else []
    parts = convs[-1].split(".")
    for k in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:k])
        if held(parent) < 2:
            continue
        dense = dense_block(calls, modules[parent])
        while "." in parent and dense_block(calls, modules[parent.rsplit(".", 1)[0]]):
            parent, dense = parent.rsplit(".", 1)[0], True
        if dense or held(parent) <= TRUNK_SHARE * total:
            return [b for b in blocks if not within(b, parent)] + [parent]
        children = [f"{parent}.{n}" for n, _ in modules[parent].named_children()]
        holder = next(i for i, c in enumerate(children) if within(convs[-1], c))
        tail: list[str] = []
        for child in reversed(children[:holder + 1]):
            if held(child):
                tail.insert(0, child)
            if sum(held(c) for c in tail) >= 2:
                break
        return [b for b in blocks if not any(within(b, t) for t in tail)] + tail
    return blocks or [convs[-1]]  # a CNN whose conv layers sit in no common module: the last conv alone


def named_module(model: nn.Module, name: str, key: str = "priors.target_layer") -> tuple[str, nn.Module]:
    """(name, module) of a qualified module name; one-line error naming close names when it does not exist."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise UserError(f"{key}: the CNN has no module {name!r}{suggest(name, modules, listing=None)}")
    return name, modules[name]


def within(name: str, prefix: str) -> bool:
    """Whether module `name` is `prefix` or inside it (qualified-name prefix)."""
    return name == prefix or name.startswith(prefix + ".")
