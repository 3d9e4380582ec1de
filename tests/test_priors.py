"""Tests for cnnprior.priors (extract, resize, spec, priorfile): maps equal grad-cam's single-layer GradCAM, prior
positions and averages, safe files."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cnnprior.cli import train_main
from cnnprior.cnn.layers import cam_layers, conv_layers
from cnnprior.cnn.model import build_cnn, load_cnn, save_cnn
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import file_sha256
from cnnprior.data.sources.shapes import ShapesSource
from cnnprior.present.viz import colorize
from cnnprior.priors import cams
from cnnprior.priors.cli import main
from cnnprior.priors.extract import PriorExtractor
from cnnprior.priors.priorfile import PRIORS_FORMAT, PriorWriter, make_records, record_dtype, sidecar_path, to_u8
from cnnprior.priors.read import read_priors
from cnnprior.priors.released import import_released
from cnnprior.priors.resize import minmax, scale_and_resize, scale_and_resize_all
from cnnprior.priors.spec import PriorSpec, position_indices
from cnnprior.priors.stage import run_priors_stage
from tests.helpers import REPO


def gradcam_single(model: nn.Module, layer: nn.Module, images: torch.Tensor,
                   targets: list | None = None) -> np.ndarray:
    """The released method for one layer: a plain grad-cam GradCAM call, (B, H, W) at the input size."""
    with GradCAM(model, target_layers=[layer]) as cam:
        return cam(images, targets)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------- per-layer maps
def test_resnet18_maps_equal_single_layer_gradcam(shape_batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = build_cnn("resnet18", ["a", "b", "c", "d", "e"], 64).eval()
    layers = conv_layers(model)
    assert len(layers) == 20
    ex = PriorExtractor(model, layers, PriorSpec(size=64, target="last_conv"))
    maps, explained, prob, pred = ex.layer_maps(shape_batch)
    assert maps.shape == (4, 20, 64, 64) and maps.dtype == torch.float32
    assert not ex._copy_outputs  # no in-place op after a ResNet conv: the outputs are used as they are
    assert torch.equal(explained, pred)
    with torch.no_grad():
        probs = torch.softmax(model(shape_batch), 1)
    torch.testing.assert_close(prob, probs.gather(1, pred.view(-1, 1))[:, 0])
    assert all(p.grad is None for p in model.parameters()) and no_hooks(model)
    # min-max scaled maps: peak 1 (or all zero where ReLU leaves nothing), and nearly all are real maps
    peak = maps.amax((2, 3))
    assert (((peak - 1).abs() < 1e-3) | (peak == 0)).all() and (peak > 0.5).float().mean() > 0.9
    assert (maps.amin((2, 3)) == 0).all()
    for i, (name, layer) in enumerate(layers):
        ref = gradcam_single(model, layer, shape_batch)
        assert np.abs(ref - maps[:, i].numpy()).max() < 1e-5, name


def _small_head_vgg11() -> nn.Module:
    """torchvision's vgg11 (its convs and in-place ReLUs untouched) with a small head, so backward is cheap."""
    torch.manual_seed(1)
    model = build_cnn("vgg11", ["a", "b", "c", "d", "e"], 64)
    model.net.avgpool = nn.AdaptiveAvgPool2d(1)
    model.net.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512, 64), nn.ReLU(inplace=True), nn.Linear(64, 5))
    return model.eval()


def test_vgg11_inplace_relu_maps_equal_gradcam_on_a_not_inplace_copy(shape_batch: torch.Tensor) -> None:
    shape_batch = shape_batch[:2]
    model = _small_head_vgg11()
    feats = list(model.net.features)
    after_conv = [feats[i + 1] for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
    assert len(after_conv) == 8 and all(isinstance(r, nn.ReLU) and r.inplace for r in after_conv)
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    ref_modules = dict(reference.named_modules())
    layers = conv_layers(model)
    ex = PriorExtractor(model, layers, PriorSpec(size=64, target="last_conv"))
    maps = ex.layer_maps(shape_batch)[0]
    assert ex._copy_outputs  # the in-place ReLUs were noticed (and the pass redone with copies) ...
    assert torch.equal(ex.layer_maps(shape_batch)[0], maps)  # ... and later batches copy right away
    # the extraction itself does not care whether the ReLUs are in place
    maps_copy = PriorExtractor(reference, conv_layers(reference),
                               PriorSpec(size=64, target="last_conv")).layer_maps(shape_batch)[0]
    assert (maps - maps_copy).abs().max() < 1e-5
    trap = []
    for i, (name, layer) in enumerate(layers):
        ref = gradcam_single(reference, ref_modules[name], shape_batch)
        assert np.abs(ref - maps[:, i].numpy()).max() < 1e-5, name
        # grad-cam on the in-place model records the conv output after ReLU overwrote it (on CPU)
        trap.append(np.abs(gradcam_single(model, layer, shape_batch) - maps[:, i].numpy()).max())
    assert max(trap) > 1e-3, trap


def test_vgg11_cam_layers_are_the_relus_and_match_gradcam_there(shape_batch: torch.Tensor) -> None:
    """Plain VGG: the stages use each conv's ReLU output (grad-cam's usual VGG target), not the raw conv output,
    whose Grad-CAM sums mostly negative pre-activations (all-zero maps on a trained VGG-11)."""
    shape_batch = shape_batch[:2]
    model = _small_head_vgg11()
    layers = cam_layers(model)
    feats = dict(model.net.features.named_children())
    assert [n for n, _ in layers] == [f"net.features.{i}" for i in (1, 4, 7, 9, 12, 14, 17, 19)]
    assert all(isinstance(m, nn.ReLU) and m is feats[n.split(".")[-1]] for n, m in layers)
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    ref_modules = dict(reference.named_modules())
    maps = PriorExtractor(model, layers, PriorSpec(size=64, target="last_conv")).layer_maps(shape_batch)[0]
    for i, (name, _) in enumerate(layers):
        ref = gradcam_single(reference, ref_modules[name], shape_batch)
        assert np.abs(ref - maps[:, i].numpy()).max() < 1e-5, name
    assert maps.amax((2, 3)).min() > 0.99  # every image, every layer: a real map
    # the same model's raw conv outputs: maps do differ (what the ReLU choice changes)
    conv_maps = PriorExtractor(model, conv_layers(model), PriorSpec(size=64, target="last_conv")
                               ).layer_maps(shape_batch)[0]
    assert (conv_maps - maps).abs().max() > 0.1


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "mobilenet_v2", "vgg11_bn"])
def test_raw_cam_layers_are_the_convs_where_batch_norm_follows(arch: str) -> None:
    model = build_cnn(arch, ["a", "b"], 64)
    assert [(n, id(m)) for n, m in cam_layers(model, outputs="raw")] == [(n, id(m)) for n, m in conv_layers(model)]


