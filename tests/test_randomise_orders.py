"""Tests for cnnprior.cnn.randomise's orders and init schemes: which stages each step re-initialises, seeds per
stage shared across steps and orders, the schemes' weights, and the default top-down cascade unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from cnnprior.cnn.randomise import (
    INITS,
    ORDERS,
    full_reinit,
    model_stages,
    randomise,
    randomised_copy,
    randomised_stages,
    step_labels,
)

RESNET = ["fc", "layer4", "layer3", "layer2", "layer1", "stem"]  # model_stages order (top-down)
RESNET_PREFIX = {"fc": ["fc"], "layer4": ["layer4"], "layer3": ["layer3"], "layer2": ["layer2"],
                 "layer1": ["layer1"], "stem": ["conv1", "bn1"]}
TINY = ["head", "block2", "block1"]  # a generic network: its children with parameters, last first
TINY_PREFIX = {name: [name] for name in TINY}


class Tiny(nn.Module):
    """A small custom CNN: conv+BN, conv+BN, linear head (generic stage layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.block2 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(24, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.block2(self.block1(x))))


def _trained_like(model: nn.Module) -> nn.Module:
    """Non-default values everywhere (weights, biases, BN statistics), so that any re-initialisation shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(0.5, 1.5)
                m.running_var.uniform_(2.0, 3.0)
                m.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return _trained_like(resnet18(num_classes=10))


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return _trained_like(Tiny())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed_stages(before: dict, after: dict, prefixes: dict[str, list[str]]) -> set[str]:
    """Stages with a changed state entry; every entry of a changed stage's weights must have changed too."""
    changed = set()
    for stage, pre in prefixes.items():
        keys = [k for k in before if any(k.startswith(p + ".") for p in pre)]
        assert keys, stage
        diff = [k for k in keys if not torch.equal(before[k], after[k])]
        weights = [k for k in keys if k.endswith("weight")]
        if diff:
            changed.add(stage)
            assert all(k in diff for k in weights), (stage, [k for k in weights if k not in diff])
    all_prefixed = {k for pre in prefixes.values() for k in before if any(k.startswith(p + ".") for p in pre)}
    assert all_prefixed == set(before)  # the stage map covers the whole state
    return changed


def _expected(names: list[str], order: str, k: int) -> set[str]:
    if order == "top_down":
        return set(names[:k])
    if order == "bottom_up":
        return set(names[len(names) - k:])
    return {names[k - 1]} if k else set()


@pytest.mark.parametrize("init", ["default", "kaiming_normal"])
@pytest.mark.parametrize("order", ORDERS)
def test_orders_reinitialise_exactly_their_stages_resnet(resnet, order, init):
    assert [n for n, _ in model_stages(resnet)] == RESNET
    before = _state(resnet)
    for k in range(len(RESNET) + 1):
        after = _state(randomise(resnet, order, k, seed=3, init=init))
        assert _changed_stages(before, after, RESNET_PREFIX) == _expected(RESNET, order, k), (order, k)
    assert not _changed_stages(before, _state(resnet), RESNET_PREFIX)  # the original is untouched


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("order", ORDERS)
def test_orders_reinitialise_exactly_their_stages_tiny(tiny, order, init):
    assert [n for n, _ in model_stages(tiny)] == TINY
    before = _state(tiny)
    for k in range(len(TINY) + 1):
        after = _state(randomise(tiny, order, k, seed=1, init=init))
        assert _changed_stages(before, after, TINY_PREFIX) == _expected(TINY, order, k), (order, k)


def test_randomised_stages_and_labels(tiny):
    assert randomised_stages(6, "top_down", 2) == [0, 1]
    assert randomised_stages(6, "bottom_up", 2) == [4, 5]
    assert randomised_stages(6, "independent", 2) == [1]
    assert all(randomised_stages(6, o, 0) == [] for o in ORDERS)
    assert step_labels(tiny, "top_down") == ["none", "head", "block2", "block1"]
    assert step_labels(tiny, "bottom_up") == ["none", "block1", "block2", "head"]
    assert step_labels(tiny, "independent") == ["none", "head", "block2", "block1"]


