"""The standard Grad-CAM target (the CNN's final feature map), activated layer maps, exclusions, and the rule that
nothing is selected on the test split."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision.models.densenet as tv_densenet
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cnnprior.cnn.layers import cam_layers, conv_layers, final_layer, last_block, within
from cnnprior.cnn.model import build_cnn
from cnnprior.core.config import ARCHS, Config, load_config
from cnnprior.core.errors import UserError
from cnnprior.maps.baselines import BaselineChoice, baseline_maps, choose, choose_streamed, grayscale
from cnnprior.priors.extract import extractor_from
from cnnprior.priors.read import read_priors
from cnnprior.priors.spec import PriorSpec, spec_from_sidecar
from tests.helpers import REPO, write_priors

FINAL = {"resnet18": "net.layer4.1", "densenet121": "net.features.norm5", "vgg11": "net.features.19",
         "mobilenet_v2": "net.features.18"}


def _gradcam_reference(model: nn.Module, name: str, images: torch.Tensor, classes: torch.Tensor,
                       monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """grad-cam's GradCAM at module `name` of a copy of `model` with every in-place op turned off."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    relu = tv_densenet.F.relu  # DenseNet applies F.relu(features, inplace=True) after norm5
    monkeypatch.setattr(tv_densenet.F, "relu", lambda t, inplace=False: relu(t))
    with GradCAM(ref, target_layers=[dict(ref.named_modules())[name]]) as cam:
        out = cam(images, [ClassifierOutputTarget(int(c)) for c in classes])
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("arch", list(FINAL))
def test_final_target_equals_gradcam_at_the_recommended_layer(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = build_cnn(arch, ["a", "b", "c", "d", "e"], 64).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert final_layer(model)[0] == FINAL[arch]
    ex = extractor_from(model, PriorSpec(size=64))
    out = ex(images)
    assert ex.describe()["target_layer"] == FINAL[arch]
    ref = _gradcam_reference(model, FINAL[arch], images, out["explained"], monkeypatch)
    assert np.abs(ref - out["target"].numpy()).max() < 1e-5
    # and every prior layer still equals a single-layer GradCAM at its own module (checked on two of them)
    maps = ex.layer_maps(images)[0]
    for i in (0, ex.conv_count - 2):  # (not a BN output that a residual `+=` overwrites inside grad-cam)
        name = ex.layer_names[i]
        assert np.abs(_gradcam_reference(model, name, images, out["explained"], monkeypatch) - maps[:, i].numpy()
                      ).max() < 1e-5, name


def test_vgg_final_layer_is_the_pool_when_it_is_large_enough() -> None:
    assert final_layer(build_cnn("vgg11", ["a", "b"], 128))[0] == "net.features.20"  # max-pool, 4x4
    assert final_layer(build_cnn("vgg11", ["a", "b"], 64))[0] == "net.features.19"  # pool 2x2: the last ReLU


def test_the_targets_block_and_named_modules_are_left_out_of_the_priors() -> None:
    model = build_cnn("resnet18", ["a", "b"], 64)
    ex = extractor_from(model, PriorSpec(size=16))
    d = ex.describe()
    assert d["excluded_layers"] == ["net.layer4.1.relu", "net.layer4.1.bn2"] and len(d["average_order"]) == 18
    assert ex.target_index == 20 and len(ex.layers) == 21  # the block output is one extra recorded map
    more = extractor_from(model, PriorSpec(size=16, exclude=["net.layer4"]))
    assert not any(n.startswith("net.layer4") for n in more.describe()["average_order"])
    assert len(more.describe()["average_order"]) == 15
    inc = extractor_from(model, PriorSpec(size=16, include_target_layer=True))
    assert inc.describe()["excluded_layers"] == [] and len(inc.describe()["average_order"]) == 20
    with pytest.raises(UserError, match=r"priors.exclude: 'net.layer9' names no CAM layer"):
        extractor_from(model, PriorSpec(size=16, exclude=["net.layer9"]))
    with pytest.raises(UserError, match=r"priors.target_layer: the CNN has no module 'net.nope'"):
        extractor_from(model, PriorSpec(size=16, target_layer="net.nope"))
    assert extractor_from(model, PriorSpec(size=16, target_layer="net.layer3")).describe()["target_layer"] \
        == "net.layer3"


def test_old_sidecars_keep_their_meaning_and_last_is_an_alias() -> None:
    assert PriorSpec(target="last").target == "last_conv"
    old = {"size": 64, "n": 8, "method": "gradcam", "order": "output_to_input", "target": "last",
           "include_target_layer": False, "explain": "predicted"}
    spec = spec_from_sidecar(old)
    assert (spec.target, spec.layer_outputs, spec.exclude) == ("last_conv", "raw", [])
    model = build_cnn("resnet18", ["a", "b"], 64)
    assert extractor_from(model, spec).describe()["target_layer"] == "net.layer4.1.conv2"
    assert load_config(None, ["priors.target=last"]).priors.target == "last"  # configs still load
    with pytest.raises(UserError, match="priors.target"):
        PriorSpec(target="middle")


def test_activated_maps_are_not_sums_of_pre_activations() -> None:
    """Activated layer maps read post-ReLU outputs, so their Grad-CAM weights act on non-negative activations."""
    model = build_cnn("resnet18", ["a", "b"], 64).eval()
    acts = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: acts.setdefault(n, o.detach()))
               for n, m in cam_layers(model)]
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    for h in handles:
        h.remove()
    relu_read = [n for n in acts if n.endswith("relu")]
    assert len(relu_read) == 9 and all((acts[n] >= 0).all() for n in relu_read)