def test_activated_cam_layers_read_each_conv_after_its_batch_norm_and_activation() -> None:
    model = build_cnn("resnet18", ["a", "b"], 64)
    names = [n for n, _ in cam_layers(model)]
    assert len(names) == 20 and names[:5] == ["net.relu", "net.layer1.0.relu", "net.layer1.0.bn2",
                                              "net.layer1.1.relu", "net.layer1.1.bn2"]
    # conv -> BN -> residual add: the BN output; a downsample conv -> BN: the BN output
    assert "net.layer2.0.downsample.1" in names and names[-2:] == ["net.layer4.1.relu", "net.layer4.1.bn2"]
    mobile = [n for n, _ in cam_layers(build_cnn("mobilenet_v2", ["a", "b"], 64))]
    assert mobile[:3] == ["net.features.0.2", "net.features.1.conv.0.2", "net.features.1.conv.2"]  # ReLU6 / BN
    with pytest.raises(UserError, match="priors.layer_outputs"):
        cam_layers(model, outputs="pre")


@pytest.mark.parametrize("shape, size", [((2, 2), 64), ((7, 7), 64), ((32, 32), 64), ((5, 9), 16), ((100, 100), 64),
                                         ((16, 16), 16)])
def test_scale_and_resize_matches_interpolate(shape: tuple[int, int], size: int) -> None:
    cams = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    ref = minmax(cams.clamp_min(0)).unsqueeze(1)  # ReLU, min-max, bilinear (half-pixel), min-max
    ref = F.interpolate(ref, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    ref = minmax(ref.clamp_min(0))
    got = scale_and_resize(cams, size)
    assert got.shape == (3, size, size) and (got - ref).abs().max() < 1e-6
    assert torch.allclose(got.amax((1, 2)), torch.ones(3)) and (got.amin((1, 2)) == 0).all()


def test_scale_and_resize_all_equals_one_layer_at_a_time() -> None:
    """Runs of same-size layers scaled together into one (L, B, S, S) buffer: scale_and_resize's numbers."""
    g = torch.Generator().manual_seed(0)
    shapes = [(32, 32), (16, 16), (16, 16), (64, 64), (4, 4), (4, 4), (4, 4), (1, 1), (5, 9)]
    cams = [torch.randn(3, *hw, generator=g) for hw in shapes]
    cams[2][1] = 0.0  # an all-zero map stays all zero
    got = scale_and_resize_all(cams, 64)
    assert got.shape == (len(shapes), 3, 64, 64)
    for i, cam in enumerate(cams):
        assert (got[i] - scale_and_resize(cam, 64)).abs().max() < 1e-6, shapes[i]
    assert (got[2, 1] == 0).all()


def test_resnet_copies_only_the_outputs_an_inplace_op_overwrites(shape_batch: torch.Tensor) -> None:
    """Activated ResNet outputs: the residual add overwrites each block's bn2 output, so those (and only those)
    are copied; the maps equal an extraction that copies every output."""
    torch.manual_seed(0)
    model = build_cnn("resnet18", ["a", "b", "c", "d", "e"], 64).eval()
    layers = cam_layers(model)
    ex = PriorExtractor(model, layers, PriorSpec(size=64))
    maps = ex.layer_maps(shape_batch)[0]
    assert sorted(ex.layer_names[i] for i in ex._copy_outputs) == sorted(
        n for n in ex.layer_names[:ex.conv_count] if n.endswith(".bn2"))
    every = PriorExtractor(model, layers, PriorSpec(size=64))
    every._copy_outputs = frozenset(range(len(every.layers)))
    assert torch.equal(every.layer_maps(shape_batch)[0], maps)
    assert torch.equal(ex.layer_maps(shape_batch)[0], maps)


class _AliasedOutput(nn.Module):
    """A recorded layer whose output is a view of its input, which the network then modifies in place: copying
    the output handed on cannot protect the recorded tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.alias, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Identity(), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        v = self.alias(h[:])  # a view of h
        h.mul_(2.0)  # changes v too
        return self.fc(self.conv2(v).mean((2, 3)))


def test_an_output_overwritten_even_when_copied_is_an_error_not_a_wrong_map() -> None:
    model = _AliasedOutput().eval()
    layers = [("conv1", model.conv1), ("alias", model.alias), ("conv2", model.conv2)]
    ex = PriorExtractor(model, layers, PriorSpec(size=8, n=2, target="last_conv"))
    with pytest.raises(RuntimeError, match=r"layers \[1\] of _AliasedOutput: an in-place op changed"):
        ex.layer_maps(torch.rand(2, 3, 8, 8))


def test_layer_run_twice_or_unused_does_not_shift_maps(zigzag: nn.Module) -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    layers = conv_layers(zigzag, image_size=16)
    assert [n for n, _ in layers] == ["stem", "mid", "block.1", "head"]
    maps = PriorExtractor(zigzag, layers, PriorSpec(size=16)).layer_maps(x)[0]
    for i, (name, layer) in enumerate(layers):  # `mid`: its first call, as grad-cam's own single-layer call
        assert np.abs(gradcam_single(zigzag, layer, x) - maps[:, i].numpy()).max() < 1e-5, name
    # the hazard avoided: grad-cam's per-call lists hold 5 entries for 4 layers, so later layers would shift
    rec = ActivationsAndGradients(zigzag, [m for _, m in layers], None)
    try:
        rec(x)
        assert len(rec.activations) == 5
    finally:
        rec.release()
    # a conv that never runs cannot be explained: one clear error, not a silently shifted map
    with_unused = layers + [("unused", zigzag.unused)]
    with pytest.raises(UserError, match=r"not run by the forward pass: unused"):
        PriorExtractor(zigzag, with_unused, PriorSpec(size=16)).layer_maps(x)
    assert no_hooks(zigzag)


@pytest.mark.parametrize("method", ["gradcam++", "xgradcam", "layercam", "hirescam"])
def test_other_cam_methods_equal_their_single_layer_grad_cam_class(zigzag: nn.Module, method: str) -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    layers = conv_layers(zigzag, image_size=16)
    maps = PriorExtractor(zigzag, layers, PriorSpec(size=16, method=method)).layer_maps(x)[0]
    gradcam = PriorExtractor(zigzag, layers, PriorSpec(size=16)).layer_maps(x)[0]
    assert (maps - gradcam).abs().max() > 1e-2  # the method really changes the maps
    for i, (name, layer) in enumerate(layers):
        with cams.cam_class(method)(zigzag, target_layers=[layer]) as cam:
            ref = cam(x, None)
        assert np.abs(ref - maps[:, i].numpy()).max() < 1e-5, name


def test_hooks_released_and_no_parameter_grads_even_after_errors(zigzag: nn.Module) -> None:
    x = torch.rand(2, 3, 16, 16)
    ex = PriorExtractor(zigzag, conv_layers(zigzag, 16), PriorSpec(size=16))
    out = ex(x)
    assert out["priors"].shape == (2, 8, 16, 16) and out["target"].shape == (2, 16, 16)
    assert no_hooks(zigzag) and all(p.grad is None for p in zigzag.parameters())
    ex_label = PriorExtractor(zigzag, conv_layers(zigzag, 16), PriorSpec(size=16, explain="label"))
    with pytest.raises(UserError, match="needs labels"):
        ex_label(x)
    assert no_hooks(zigzag)
    zigzag.fail = True
    with pytest.raises(RuntimeError, match="on purpose"):
        ex(x)
    assert no_hooks(zigzag) and all(p.grad is None for p in zigzag.parameters())


def test_one_target_per_image_and_batch_independence(shape_batch: torch.Tensor) -> None:
    torch.manual_seed(2)
    model = build_cnn("resnet18", ["a", "b", "c", "d", "e"], 64).eval()
    layers = conv_layers(model)
    ex = PriorExtractor(model, layers, PriorSpec(size=64, explain="label", target="last_conv"))
    labels = torch.tensor([0, 1, 2, 3])
    maps, explained, _, _ = ex.layer_maps(shape_batch, labels)
    assert explained.tolist() == [0, 1, 2, 3]
    for i in range(4):
        alone, cls, _, _ = ex.layer_maps(shape_batch[i:i + 1], labels[i:i + 1])
        assert cls.tolist() == [i]
        assert (alone[0] - maps[i]).abs().max() < 1e-4, i  # float sums differ with the batch size (oneDNN)
    # each image explains its own class: grad-cam with one ClassifierOutputTarget per image agrees
    targets = [ClassifierOutputTarget(int(c)) for c in labels]
    for i in (0, 11, 19):
        ref = gradcam_single(model, layers[i][1], shape_batch, targets)
        assert np.abs(ref - maps[:, i].numpy()).max() < 1e-5
    # ... and the classes matter: explaining class 0 everywhere changes images 1..3
    other = ex.layer_maps(shape_batch, torch.zeros(4, dtype=torch.long))[0]
    assert (other[1:, 19] - maps[1:, 19]).abs().max() > 0.05


# ----------------------------------------------------------------------------------------- priors
def test_position_formula() -> None:
    assert position_indices(8, 19) == [0, 3, 6, 9, 12, 14, 17, 19]  # 20 maps
    assert position_indices(8, 18) == [0, 3, 6, 8, 11, 13, 16, 18]  # 19 maps
    assert position_indices(1, 19) == [19] and position_indices(1, 0) == [0]
    assert position_indices(2, 7) == [0, 7]
    assert position_indices(3, 4) == [0, 2, 4]  # ceil(ceil(50)·4/100) = 2
    with pytest.raises(ValueError):
        position_indices(8, -1)


def _dummy_layers(count: int) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    convs = [nn.Conv2d(1, 1, 1) for _ in range(count)]
    return nn.Sequential(*convs), [(f"c{i}", c) for i, c in enumerate(convs)]


@pytest.mark.parametrize("order", ["output_to_input", "input_to_output"])
@pytest.mark.parametrize("target", ["last", "first"])
@pytest.mark.parametrize("include", [False, True])
def test_cumulative_averages_by_hand(order: str, target: str, include: bool) -> None:
    model, layers = _dummy_layers(7)
    ex = PriorExtractor(model, layers, PriorSpec(n=3, order=order, target=target, include_target_layer=include))
    t = 6 if target == "last" else 0
    pool = [i for i in range(7) if include or i != t]
    expected_order = pool[::-1] if order == "output_to_input" else pool
    assert ex.target_index == t and ex.average_order == expected_order
    assert ex.positions == position_indices(3, len(pool) - 1)
    maps = torch.rand(2, 7, 5, 5, generator=torch.Generator().manual_seed(3))
    priors, target_map = ex.priors_from_maps(maps)
    assert torch.equal(target_map, maps[:, t])
    assert priors.shape == (2, 3, 5, 5)
    for k, p in enumerate(ex.positions):
        hand = sum(maps[:, expected_order[j]] for j in range(p + 1)) / (p + 1)
        torch.testing.assert_close(priors[:, k], hand, atol=1e-6, rtol=0)
    desc = ex.describe()
    assert desc["target_layer"] == f"c{t}"
    assert desc["prior_layers"][-1] == [f"c{i}" for i in expected_order[:ex.positions[-1] + 1]]


def test_target_layer_excluded_by_default_included_on_request(shape_batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = build_cnn("resnet18", ["a", "b", "c", "d", "e"], 64).eval()
    layers = conv_layers(model)
    ex = PriorExtractor(model, layers, PriorSpec(size=32, target="last"))  # `last`: the old name of last_conv
    assert ex.spec.target == "last_conv"
    maps = ex.layer_maps(shape_batch)[0]
    assert maps.shape == (4, 20, 32, 32)
    priors, target = ex.priors_from_maps(maps)
    assert ex.target_index == 19 and 19 not in ex.average_order and len(ex.average_order) == 19
    assert ex.positions == [0, 3, 6, 8, 11, 13, 16, 18]
    assert ex.describe()["target_layer"] == "net.layer4.1.conv2"
    assert ex.describe()["average_order"][0] == "net.layer4.1.conv1"
    assert torch.equal(priors[:, 0], maps[:, 18])  # C_0 is the layer before the target ...
    assert (priors[:, 0] - target).abs().max() > 0.05  # ... so the GAN cannot just copy it
    inc = PriorExtractor(model, layers, PriorSpec(size=32, target="last_conv", include_target_layer=True))
    assert inc.positions == [0, 3, 6, 9, 12, 14, 17, 19] and inc.average_order[0] == 19
    p_inc, t_inc = inc.priors_from_maps(maps)
    assert torch.equal(p_inc[:, 0], t_inc) and torch.equal(t_inc, maps[:, 19])
    first = PriorExtractor(model, layers, PriorSpec(size=32, target="first"))
    p_first, t_first = first.priors_from_maps(maps)
    assert torch.equal(t_first, maps[:, 0]) and first.describe()["target_layer"] == "net.conv1"
    assert first.average_order == list(range(19, 0, -1))
    assert torch.equal(p_first[:, 0], maps[:, 19])
    torch.testing.assert_close(p_first[:, -1], maps[:, 1:].mean(1))


# ----------------------------------------------------------------------------------------- prior files
SIZE, N = 16, 4


def _meta(**extra) -> dict:
    return {"format": PRIORS_FORMAT, **PriorSpec(size=SIZE, n=N).as_dict(), "layers": ["a", "b"],
            "class_names": ["x", "y", "z"], "cnn": {"arch": "test"}, **extra}


def _records(count: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    g = torch.Generator().manual_seed(seed)
    out = {"priors": torch.rand(count, N, SIZE, SIZE, generator=g),
           "target": torch.rand(count, SIZE, SIZE, generator=g),
           "pred": torch.randint(0, 3, (count,), generator=g), "explained": torch.randint(0, 3, (count,), generator=g),
           "prob": torch.rand(count, generator=g)}
    images = torch.rand(count, 3, 2 * SIZE, 2 * SIZE, generator=g)
    masks = (torch.rand(count, 2 * SIZE, 2 * SIZE, generator=g) > 0.5).float()
    labels, index = torch.randint(0, 3, (count,), generator=g), torch.arange(100, 100 + count)
    return make_records(out, images, labels, masks, index, SIZE, N), dict(out, images=images, labels=labels)


def _write(path: Path, records: np.ndarray, **kw) -> Path:
    w = PriorWriter(path, len(records), _meta(), **kw)
    for s in range(0, len(records), 4):
        w.write(records[s:s + 4])
    return w.close()


def test_prior_file_round_trip(tmp_path: Path) -> None:
    rec, src = _records(10)
    path = _write(tmp_path / "p.npy", rec)
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*progress*"))
    raw = np.load(path, allow_pickle=False, mmap_mode="r")
    assert isinstance(raw, np.memmap) and raw.dtype == record_dtype(SIZE, N) and raw.shape == (10,)
    assert np.array_equal(np.asarray(raw), rec)
    pf = read_priors(path)
    assert len(pf) == 10 and pf.size == SIZE and pf.n == N
    assert pf.meta["count"] == 10 and pf.meta["layers"] == ["a", "b"] and len(pf.meta["content_sha256"]) == 64
    t = pf.tensors(slice(2, 5))
    assert t["image"].shape == (3, 3, SIZE, SIZE) and t["priors"].shape == (3, N, SIZE, SIZE)
    assert t["target"].shape == (3, 1, SIZE, SIZE) and t["mask"].shape == (3, SIZE, SIZE)
    # maps are quantised to 1/255 by rounding
    assert (t["priors"] - src["priors"][2:5]).abs().max() <= 0.5 / 255 + 1e-6
    assert (t["target"][:, 0] - src["target"][2:5]).abs().max() <= 0.5 / 255 + 1e-6
    small = F.interpolate(src["images"][2:5], size=(SIZE, SIZE), mode="bilinear", antialias=True,
                          align_corners=False).clamp(0, 1)
    assert (t["image"] - small).abs().max() <= 0.5 / 255 + 1e-6
    assert t["label"].tolist() == src["labels"][2:5].tolist()
    assert t["explained"].tolist() == src["explained"][2:5].tolist()
    assert pf.records["index"].tolist() == list(range(100, 110))
    assert np.allclose(pf.records["prob"], src["prob"].numpy())


def test_record_size_within_the_released_budget() -> None:
    item = record_dtype(64, 8).itemsize
    # image 64·64·3 + priors 8·64·64 + target + mask 64·64 each + label/pred/explained int16, prob f32, index i64
    assert item == 12288 + 32768 + 4096 + 4096 + 2 * 3 + 4 + 8 == 53266
    assert item <= 61_440
    assert record_dtype(64, 8, with_mask=False).itemsize == item - 4096  # sources without masks


def test_prior_file_without_masks(tmp_path: Path) -> None:
    rec, _ = _records(3)
    no_mask = np.zeros(3, dtype=record_dtype(SIZE, N, with_mask=False))
    for name in no_mask.dtype.names:
        no_mask[name] = rec[name]
    w = PriorWriter(tmp_path / "nm.npy", 3, _meta(has_masks=False))
    w.write(no_mask)
    pf = read_priors(w.close())
    assert "mask" not in pf.records.dtype.names and not pf.meta["has_masks"]
    t = pf.tensors()
    assert t["mask"].shape == (3, SIZE, SIZE) and float(t["mask"].abs().sum()) == 0.0
    assert torch.equal(t["priors"], torch.from_numpy(rec["priors"]).float() / 255)
    _edit_sidecar(tmp_path / "nm.npy", has_masks=True)
    with pytest.raises(UserError, match=r"has_masks=True but the records lack a mask field"):
        read_priors(tmp_path / "nm.npy")


@pytest.fixture
def prior_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "good.npy", _records(6)[0])


def _edit_sidecar(path: Path, **changes) -> None:
    sc = sidecar_path(path)
    meta = json.loads(sc.read_text())
    meta.update(changes)
    sc.write_text(json.dumps(meta))


def test_truncated_file(prior_file: Path) -> None:
    data = prior_file.read_bytes()
    prior_file.write_bytes(data[:-100])
    with pytest.raises(UserError, match=r"good\.npy: truncated or corrupt \.npy"):
        read_priors(prior_file)
    prior_file.write_bytes(data[:40])  # not even a whole header
    with pytest.raises(UserError, match=r"good\.npy: (truncated or corrupt|unreadable)"):
        read_priors(prior_file)


def test_sidecar_mismatches(prior_file: Path) -> None:
    _edit_sidecar(prior_file, count=7)
    with pytest.raises(UserError, match=r"holds 6 records but the sidecar says 7"):
        read_priors(prior_file)
    _edit_sidecar(prior_file, count=6, size=32)
    with pytest.raises(UserError, match=r"record layout .* does not match the sidecar \(S=32, n=4\)"):
        read_priors(prior_file)
    _edit_sidecar(prior_file, size=SIZE, format="something-else")
    with pytest.raises(UserError, match=r"not a cnnprior prior sidecar"):
        read_priors(prior_file)
    sidecar_path(prior_file).write_text("{not json")
    with pytest.raises(UserError, match=r"sidecar is not valid JSON"):
        read_priors(prior_file)
    sidecar_path(prior_file).unlink()
    with pytest.raises(UserError, match=r"sidecar good\.json missing"):
        read_priors(prior_file)
    with pytest.raises(UserError, match=r"prior file not found"):
        read_priors(prior_file.with_name("nope.npy"))


def test_modified_content_is_detected(prior_file: Path) -> None:
    with open(prior_file, "r+b") as fh:
        fh.seek(-7, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-7, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UserError, match=r"content hash differs from the sidecar"):
        read_priors(prior_file)
    assert len(read_priors(prior_file, verify=False)) == 6


def _pickled_npy(path: Path) -> Path:
    rows = np.empty((2, 4), dtype=object)
    for i in range(2):
        rows[i] = [np.zeros((4, 4, 3), np.uint8), np.zeros((2, 4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), i]
    np.save(path, rows, allow_pickle=True)
    return path


def test_pickled_npy_is_refused_naming_the_risk(tmp_path: Path, run_py, one_line_error) -> None:
    path = _pickled_npy(tmp_path / "released.npy")  # the released file comes without a sidecar
    with pytest.raises(UserError) as info:
        read_priors(path)
    msg = str(info.value)
    assert "pickled Python objects" in msg and "arbitrary code" in msg and "--trust-pickle" in msg
    sidecar_path(path).write_text(json.dumps(_meta(count=2)))  # a sidecar does not make it loadable
    with pytest.raises(UserError, match="pickled Python objects"):
        read_priors(path)
    line = one_line_error(run_py("-m", "cnnprior.priors", "info", path, cwd=tmp_path))
    assert "pickled" in line and "arbitrary code" in line


def test_resume_after_interruption_writes_the_same_bytes(tmp_path: Path) -> None:
    rec = _records(10, seed=4)[0]
    once = _write(tmp_path / "once.npy", rec)
    path = tmp_path / "resumed.npy"
    first = PriorWriter(path, 10, _meta())
    first.write(rec[:4])
    first.write(rec[4:6])
    del first  # interrupted: neither closed nor renamed
    assert not path.exists() and path.with_name("resumed.npy.partial").exists()
    with pytest.raises(UserError, match="written with other settings"):
        PriorWriter(path, 11, _meta(), resume=True)  # another count
    with pytest.raises(UserError, match="written with other settings"):
        PriorWriter(path, 10, _meta(split="other"), resume=True)
    again = PriorWriter(path, 10, _meta(), resume=True)
    assert again.done == 6
    with pytest.raises(RuntimeError, match="incomplete: 6/10"):
        again.close()
    again.write(rec[6:])
    again.close()
    assert path.read_bytes() == once.read_bytes()
    assert json.loads(sidecar_path(path).read_text()) == json.loads(sidecar_path(once).read_text())
    assert not path.with_name("resumed.npy.partial").exists()
    assert not path.with_name("resumed.npy.progress.json").exists()


def test_existing_file_needs_overwrite(prior_file: Path) -> None:
    before = prior_file.read_bytes()
    with pytest.raises(UserError, match=r"good\.npy: prior file exists; use --overwrite"):
        PriorWriter(prior_file, 6, _meta())
    assert prior_file.read_bytes() == before
    _write(prior_file, _records(6, seed=9)[0], overwrite=True)
    assert prior_file.read_bytes() != before and len(read_priors(prior_file)) == 6


# ----------------------------------------------------------------------------------------- released import
def _released_file(path: Path, count: int = 5, labels: list | None = None,
                   ) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """The released Food_Resnet.npy layout: object rows [uint8 input, 8 jet maps, jet target, label]."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    maps = rng.random((count, 8, 64, 64)) * 0.3 + 0.7 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.4) ** 2) * 8)
    targets = rng.random((count, 64, 64))
    images = rng.integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)
    rows = np.empty((count, 4), dtype=object)
    for i in range(count):
        rows[i, 0] = images[i]
        rows[i, 1] = np.stack([colorize(m) for m in maps[i]])
        rows[i, 2] = colorize(targets[i])
        rows[i, 3] = i % 3 if labels is None else labels[i]
    assert rows[0, 1].shape == (8, 64, 64, 3) and rows[0, 1].dtype == np.uint8
    np.save(path, rows, allow_pickle=True)
    return path, images, maps, targets


