"""Generators of several CNNs: training files mixed by CNN, validation on several CNNs' val files, the CNNs a
generator saw recorded in its checkpoint, and the explain-time note for an architecture it never saw."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnprior.core.config import load_config
from cnnprior.core.errors import UserError
from cnnprior.explain.api import layer_differences
from cnnprior.gan.checkpoint import load_generator
from cnnprior.gan.data import load_gan_data
from tests.helpers import REPO, gan_config, subprocess_env, write_priors


def _cnn(arch: str) -> dict:
    return {"arch": arch, "checkpoint": f"models/{arch}-cnn.pt", "checkpoint_sha256": "0" * 64, "image_size": 32,
            "val_accuracy": 0.9}


@pytest.fixture()
def zoo(tmp_path: Path) -> dict:
    npys = tmp_path / "npys"
    return {"root": tmp_path,
            "train": [write_priors(npys / "a-train.npy", 30, seed=1, cnn=_cnn("resnet18")),
                      write_priors(npys / "b-train.npy", 12, seed=2, cnn=_cnn("mobilenet_v2"))],
            "val": [write_priors(npys / "a-val.npy", 10, seed=3, split="val", cnn=_cnn("resnet18")),
                    write_priors(npys / "b-val.npy", 6, seed=4, split="val", cnn=_cnn("mobilenet_v2"))],
            "test": write_priors(npys / "b-test.npy", 6, seed=5, split="test", cnn=_cnn("mobilenet_v2"))}


def test_train_per_file_weighs_each_cnn_equally_and_val_uses_every_file(zoo: dict) -> None:
    cfg = load_config(gan_config(zoo["root"], zoo["train"], zoo["val"][0], train_per_file=12,
                                 val_more=[str(zoo["val"][1])], val_limit=8))
    train, val, meta = load_gan_data(cfg)
    assert len(train) == 24 and len(val) == 8 + 6  # 12 of each CNN; val capped per file
    first = write_priors(zoo["root"] / "again.npy", 30, seed=1, cnn=_cnn("resnet18"))  # same content as a-train
    from cnnprior.priors.read import read_priors
    ref_a, ref_b = read_priors(first).tensors(slice(0, 12)), read_priors(zoo["train"][1]).tensors(slice(0, 12))
    assert torch.equal(train.priors[:12], (ref_a["priors"] * 255).round().to(torch.uint8))
    assert torch.equal(train.priors[12:], (ref_b["priors"] * 255).round().to(torch.uint8))
    assert [c["arch"] for c in meta["cnns"]] == ["resnet18", "mobilenet_v2"]
    assert meta["cnns"][1]["files"] == [str(zoo["train"][1])]
    assert meta["val_files"] == [str(p) for p in zoo["val"]]
    whole, _, meta1 = load_gan_data(load_config(gan_config(zoo["root"], zoo["train"], zoo["val"][0])))
    assert len(whole) == 42 and "val_files" not in meta1  # 0 = every record, one val file as before


def test_leave_out_and_only_pick_cnns_by_architecture_or_checkpoint(zoo: dict) -> None:
    loo = load_config(gan_config(zoo["root"], zoo["train"], zoo["val"][0], val_more=[str(zoo["val"][1])],
                                 leave_out=["mobilenet_v2"]))
    train, val, meta = load_gan_data(loo)
    assert (len(train), len(val)) == (30, 10) and [c["arch"] for c in meta["cnns"]] == ["resnet18"]
    assert meta["val_file"] == str(zoo["val"][0]) and "val_files" not in meta
    only = load_config(gan_config(zoo["root"], zoo["train"], zoo["val"][0], val_more=[str(zoo["val"][1])],
                                  only=["models/mobilenet_v2-cnn.pt"]))
    train, val, meta = load_gan_data(only)
    assert (len(train), len(val)) == (12, 6) and meta["val_file"] == str(zoo["val"][1])
    assert meta["train_files"] == [str(zoo["train"][1])]
    typo = load_config(gan_config(zoo["root"], zoo["train"], zoo["val"][0], leave_out=["mobilenet"]))
    with pytest.raises(UserError, match=r"gan.leave_out: 'mobilenet' is no CNN of the gan.train files \(their "
                                        r"architectures: mobilenet_v2, resnet18"):
        load_gan_data(typo)
    none = load_config(gan_config(zoo["root"], zoo["train"], zoo["val"][0], leave_out=["resnet18", "mobilenet_v2"]))
    with pytest.raises(UserError, match=r"leave no gan.train file"):
        load_gan_data(none)


def test_a_test_file_among_the_validation_files_is_refused(zoo: dict) -> None:
    cfg = load_config(gan_config(zoo["root"], zoo["train"], zoo["val"][0], val_more=[str(zoo["test"])]))
    with pytest.raises(UserError, match=r"b-test.npy: gan.val is a test-split prior file"):
        load_gan_data(cfg)
    cfg = load_config(gan_config(zoo["root"], zoo["train"], zoo["val"][0], val_more=["nope-val.npy"]))
    with pytest.raises(UserError, match=r"nope-val.npy: validation prior file not found"):
        load_gan_data(cfg)


def test_a_generator_of_two_cnns_records_them_and_explains_either(zoo: dict) -> None:
    config = gan_config(zoo["root"], zoo["train"], zoo["val"][0], train_per_file=12, val_more=[str(zoo["val"][1])])
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config), "--stage", "gan"],
                          cwd=zoo["root"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, meta = load_generator(zoo["root"] / "models" / "tiny-lsft.pt")
    pm = meta["priors_meta"]
    assert [c["arch"] for c in pm["cnns"]] == ["resnet18", "mobilenet_v2"]
    described = {"layers": [], "target_layer": "x", "prior_layers": []}
    assert layer_differences(described, pm, "mobilenet_v2") == []
    assert layer_differences(described, pm, "resnet18") == []
    assert layer_differences(described, pm, "vgg11_bn") == [
        "arch vgg11_bn, which the generator never saw (it saw resnet18, mobilenet_v2)"]
    one = {**pm, "cnns": pm["cnns"][:1]}  # a generator of one CNN: the old per-layer comparison
    assert any(d.startswith("arch vgg11_bn vs resnet18") for d in layer_differences(described, one, "vgg11_bn"))