# ----------------------------------------------------------------------------------------- validation discipline
def test_no_config_selects_on_the_test_split() -> None:
    assert Config().gan_val_file().endswith("-val.npy") and "val" in Config().priors.splits
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name.startswith(("eval_", "study_")):
            continue  # evaluation configs score, they select nothing; study configs: tests/test_study.py
        cfg = load_config(path)
        assert not cfg.gan_val_file().endswith("-test.npy"), path.name
        if "train" in cfg.priors.splits:  # a config that makes GAN training data makes validation data too
            assert "val" in cfg.priors.splits or cfg.gan.val, path.name


def test_baselines_are_chosen_on_validation_and_applied_elsewhere() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(8, 3, 16, 16, generator=g)
    priors = torch.rand(8, 4, 16, 16, generator=g)
    target = priors[:, 2:3] * 0.9 + 0.1 * torch.rand(8, 1, 16, 16, generator=g)  # prior 2 is the best one
    choice = choose(image, priors, target, chosen_on="val.npy")
    assert choice.best_prior == 2 and choice.best_baseline == "best_prior" and choice.chosen_on == "val.npy"
    inverted = choose(image, priors, 1.0 - grayscale(image), chosen_on="v")
    assert inverted.image_inverted and inverted.best_baseline == "image"
    # applied on other data, the choice is not re-made: prior 2 stays "best" even where prior 0 would win
    maps = baseline_maps(image, priors, choice)
    assert torch.equal(maps["best_prior"], priors[:, 2:3])
    assert torch.allclose(maps["mean_prior_rescaled"].amax((1, 2, 3)), torch.ones(8))
    assert BaselineChoice.from_dict(choice.as_dict()) == choice and BaselineChoice.from_dict(None) is None


def test_baselines_chosen_chunk_by_chunk_equal_the_choice_on_the_whole_file(tmp_path) -> None:
    # the GAN stage streams its validation file (O(batch) memory at any size): chunks of 7 over 30 records, the
    # last one short, give the choice and the mean r's of one pass over everything
    pf = read_priors(write_priors(tmp_path / "val.npy", 30, seed=3, split="val"))
    t = pf.tensors()
    whole = choose(t["image"], t["priors"], t["target"], chosen_on="val.npy")
    streamed = choose_streamed(pf, chosen_on="val.npy", chunk=7)
    assert (streamed.best_prior, streamed.image_inverted, streamed.best_baseline) == \
        (whole.best_prior, whole.image_inverted, whole.best_baseline)
    assert streamed.val_r["per_prior"] == pytest.approx(whole.val_r["per_prior"], abs=1e-6)
    for key in ("best_prior", "mean_prior", "image"):
        assert streamed.val_r[key] == pytest.approx(whole.val_r[key], abs=1e-6)
    # the per-prior r's differ, so which prior is best is a real choice, made the same both ways
    assert len({round(v, 6) for v in whole.val_r["per_prior"]}) > 1


# The target's last block (cnn.layers.last_block) per architecture: what the README's table lists.
LAST_BLOCKS = {
    "resnet18": ["net.layer4.1"], "resnet34": ["net.layer4.2"], "resnet50": ["net.layer4.2"],
    "vgg11": ["net.features.16", "net.features.18"], "vgg11_bn": ["net.features.22", "net.features.25"],
    "vgg16": ["net.features.26", "net.features.28"], "vgg16_bn": ["net.features.37", "net.features.40"],
    "densenet121": ["net.features.denseblock4"],  # a dense block whole: its output holds every layer's
    "mobilenet_v2": ["net.features.17", "net.features.18"], "mobilenet_v3_small": ["net.features.11", "net.features.12"],
    "efficientnet_b0": ["net.features.7", "net.features.8"], "inception_v3": ["net.Mixed_7c"],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_the_target_rule_holds_for_every_supported_architecture(arch: str) -> None:
    """One rule for every architecture: the target is the CNN's final feature map (the map global pooling reads),
    and the priors leave out exactly the CAM layers of the target's last block, found from the module tree."""
    torch.manual_seed(0)
    size = 96  # inception_v3 needs >= 75 px
    model = build_cnn(arch, ["a", "b", "c"], size).eval()
    ex = extractor_from(model, PriorSpec(size=16, n=4))
    d = ex.describe()
    name, module = final_layer(model, size)
    assert d["target_layer"] == name
    assert d["left_out_blocks"] == LAST_BLOCKS[arch] == last_block(model, name, size)
    convs = [n for n, _ in conv_layers(model, size)]
    out_convs = [c for c in convs if any(within(c, b) for b in LAST_BLOCKS[arch])]
    most = 32 if arch.startswith("densenet") else 9  # DenseNet-121's denseblock4: 16 layers of 2 convs
    assert 2 <= len(out_convs) <= most and out_convs == convs[-len(out_convs):]  # the last convs, nothing else
    assert len(d["excluded_layers"]) == len(out_convs)
    kept = {n for prior in d["prior_layers"] for n in prior}
    assert not kept & set(d["excluded_layers"]) and len(kept) == len(convs) - len(out_convs)
    assert len(d["average_order"]) >= 4, d
    # the target's output is a spatial map that feeds the classifier head through pooling
    out = ex(torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)))
    assert out["target"].shape == (2, 16, 16) and out["priors"].shape == (2, 4, 16, 16)