def test_released_import_needs_trust_pickle(tmp_path: Path, run_py, one_line_error) -> None:
    src, images, maps, targets = _released_file(tmp_path / "Food_Resnet.npy")
    out = tmp_path / "imported.npy"
    line = one_line_error(run_py("-m", "cnnprior.priors", "import", src, "--out", out, cwd=tmp_path))
    assert "pickle" in line and "--trust-pickle" in line and not out.exists()
    assert import_released(src, out, trust_pickle=True, class_names=["a", "b", "c"]) == out
    pf = read_priors(out)
    assert len(pf) == 5 and pf.size == 64 and pf.n == 8 and pf.meta["class_names"] == ["a", "b", "c"]
    t = pf.tensors()
    assert np.array_equal(pf.records["image"], images)
    assert (t["priors"].double() - torch.from_numpy(maps)).abs().mean() < 0.005
    assert (t["target"][:, 0].double() - torch.from_numpy(targets)).abs().mean() < 0.005
    assert t["label"].tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(UserError, match="prior file exists"):
        import_released(src, out, trust_pickle=True)
    with pytest.raises(UserError, match="loads without pickle"):
        import_released(out, tmp_path / "again.npy")
    # a sidecar left without its .npy is an output too: not replaced without --overwrite
    lone = tmp_path / "lone.npy"
    sidecar_path(lone).write_text("{}")
    with pytest.raises(UserError, match=r"lone\.json: prior file exists; use --overwrite"):
        import_released(src, lone, trust_pickle=True)
    assert sidecar_path(lone).read_text() == "{}" and not lone.exists()
    assert import_released(src, lone, trust_pickle=True, overwrite=True) == lone