def _reference_cascade(model: nn.Module, steps: int, seed: int) -> nn.Module:
    """The cascade as randomised_copy has always made it (shipped prior files depend on these weights): stage j
    from torch.manual_seed(seed * 1_000_003 + j), every submodule's reset_parameters() in modules() order."""
    out = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        for j, (_, modules) in enumerate(model_stages(out)[:steps]):
            torch.manual_seed(seed * 1_000_003 + j)
            for mod in modules:
                for m in mod.modules():
                    if callable(getattr(m, "reset_parameters", None)):
                        m.reset_parameters()
    return out


def test_default_top_down_is_randomised_copy_bit_for_bit(resnet):
    for k in (0, 1, 3, 6):
        a, b = _state(randomise(resnet, "top_down", k, seed=7)), _state(randomised_copy(resnet, k, seed=7))
        ref = _state(_reference_cascade(resnet, k, seed=7))
        assert a.keys() == b.keys() == ref.keys(), k
        assert all(torch.equal(a[key], b[key]) and torch.equal(a[key], ref[key]) for key in a), k


def test_deterministic_and_stage_weights_shared_across_steps_and_orders(tiny):
    a, b = _state(randomise(tiny, "bottom_up", 2, 5, "kaiming_normal")), _state(
        randomise(tiny, "bottom_up", 2, 5, "kaiming_normal"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for init in INITS:
        full = full_reinit(tiny, 5, init)
        for order in ORDERS:
            for k in range(1, len(TINY) + 1):
                rand = randomise(tiny, order, k, 5, init)
                for j in randomised_stages(len(TINY), order, k):  # stage j: the same weights as in full_reinit
                    name = TINY[j]
                    for (_, p), (_, q) in zip(getattr(rand, name).named_parameters(),
                                              getattr(full, name).named_parameters(), strict=True):
                        assert torch.equal(p, q), (init, order, k, name)
    assert not torch.equal(full_reinit(tiny, 5).head[1].weight, full_reinit(tiny, 6).head[1].weight)


def test_schemes_draw_different_numbers(resnet):
    copies = {init: full_reinit(resnet, 2, init) for init in INITS}
    for i, x in enumerate(INITS):
        for y in INITS[i + 1:]:
            assert not torch.equal(copies[x].layer3[0].conv1.weight, copies[y].layer3[0].conv1.weight), (x, y)
            assert not torch.equal(copies[x].fc.weight, copies[y].fc.weight), (x, y)


def test_scheme_weights_and_bn_identity(resnet):
    for init in ("kaiming_normal", "xavier_uniform", "normal"):
        full = full_reinit(resnet, 0, init)
        for m in full.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
                assert not m.running_mean.any() and torch.equal(m.running_var, torch.ones_like(m.running_var))
                assert int(m.num_batches_tracked) == 0
        assert not full.fc.bias.any()  # conv/linear biases are zeroed
    w = full_reinit(resnet, 0, "kaiming_normal").layer3[0].conv1.weight.detach()  # fan_in 128*3*3, std sqrt(2/fan_in)
    assert abs(float(w.std()) / (2 / (128 * 9)) ** 0.5 - 1) < 0.03 and abs(float(w.mean())) < 1e-3
    w = full_reinit(resnet, 0, "normal").layer3[0].conv1.weight.detach()
    assert abs(float(w.std()) / 0.01 - 1) < 0.03
    # xavier: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
    w = full_reinit(resnet, 0, "xavier_uniform").layer3[0].conv1.weight.detach()
    bound = (6 / (128 * 9 + 256 * 9)) ** 0.5
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    # default: PyTorch's kaiming_uniform(a=sqrt(5)), bound 1/sqrt(fan_in)
    default = full_reinit(resnet, 0).layer3[0].conv1.weight.detach()
    assert float(default.abs().max()) <= (1 / (128 * 9)) ** 0.5


def test_rng_state_kept_and_device_mode_kept(tiny):
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    rand = randomise(tiny, "independent", 2, 4, "xavier_uniform")
    assert torch.equal(torch.rand(3), expected)
    assert rand.training == tiny.training and rand is not tiny


def test_unknown_names_and_steps(tiny):
    with pytest.raises(ValueError, match="top_down, bottom_up, independent"):
        randomise(tiny, "sideways", 1, 0)
    with pytest.raises(ValueError, match="default, kaiming_normal, xavier_uniform, normal"):
        randomise(tiny, "top_down", 1, 0, init="orthogonal")
    with pytest.raises(ValueError, match="0..3"):
        randomise(tiny, "bottom_up", 4, 0)
    with pytest.raises(ValueError, match="choose one of"):
        step_labels(tiny, "random")
