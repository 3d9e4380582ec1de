"""Tests for cnnprior.cnn.train: every architecture builds, conv layers in execution order, checkpoints, training."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader

from cnnprior.cli import train_main
from cnnprior.cnn.importer import import_cnn, read_foreign_state
from cnnprior.cnn.layers import conv_layers
from cnnprior.cnn.model import CNN_FORMAT, build_cnn, load_cnn, save_cnn
from cnnprior.cnn.train import CNN_STATE_FORMAT, EpochBatches, cnn_paths, evaluate_accuracy, train_cnn
from cnnprior.core.config import ARCHS, load_config, to_dict
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import epoch_order
from cnnprior.data.sources.shapes import SHAPE_CLASSES
from cnnprior.data.splits import load_split
from tests.helpers import REPO, stage_cmd, subprocess_env

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


# ----------------------------------------------------------------------------------------- outputs and resume
def test_epoch_batches_follow_the_epoch_order_and_start_anywhere() -> None:
    sampler = EpochBatches(10, 4, seed=3)
    assert sampler.batches == 2 and len(sampler) == 2  # the partial third batch is dropped
    order = epoch_order(3, 1, 10).tolist()
    sampler.set_epoch(1)
    assert list(sampler) == [order[:4], order[4:8]]
    sampler.set_epoch(1, start=1)
    assert list(sampler) == [order[4:8]] and len(sampler) == 1
    one = EpochBatches(3, 8, seed=0)  # a single short batch is kept
    assert list(one) == [epoch_order(0, 0, 3).tolist()]


def _state_equal(a: object, b: object) -> bool:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _classifier_yaml(root: Path, **cnn: object) -> Path:
    """A tiny shapes classifier config (20 train images, batch 4: 5 steps per epoch) writing under root/models."""
    settings = {"arch": "mobilenet_v3_small", "epochs": 2, "batch_size": 4, "lr": 0.003, "device": "cpu",
                "checkpoint": str(root / "models" / "tiny-cnn.pt")}
    settings.update(cnn)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "data": {"source": "shapes", "shapes_count": 40, "image_size": 32,
                                                             "val_fraction": 0.2, "test_fraction": 0.2},
                                    "cnn": settings}, sort_keys=False))
    return path


def _train_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", str(config), "--stage", "classifier", *extra]


def test_classifier_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """MobileNet-V3 (dropout: the global RNG), augmentation (its own RNG), AdamW, warm-up + cosine schedule."""
    straight, killed = _classifier_yaml(tmp_path / "a", checkpoint_every=1), _classifier_yaml(tmp_path / "b",
                                                                                              checkpoint_every=1)
    kw = dict(cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # step 7 is epoch 2, batch 2: killed after training it, before its checkpoint; `last` holds step 6
    procs = [subprocess.Popen(_train_cmd(straight), env=subprocess_env(), **kw),
             subprocess.Popen(stage_cmd(killed, "classifier", "--kill-at", "7"), env=subprocess_env(), **kw)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert procs[0].returncode == 0, outs[0][1][-2000:]
    assert procs[1].returncode == -signal.SIGKILL, outs[1][1][-2000:]
    mid = torch.load(tmp_path / "b" / "models" / "tiny-cnn-last.pt", weights_only=True)
    assert mid["format"] == CNN_STATE_FORMAT and mid["train_count"] == 20
    assert (mid["progress"]["epoch"], mid["progress"]["batch"], mid["progress"]["step"]) == (1, 1, 6)
    assert mid["scheduler"]["last_epoch"] == 6 and len(mid["progress"]["history"]) == 1

    res = subprocess.run(_train_cmd(killed, "--resume"), env=subprocess_env(), timeout=300, **kw)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming at epoch 2, batch 1, step 6" in res.stdout
    a, b = (torch.load(tmp_path / d / "models" / "tiny-cnn-last.pt", weights_only=True) for d in "ab")
    assert a["progress"]["step"] == b["progress"]["step"] == 10 and a["progress"]["epoch"] == b["progress"]["epoch"] == 2
    for key in ("model", "optimizer", "scheduler", "rng", "augment_rng"):
        assert _state_equal(a[key], b[key]), key
    for pa, pb in ((a["progress"], b["progress"]), *zip(a["progress"]["history"], b["progress"]["history"],
                                                       strict=True)):
        assert {k: v for k, v in pa.items() if k not in ("seconds", "history")} == \
               {k: v for k, v in pb.items() if k not in ("seconds", "history")}
    best_a, best_b = (torch.load(tmp_path / d / "models" / "tiny-cnn.pt", weights_only=True) for d in "ab")
    assert _state_equal(best_a["state_dict"], best_b["state_dict"]) and best_a["epoch"] == best_b["epoch"]
    assert not _state_equal(best_a["state_dict"], build_cnn("mobilenet_v3_small", list(SHAPE_CLASSES), 32)
                            .net.state_dict())  # it trained


def test_classifier_outputs_need_resume_or_overwrite(tiny_config, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_config("cnn.epochs=1", "cnn.arch=mobilenet_v3_small")
    paths = cnn_paths(cfg)
    assert paths["last"].name == "tiny-cnn-last.pt" and paths["yaml"].name == "tiny-cnn.yaml"
    with pytest.raises(UserError, match=r"tiny-cnn-last\.pt: no classifier state to resume from; drop --resume"):
        train_cnn(cfg, resume=True, log=lambda *_: None)
    train_cnn(cfg, log=lambda *_: None)
    before = {k: p.read_bytes() for k, p in paths.items()}
    with pytest.raises(UserError, match=r"tiny-cnn\.pt: classifier outputs exist; use --resume to continue, "
                                        r"--overwrite to retrain"):
        train_cnn(cfg, log=lambda *_: None)
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    # a resolved config alone (its checkpoint moved away) is an output too
    moved = {k: paths[k].rename(paths[k].with_name("kept-" + paths[k].name)) for k in ("best", "last")}
    with pytest.raises(UserError, match=r"tiny-cnn\.yaml: classifier outputs exist"):
        train_cnn(cfg, log=lambda *_: None)
    for key, path in moved.items():
        path.rename(paths[key])
    # resuming a finished run changes nothing; another lr is refused; a setting that changes no number is not
    lines: list[str] = []
    train_cnn(tiny_config("cnn.epochs=1", "cnn.arch=mobilenet_v3_small", "cnn.checkpoint_every=5"), resume=True,
              log=lines.append)
    assert "nothing to do (1 of 1 epochs done)" in lines[-2]
    assert {k: p.read_bytes() for k, p in paths.items() if k != "yaml"} == {k: v for k, v in before.items()
                                                                             if k != "yaml"}
    with pytest.raises(UserError, match=r"was trained with cnn\.lr: 0\.001 but the config says 0\.01; keep it"):
        train_cnn(tiny_config("cnn.epochs=1", "cnn.arch=mobilenet_v3_small", "cnn.lr=0.01"), resume=True)
    with pytest.raises(UserError, match=r"was trained with data\.shapes_count: 40 but the config says 50"):
        train_cnn(tiny_config("cnn.epochs=1", "cnn.arch=mobilenet_v3_small", "data.shapes_count=50"), resume=True)
    # --overwrite retrains from scratch: rewritten files, and (same seed) the same weights again
    train_cnn(cfg, overwrite=True, log=lambda *_: None)
    assert paths["best"].read_bytes() != before["best"]  # its recorded training seconds differ
    old, new = (torch.load(io.BytesIO(before["best"]), weights_only=True),
                torch.load(paths["best"], weights_only=True))
    assert old["epoch"] == new["epoch"] == 1 and _state_equal(old["state_dict"], new["state_dict"])


def test_train_py_classifier_refuses_and_stage_all_skips(tmp_path: Path, monkeypatch, capsys) -> None:
    config = _classifier_yaml(tmp_path, epochs=0)
    assert train_main(["--config", str(config), "--stage", "classifier"]) == 0
    ckpt = tmp_path / "models" / "tiny-cnn.pt"
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert train_main(["--config", str(config), "--stage", "classifier"]) == 2
    assert "classifier outputs exist" in capsys.readouterr().err and ckpt.read_bytes() == before
    ran: list[str] = []
    monkeypatch.setattr("cnnprior.cli.run_priors_stage", lambda *a, **k: ran.append("priors"))
    monkeypatch.setattr("cnnprior.cli.run_gan_stage", lambda *a, **k: ran.append("gan"))
    assert train_main(["--config", str(config)]) == 0
    assert f"classifier: {ckpt} exists, skipping" in capsys.readouterr().out
    assert ran == ["priors", "gan"] and ckpt.read_bytes() == before


# ----------------------------------------------------------------------------------------- your own CNN
@pytest.fixture
def foreign(tmp_path: Path) -> dict:
    """A torchvision resnet18 (4 classes, seeded, non-trivial batch-norm statistics) saved as a plain state_dict."""
    from torchvision.models import resnet18

    torch.manual_seed(7)
    net = _perturbed(resnet18(num_classes=4)).eval()
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "classes.txt").write_text("cat\ndog\n\nbird\nfish\n")
    return {"net": net, "weights": tmp_path / "sd.pt", "classes": tmp_path / "classes.txt"}


def test_import_torchvision_state_dict_gives_the_same_logits(foreign: dict, tmp_path: Path, run_py,
                                                              one_line_error) -> None:
    out = tmp_path / "models" / "mine-cnn.pt"
    args = ["-m", "cnnprior.cnn", "import", "--arch", "resnet18", "--weights", foreign["weights"], "--classes",
            foreign["classes"], "--image-size", "48", "--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.25", "0.3",
            "--out", out]
    proc = run_py(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"wrote {out}: resnet18, 4 classes, 48 px"
    model, meta = load_cnn(out)
    assert meta["format"] == CNN_FORMAT and meta["arch"] == "resnet18" and meta["image_size"] == 48
    assert meta["class_names"] == ["cat", "dog", "bird", "fish"] and meta["val_accuracy"] is None
    assert meta["mean"] == pytest.approx([0.5, 0.4, 0.3]) and meta["std"] == pytest.approx([0.2, 0.25, 0.3])
    assert meta["imported_from"] == str(foreign["weights"]) and len(meta["imported_sha256"]) == 64
    x = torch.rand(2, 3, 48, 48)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), foreign["net"]((x - mean) / std), rtol=0, atol=1e-5)
    # never replaced without --overwrite
    before = out.read_bytes()
    line = one_line_error(run_py(*args, cwd=tmp_path))
    assert f"{out}: exists; use --overwrite" in line and out.read_bytes() == before
    import_cnn("resnet18", foreign["weights"], foreign["classes"], 64, out, overwrite=True)
    assert load_cnn(out)[1]["image_size"] == 64


def test_import_unwraps_common_containers(foreign: dict, tmp_path: Path) -> None:
    state = foreign["net"].state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "wrapped.pt")
    got = read_foreign_state(tmp_path / "wrapped.pt")
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    old_style = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # pre-0.4 torchvision
    torch.save(old_style, tmp_path / "old.pt")
    assert import_cnn("resnet18", tmp_path / "old.pt", foreign["classes"], 32, tmp_path / "old-cnn.pt").is_file()


def test_import_full_model_only_with_trust_pickle(foreign: dict, tmp_path: Path) -> None:
    torch.save(foreign["net"], tmp_path / "full.pt")
    with pytest.raises(UserError, match=r"full\.pt: holds pickled Python objects \(torchvision\.models\.resnet\.ResNet:"
                                        r" a whole model\?\).*--trust-pickle"):
        import_cnn("resnet18", tmp_path / "full.pt", foreign["classes"], 32, tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()
    out = import_cnn("resnet18", tmp_path / "full.pt", foreign["classes"], 32, tmp_path / "a.pt", trust_pickle=True)
    assert torch.equal(load_cnn(out)[0].net.fc.weight, foreign["net"].fc.weight)


def _import_error(foreign: dict, tmp_path: Path, case: str) -> str:
    """The UserError message of one bad import."""
    from torchvision.models import mobilenet_v3_small, resnet18

    arch, weights, classes, size = "resnet18", foreign["weights"], foreign["classes"], 32
    if case == "arch not supported":
        arch = "vit_b_16"
    elif case == "other arch's keys":
        weights = tmp_path / "mnv3.pt"
        torch.save(mobilenet_v3_small(num_classes=4).state_dict(), weights)
    elif case == "wrong depth":
        arch = "resnet34"
    elif case == "one channel":
        net = resnet18(num_classes=4)
        net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        weights = tmp_path / "gray.pt"
        torch.save(net.state_dict(), weights)
    elif case == "head size":
        classes = tmp_path / "three.txt"
        classes.write_text("a\nb\nc\n")
    elif case == "duplicate class":
        classes = tmp_path / "dup.txt"
        classes.write_text("a\nb\na\nc\n")
    elif case == "no classes file":
        classes = tmp_path / "none.txt"
    elif case == "not torch":
        weights = foreign["classes"]
    elif case == "inception too small":
        arch, size = "inception_v3", 64
    with pytest.raises(UserError) as info:
        import_cnn(arch, weights, classes, size, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    return str(info.value)


IMPORT_ERRORS = {
    "arch not supported": "--arch 'vit_b_16': not importable; the torchvision architectures with 3-channel input",
    "other arch's keys": "keys do not fit torchvision resnet18: missing conv1.weight, bn1.weight, bn1.bias (+",
    "wrong depth": "keys do not fit torchvision resnet34: missing layer1.2.conv1.weight",
    "one channel": "the resnet18 takes 1-channel input (conv1.weight); only 3-channel (RGB) CNNs can be imported",
    "head size": "the classification head (fc.weight) has 4 outputs but --classes lists 3 names",
    "duplicate class": "dup.txt: class name 'a' appears more than once",
    "no classes file": "none.txt: class-names file not found",
    "not torch": "classes.txt: not a PyTorch weights file",
    "inception too small": "--image-size 64: must be 75..1024 for inception_v3",
}


@pytest.mark.parametrize("case", list(IMPORT_ERRORS))
def test_import_errors_are_one_line(foreign: dict, tmp_path: Path, case: str) -> None:
    msg = _import_error(foreign, tmp_path, case)
    assert "\n" not in msg and IMPORT_ERRORS[case] in msg, msg


def test_own_cnn_readme_path_from_state_dict_to_explained_images(foreign: dict, tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    """README "Your own CNN": import -> priors on an image folder -> GAN -> lsft_inference --images --cnn."""
    from PIL import Image

    from cnnprior.cnn.importer import main as cnn_main
    from cnnprior.explain import inference

    monkeypatch.chdir(tmp_path)
    rng = torch.Generator().manual_seed(0)
    for name in ("bird", "cat", "dog", "fish"):  # class folders named as in classes.txt
        (tmp_path / "data" / "mine" / name).mkdir(parents=True)
        for i in range(5):
            pixels = (torch.rand(40, 40, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / "mine" / name / f"{i}.png")
    (tmp_path / "photos").mkdir()
    for stem in ("holiday", "my dog"):
        Image.fromarray((torch.rand(50, 60, 3, generator=rng) * 255).to(torch.uint8).numpy()).save(
            tmp_path / "photos" / f"{stem}.png")
    assert cnn_main(["import", "--arch", "resnet18", "--weights", str(foreign["weights"]), "--classes",
                     str(foreign["classes"]), "--image-size", "32", "--out", "models/mine-cnn.pt"]) == 0
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({
        "name": "mine", "data": {"source": "imagefolder", "root": "data/mine", "image_size": 32, "val_fraction": 0.2,
                                 "test_fraction": 0.2},
        "cnn": {"arch": "resnet18", "checkpoint": "models/mine-cnn.pt", "device": "cpu"},
        "priors": {"size": 16, "n": 4, "batch_size": 8, "device": "cpu"},
        "gan": {"width": 8, "depth": 1, "cond_channels": 8, "cond_hidden": 8, "disc_width": 8, "disc_layers": 2,
                "epochs": 1, "batch_size": 4, "device": "cpu"}}))
    before = Path("models/mine-cnn.pt").read_bytes()
    assert train_main(["--config", "mine.yaml"]) == 0  # all stages: the imported classifier is kept
    assert "classifier: models/mine-cnn.pt exists, skipping" in capsys.readouterr().out
    assert Path("models/mine-cnn.pt").read_bytes() == before
    assert inference.main(["--images", "photos", "--cnn", "models/mine-cnn.pt", "--checkpoint", "models/mine-lsft.pt",
                           "--out", "outputs/mine", "--quiet"]) == 0
    m = json.loads(Path("outputs/mine/metrics.json").read_text())
    assert m["count"] == 2 and [Path(e["source"]).name for e in m["per_image"]] == ["holiday.png", "my dog.png"]
    assert all(e["class"] in ("cat", "dog", "bird", "fish") for e in m["per_image"])
    assert [e["file"] for e in m["per_image"]] == [f"0000_holiday_{m['per_image'][0]['class']}.png",
                                                   f"0001_my_dog_{m['per_image'][1]['class']}.png"]


def test_bn_momentum_reaches_every_batch_norm_and_the_running_statistics() -> None:
    """cnn.bn_momentum: MobileNet-V3 ships momentum 0.01; 0.1 moves the running statistics ten times as fast, so a
    short run from scratch is not evaluated with its initial statistics."""
    from torch import nn

    from cnnprior.cnn.model import set_bn_momentum
    torch.manual_seed(0)
    model = build_cnn("mobilenet_v3_small", ["a", "b"], 64)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {m.momentum for m in norms} == {0.01}
    assert set_bn_momentum(model, 0.1) == len(norms) and {m.momentum for m in norms} == {0.1}
    first = norms[0]
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 64, 64) + 3.0)  # inputs far from the initial mean 0
    assert float(first.running_mean.abs().max()) > 0.05  # 0.01 would leave it at a tenth of that
    assert load_config(None, ["cnn.bn_momentum=0.1"]).cnn.bn_momentum == 0.1
    assert load_config(None, []).cnn.bn_momentum == -1.0