def test_released_import_string_labels_are_sorted_class_names(tmp_path: Path, run_py) -> None:
    """npy_generation.py writes each row's class folder name: sorted unique names -> indices, names kept."""
    names = ["pizza", np.str_("bread"), "soup", np.array("bread"), np.array(["pizza"], dtype=object)]
    src, images, maps, _ = _released_file(tmp_path / "Food_Resnet.npy", labels=names)
    out = tmp_path / "food.npy"
    proc = run_py("-m", "cnnprior.priors", "import", src, "--out", out, "--trust-pickle", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}: 5 samples, S=64, n=8, 3 classes: bread, pizza, soup" in proc.stdout
    pf = read_priors(out)
    assert pf.meta["class_names"] == ["bread", "pizza", "soup"]
    assert pf.records["label"].tolist() == pf.records["explained"].tolist() == [1, 0, 2, 0, 1]
    assert np.array_equal(pf.records["image"], images)  # pixels and jet inversion unchanged by the labels
    assert (pf.tensors()["priors"].double() - torch.from_numpy(maps)).abs().mean() < 0.005
    # --classes fixes the order instead (the CNN's output order)
    again = import_released(src, tmp_path / "ordered.npy", trust_pickle=True, class_names=["soup", "pizza", "bread"])
    pf = read_priors(again)
    assert pf.meta["class_names"] == ["soup", "pizza", "bread"] and pf.records["label"].tolist() == [1, 2, 0, 2, 1]
    # integer labels (also as floats and 1-element arrays) still work
    ints = import_released(_released_file(tmp_path / "ints.npy", labels=[2, 0, np.int64(1), 4.0, np.array([3])])[0],
                           tmp_path / "ints-out.npy", trust_pickle=True)
    pf = read_priors(ints)
    assert pf.records["label"].tolist() == [2, 0, 1, 4, 3] and pf.meta["class_names"] == ["0", "1", "2", "3", "4"]


