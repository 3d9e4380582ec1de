"""Tests for cnnprior.cnn: every architecture builds, conv layers in execution order, checkpoints, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cnnprior.cnn import CNN_FORMAT, build_cnn, conv_layers, evaluate_accuracy, load_cnn, save_cnn, train_cnn
from cnnprior.config import ARCHS, to_dict
from cnnprior.data import SHAPE_CLASSES, load_split
from cnnprior.errors import UserError

# conv layers per architecture: all of them run in a forward pass (numbers from torchvision's definitions)
CONV_COUNTS = {"resnet18": 20, "resnet34": 36, "resnet50": 53, "vgg11": 8, "vgg11_bn": 8, "vgg16": 13, "vgg16_bn": 13,
               "densenet121": 120, "mobilenet_v2": 52, "mobilenet_v3_small": 52, "efficientnet_b0": 81,
               "inception_v3": 94}
HEAVY = {"vgg11_bn", "vgg16", "vgg16_bn"}  # ~130M parameters each: seconds just to initialise


def _arch_params():
    return [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY else a for a in ARCHS]


@pytest.mark.parametrize("arch", _arch_params())
def test_every_arch_builds_runs_and_lists_its_convs(arch: str) -> None:
    assert set(CONV_COUNTS) == set(ARCHS)
    size = 80 if arch == "inception_v3" else 32
    model = build_cnn(arch, ["a", "b", "c"], size).eval()
    assert model.arch == arch and model.class_names == ["a", "b", "c"] and model.image_size == size
    with torch.no_grad():
        logits = model(torch.rand(2, 3, size, size))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    convs = conv_layers(model)
    assert len(convs) == CONV_COUNTS[arch]
    assert all(isinstance(m, nn.Conv2d) for _, m in convs)
    assert len({n for n, _ in convs}) == len(convs)
    # the stem runs first; names are qualified so they resolve on the model
    modules = dict(model.named_modules())
    assert all(modules[n] is m for n, m in convs)
    assert convs[0][1].in_channels == 3


def test_build_cnn_user_errors() -> None:
    with pytest.raises(UserError, match=r"unknown architecture 'resnet9'"):
        build_cnn("resnet9", ["a", "b"], 32)
    with pytest.raises(UserError, match=r"inception_v3 needs data.image_size >= 75"):
        build_cnn("inception_v3", ["a", "b"], 64)


def test_input_normalisation_and_resize_are_built_in() -> None:
    torch.manual_seed(0)
    model = build_cnn("mobilenet_v3_small", ["a", "b"], 32).eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - mean) / std))
        big = torch.rand(1, 3, 48, 48)
        small = F.interpolate(big, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(model(big), model(small))


def test_conv_layers_follow_forward_execution_order(zigzag: nn.Module) -> None:
    model = zigzag.train()
    definition = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert definition == ["head", "unused", "mid", "block.1", "stem"]
    convs = conv_layers(model, image_size=12)
    assert [n for n, _ in convs] == ["stem", "mid", "block.1", "head"]
    assert convs[1][1] is model.mid
    # leaves the model as it found it: training mode, no hooks, no gradients
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def _perturbed(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a lost buffer would change the logits."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


def test_checkpoint_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _perturbed(build_cnn("resnet18", ["x", "y", "z"], 32)).eval()
    model.mean.fill_(0.5)
    model.std.fill_(0.25)
    path = save_cnn(model, tmp_path / "sub" / "m.pt", val_accuracy=0.75, epoch=3, config={"name": "t"},
                    dataset="shapes", history=[{"epoch": 3}])
    assert path == tmp_path / "sub" / "m.pt" and not list(path.parent.glob("*.tmp"))
    raw = torch.load(path, map_location="cpu", weights_only=True)  # loadable without unpickling code
    assert raw["format"] == CNN_FORMAT and raw["mean"] == [0.5] * 3 and raw["std"] == [0.25] * 3
    loaded, meta = load_cnn(path)
    assert not loaded.training
    assert meta["arch"] == "resnet18" and meta["class_names"] == ["x", "y", "z"] and meta["image_size"] == 32
    assert meta["val_accuracy"] == 0.75 and meta["epoch"] == 3 and meta["history"] == [{"epoch": 3}]
    assert "state_dict" not in meta
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_cnn_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"CNN checkpoint not found"):
        load_cnn(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"not a readable CNN checkpoint"):
        load_cnn(tmp_path / "junk.pt")
    torch.save({"format": "cnnprior-gan/1"}, tmp_path / "gan.pt")
    with pytest.raises(UserError, match=r"expected a CNN checkpoint \(cnnprior-cnn/1\), found 'cnnprior-gan/1'"):
        load_cnn(tmp_path / "gan.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")  # a whole module: refused by weights_only
    with pytest.raises(UserError, match=r"not a readable CNN checkpoint"):
        load_cnn(tmp_path / "pickled.pt")
    small = build_cnn("mobilenet_v3_small", ["a", "b"], 32)
    path = save_cnn(small, tmp_path / "m.pt", val_accuracy=0, epoch=0, config={}, dataset="x")
    ckpt = torch.load(path, weights_only=True)
    ckpt["arch"] = "mobilenet_v2"
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"weights do not fit arch 'mobilenet_v2'"):
        load_cnn(path)


def test_pretrained_needs_cached_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError) as info:
        build_cnn("mobilenet_v3_small", ["a", "b"], 32, pretrained=True)
    msg = str(info.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth") in msg
    assert "torchvision.models.get_model('mobilenet_v3_small', weights='DEFAULT')" in msg
    assert "cnn.pretrained: false" in msg
    # with a file in the cache (here: our own stand-in) the weights are loaded and only the head is new
    torch.manual_seed(5)
    stand_in = build_cnn("mobilenet_v3_small", [str(i) for i in range(1000)], 32).net.state_dict()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(stand_in, cache / "mobilenet_v3_small-047dcff4.pth")
    model = build_cnn("mobilenet_v3_small", ["a", "b"], 32, pretrained=True)
    state = model.net.state_dict()
    assert torch.equal(state["features.0.0.weight"], stand_in["features.0.0.weight"])
    assert torch.equal(state["classifier.0.weight"], stand_in["classifier.0.weight"])
    assert state["classifier.3.weight"].shape == (2, 1024)


def test_train_cnn_one_epoch_writes_checkpoint_with_history(tiny_config) -> None:
    cfg = tiny_config("cnn.epochs=1")
    lines: list[str] = []
    result = train_cnn(cfg, log=lines.append)
    path = Path(cfg.cnn_checkpoint)
    assert result["checkpoint"] == str(path) and path.is_file()
    model, meta = load_cnn(path)
    assert meta["epoch"] == 1 and meta["dataset"] == "shapes"
    assert meta["class_names"] == list(SHAPE_CLASSES) and meta["image_size"] == 32
    assert meta["config"] == to_dict(cfg)
    (entry,) = meta["history"]
    assert entry["epoch"] == 1 and set(entry) == {"epoch", "val_accuracy", "train_loss", "seconds"}
    assert 0.0 <= entry["val_accuracy"] <= 1.0 and entry["train_loss"] > 0
    assert meta["val_accuracy"] == entry["val_accuracy"] == result["val_accuracy"]
    assert result["history"] == meta["history"]
    val = load_split(cfg.data, "val")
    # 40 shapes (8 per class), 20 % val = 2 per class: the accuracy is a multiple of 1/10 and is reproduced
    assert len(val) == 10
    acc = evaluate_accuracy(model, DataLoader(val, batch_size=4), torch.device("cpu"))
    assert acc == meta["val_accuracy"] and acc * 10 == pytest.approx(round(acc * 10))
    assert any("epoch 1: val accuracy" in line for line in lines)


def test_train_cnn_zero_epochs_saves_initial_model(tiny_config) -> None:
    cfg = tiny_config("cnn.epochs=0", "cnn.arch=mobilenet_v3_small")
    result = train_cnn(cfg, log=lambda *_: None)
    _, meta = load_cnn(cfg.cnn_checkpoint)
    assert meta["epoch"] == 0 and meta["history"] == [] and meta["arch"] == "mobilenet_v3_small"
    assert result["val_accuracy"] == meta["val_accuracy"]
