"""Tests for cnnprior.cnn.randomise: stages top-down per architecture, seeded cascading re-initialised copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnprior.cnn.model import build_cnn
from cnnprior.cnn.randomise import model_stages, randomised_copy
from cnnprior.core.config import ARCHS

RESNET_STAGES = {"fc": ["net.fc"], "layer4": ["net.layer4"], "layer3": ["net.layer3"], "layer2": ["net.layer2"],
                 "layer1": ["net.layer1"], "stem": ["net.conv1", "net.bn1"]}


@pytest.fixture
def resnet() -> nn.Module:
    """A resnet18 whose batch norms hold non-default values (so that a reset is visible)."""
    torch.manual_seed(0)
    model = build_cnn("resnet18", ["a", "b", "c"], image_size=32).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.uniform_(0.5, 1.5)
                m.running_var.uniform_(2.0, 3.0)
                m.num_batches_tracked.fill_(7)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.parametrize("arch", ARCHS)
def test_stages_hold_every_parameter_once(arch):
    """Built on the meta device (no memory, no init cost): every parameter lies in exactly one stage."""
    with torch.device("meta"):
        model = build_cnn(arch, ["a", "b", "c"], image_size=128)
    stages = model_stages(model)
    ids = [id(p) for _, mods in stages for m in mods for p in m.parameters()]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert len(stages) >= 5 and stages[0][0] in ("fc", "classifier")


def test_stage_names_top_down():
    with torch.device("meta"):
        names = {a: [n for n, _ in model_stages(build_cnn(a, ["a", "b"], 128))]
                 for a in ("resnet18", "densenet121", "vgg11", "efficientnet_b0")}
    assert names["resnet18"] == list(RESNET_STAGES)
    assert names["densenet121"] == ["classifier", "norm5+denseblock4", "transition3+denseblock3",
                                    "transition2+denseblock2", "transition1+denseblock1", "stem"]
    assert names["vgg11"] == ["classifier", "features.16-20", "features.11-15", "features.6-10", "features.3-5",
                              "features.0-2"]  # blocks end at each max-pool
    assert names["efficientnet_b0"][:3] == ["classifier", "features.8", "features.7"]


def test_generic_fallback_is_children_with_parameters_reversed():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    assert [n for n, _ in model_stages(net)] == ["4", "2", "0"]


def test_step_zero_is_an_identical_copy(resnet):
    copy = randomised_copy(resnet, 0, seed=1)
    assert copy is not resnet and not _changed(_state(resnet), _state(copy))
    assert next(copy.parameters()).data_ptr() != next(resnet.parameters()).data_ptr()


def test_each_step_changes_exactly_its_stages(resnet):
    """Step k re-initialises fc, layer4, ... (the first k stages) and nothing else; batch norms go back to
    weight 1, bias 0, running mean 0, variance 1, 0 batches tracked."""
    before = _state(resnet)
    names = list(RESNET_STAGES)
    for k in range(len(names) + 1):
        after = _state(randomised_copy(resnet, k, seed=3))
        prefixes = [p for name in names[:k] for p in RESNET_STAGES[name]]
        expected = {key for key in before if any(key.startswith(p + ".") for p in prefixes)}
        assert _changed(before, after) == expected, k
    copy = randomised_copy(resnet, len(names), seed=3)
    bn = copy.net.layer1[0].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert float(bn.running_mean.abs().max()) == 0 and torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert int(bn.num_batches_tracked) == 0


def test_original_untouched_and_rng_state_kept(resnet):
    before = _state(resnet)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    randomised_copy(resnet, 6, seed=5)
    assert torch.equal(torch.rand(3), expected)  # the caller's global RNG stream is not consumed
    assert not _changed(before, _state(resnet))


def test_deterministic_for_a_seed_and_consistent_along_the_cascade(resnet):
    a, b = randomised_copy(resnet, 2, seed=4), randomised_copy(resnet, 2, seed=4)
    assert not _changed(_state(a), _state(b))
    other = randomised_copy(resnet, 2, seed=5)
    assert not torch.equal(a.net.fc.weight, other.net.fc.weight)
    deeper = randomised_copy(resnet, 5, seed=4)  # fc and layer4 get the same random weights at every step
    assert torch.equal(a.net.fc.weight, deeper.net.fc.weight)
    assert torch.equal(a.net.layer4[0].conv1.weight, deeper.net.layer4[0].conv1.weight)
    assert a.training == resnet.training


def test_steps_out_of_range(resnet):
    with pytest.raises(ValueError, match="0..6"):
        randomised_copy(resnet, 7, seed=0)