def _break_row(rows: np.ndarray, case: str) -> tuple[np.ndarray, dict]:
    """Damage row 3 of a released array in one way; returns the rows and extra import_released arguments."""
    extra: dict = {}
    if case == "maps shape":
        rows[3, 1] = rows[3, 1][:7]
    elif case == "image shape":
        rows[3, 0] = rows[3, 0][:, :32]
    elif case == "target not numeric":
        rows[3, 2] = "a jet picture"
    elif case == "values above 255":
        rows[3, 0] = rows[3, 0].astype(np.int32) + 300
    elif case == "fractional floats":
        rows[3, 1] = rows[3, 1] / 255.0
    elif case == "ragged":
        rows[3, 0] = [[1, 2], [3]]
    elif case == "label None":
        rows[3, 3] = None
    elif case == "empty name":
        rows[3, 3] = "  "
    elif case == "two labels":
        rows[3, 3] = np.array([1, 2])
    elif case == "mixed labels":
        rows[:, 3] = ["a", "b", "c", 3, "a"]
    elif case == "name not in --classes":
        rows[:, 3] = ["a", "b", "c", "zzz", "a"]
        extra["class_names"] = ["a", "b", "c"]
    elif case == "label beyond --classes":
        extra["class_names"] = ["a", "b"]
        rows[3, 3] = 7
    elif case == "negative label":
        rows[3, 3] = -1
    return rows, extra


BROKEN_ROWS = {"maps shape": "row 3: maps has shape (7, 64, 64, 3), expected (8, 64, 64, 3)",
               "image shape": "row 3: input image has shape (64, 32, 3), expected (64, 64, 3)",
               "target not numeric": "row 3: target has shape ()",
               "values above 255": "row 3: input image has values outside 0..255",
               "fractional floats": "row 3: maps holds non-integer values",
               "ragged": "row 3: input image is not a regular array",
               "label None": "row 3: label None is neither a class name nor an integer",
               "empty name": "row 3: label is an empty class name",
               "two labels": "row 3: label has 2 values",
               "mixed labels": "row 3: label 3 is a number but row 0 has the class name 'a'",
               "name not in --classes": "row 3: class name 'zzz' is not among --classes",
               "label beyond --classes": "row 3: label 7 but --classes names only 2 classes",
               "negative label": "row 3: label -1 is outside 0..32767"}


@pytest.mark.parametrize("case", list(BROKEN_ROWS))
def test_released_import_malformed_row_is_one_line(tmp_path: Path, case: str) -> None:
    src = _released_file(tmp_path / "Food_Resnet.npy")[0]
    rows, extra = _break_row(np.load(src, allow_pickle=True), case)
    np.save(src, rows, allow_pickle=True)
    out = tmp_path / "out.npy"
    with pytest.raises(UserError) as info:
        import_released(src, out, trust_pickle=True, **extra)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{src}: ") and BROKEN_ROWS[case] in msg, msg
    assert not out.exists() and not list(tmp_path.glob("out.npy.*"))  # nothing half-written is left


def test_released_import_bad_layout_through_the_cli(tmp_path: Path, run_py, one_line_error) -> None:
    src = tmp_path / "three.npy"
    np.save(src, np.array([[np.zeros((64, 64, 3)), "x", 1]] * 2, dtype=object), allow_pickle=True)
    line = one_line_error(run_py("-m", "cnnprior.priors", "import", src, "--out", tmp_path / "o.npy",
                                 "--trust-pickle", cwd=tmp_path))
    assert "expected rows of [input image, n colour maps, colour target, label]" in line and "(2, 3)" in line
    src, _, _, _ = _released_file(tmp_path / "bad.npy", labels=["a", "b", 3, "a", "b"])
    line = one_line_error(run_py("-m", "cnnprior.priors", "import", src, "--out", tmp_path / "o.npy",
                                 "--trust-pickle", cwd=tmp_path))
    assert "row 2: label 3 is a number but row 0 has the class name 'a'" in line


# ----------------------------------------------------------------------------------------- stage
def _tiny_yaml(tmp_path: Path) -> Path:
    cfg = {"name": "tiny",
           "data": {"source": "shapes", "shapes_count": 40, "image_size": 64, "val_fraction": 0.2,
                    "test_fraction": 0.2, "seed": 2},
           "cnn": {"arch": "resnet18", "epochs": 0, "batch_size": 8, "device": "cpu",
                   "checkpoint": str(tmp_path / "models" / "tiny-cnn.pt")},
           "priors": {"size": 32, "n": 4, "batch_size": 4, "splits": ["train", "test"], "train_limit": 8,
                      "test_limit": 4, "out": str(tmp_path / "npys" / "tiny"), "device": "cpu"}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_priors_stage_rejects_a_checkpoint_of_another_arch(tiny_config) -> None:
    cfg = tiny_config()
    with pytest.raises(UserError, match=r"CNN checkpoint not found; run .*--stage classifier"):
        run_priors_stage(cfg)
    other = build_cnn("mobilenet_v3_small", ["a", "b", "c", "d", "e"], 32)
    save_cnn(other, cfg.cnn_checkpoint, val_accuracy=0.0, epoch=0, config={}, dataset="shapes")
    with pytest.raises(UserError, match=r"holds a mobilenet_v3_small but the config says cnn.arch: resnet18"):
        run_priors_stage(cfg)
    wrong_size = tiny_config("cnn.arch=mobilenet_v3_small", image_size=48)
    with pytest.raises(UserError, match=r"CNN input size 32 != data.image_size 48"):
        run_priors_stage(wrong_size)


def test_train_py_priors_stage_writes_files_with_sidecars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          run_py) -> None:
    config = _tiny_yaml(tmp_path)
    monkeypatch.chdir(tmp_path)  # the stages write nothing outside their configured paths
    assert train_main(["--config", str(config), "--stage", "classifier"]) == 0  # epochs 0: the initial model
    proc = run_py(REPO / "train.py", "--config", config, "--stage", "priors", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "npys", "tiny.yaml"]
    assert train_main(["--config", str(config), "--stage", "priors"]) == 2  # exists: refuses without --overwrite
    ckpt = tmp_path / "models" / "tiny-cnn.pt"
    model, _ = load_cnn(ckpt)
    names = [n for n, _ in cam_layers(model)]
    for split, count in (("train", 8), ("test", 4)):
        path = tmp_path / "npys" / f"tiny-{split}.npy"
        pf = read_priors(path)
        m = pf.meta
        assert len(pf) == count and (m["size"], m["n"], m["split"]) == (32, 4, split)
        assert m["layers"] == names and len(names) == 20 and m["target_layer"] == "net.layer4.1"
        assert m["target"] == "final" and m["layer_outputs"] == "activated"
        assert m["excluded_layers"] == ["net.layer4.1.relu", "net.layer4.1.bn2"]  # the target's block
        assert m["positions"] == position_indices(4, 17) == [0, 6, 12, 17]
        assert m["prior_layers"][0] == ["net.layer4.0.downsample.1"] and len(m["prior_layers"][-1]) == 18
        assert m["class_names"] == ["circle", "square", "triangle", "cross", "star"] and m["has_masks"]
        assert m["cnn"]["checkpoint_sha256"] == file_sha256(ckpt) and m["config"]["name"] == "tiny"
        assert (pf.records["label"] == pf.records["index"] % 5).all()
    assert (tmp_path / "npys" / "tiny.yaml").is_file()
    # the test records equal a fresh extraction on the same images (quantisation +-1)
    pf = read_priors(tmp_path / "npys" / "tiny-test.npy")
    src = ShapesSource(40, 64, seed=2)
    loaded = [src.load(int(i)) for i in pf.records["index"]]
    images = torch.from_numpy(np.stack([im for im, _ in loaded])).permute(0, 3, 1, 2).float() / 255
    out = PriorExtractor(model, cam_layers(model), PriorSpec(size=32, n=4))(images)
    assert np.abs(to_u8(out["priors"]).astype(int) - pf.records["priors"]).max() <= 1
    assert np.abs(to_u8(out["target"]).astype(int) - pf.records["target"]).max() <= 1
    assert (pf.records["pred"] == out["pred"].numpy()).all()
    masks = torch.from_numpy(np.stack([mk for _, mk in loaded])).float()
    small = (F.interpolate(masks[:, None], size=(32, 32), mode="area")[:, 0] > 0.5).numpy()
    assert (pf.records["mask"] == small).all() and pf.records["mask"].sum() > 0
    # `info` validates and summarises
    assert main(["info", str(tmp_path / "npys" / "tiny-test.npy")]) == 0
