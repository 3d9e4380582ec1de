"""Adding a generator is one file: tests/toy_generator.py defines `ToyGenerator(Generator, name="toy")`, and the GAN
stage, its checkpoints, `cnnprior explain --variant toy`, the Python API and the evaluation (fidelity, the image-only
control) pick it up by that name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cnnprior import cli
from cnnprior.cnn.layers import conv_layers
from cnnprior.cnn.model import build_cnn, save_cnn
from cnnprior.core.config import load_config
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import file_sha256
from cnnprior.evaluate.config import generator_keys, load_eval_config
from cnnprior.evaluate.run import main as evaluate_main
from cnnprior.evaluate.run import run_evaluation
from cnnprior.explain.api import Explainer
from cnnprior.explain.inference import Options, run
from cnnprior.gan.checkpoint import load_generator
from cnnprior.gan.models import base, get, names
from cnnprior.gan.train import run_gan_stage
from cnnprior.priors.extract import PriorExtractor
from cnnprior.priors.priorfile import PRIORS_FORMAT, PriorWriter, make_records
from cnnprior.priors.read import read_priors
from cnnprior.priors.spec import PriorSpec
from tests.helpers import gan_config
from tests.toy_generator import ToyGenerator

SIZE, N, COUNT, PX, CLASSES = 16, 4, 8, 64, ["a", "b", "c"]


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    """The toy generator is registered while this module runs (importing its file did it), and not after."""
    assert get("toy") is ToyGenerator
    yield
    base.REGISTRY.pop("toy", None)


def _prior_file(path: Path, cnn_path: Path, model: torch.nn.Module, seed: int, split: str) -> Path:
    """COUNT images' priors and targets from the real extractor, as the priors stage writes them."""
    extractor = PriorExtractor(model, conv_layers(model), PriorSpec(size=SIZE, n=N))
    images = torch.rand(COUNT, 3, PX, PX, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(COUNT) % len(CLASSES)
    meta = {"format": PRIORS_FORMAT, **extractor.spec.as_dict(), **extractor.describe(), "split": split,
            "dataset": "noise", "class_names": CLASSES, "has_masks": False, "config": {},
            "cnn": {"arch": "resnet18", "checkpoint": str(cnn_path), "checkpoint_sha256": file_sha256(cnn_path),
                    "image_size": PX, "val_accuracy": 0.5}}
    writer = PriorWriter(path, COUNT, meta)
    writer.write(make_records(extractor(images, labels), images, labels, torch.zeros(COUNT, PX, PX),
                              torch.arange(COUNT), SIZE, N, with_mask=False))
    return writer.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A CNN, its test and val prior files, and three GAN-stage runs: toy, its image-only control, and LSFT."""
    root = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    model = build_cnn("resnet18", CLASSES, image_size=PX).eval()
    cnn = save_cnn(model, root / "models" / "tiny-cnn.pt", val_accuracy=0.5, epoch=0, config={}, dataset="noise")
    test = _prior_file(root / "npys" / "tiny-test.npy", cnn, model, seed=1, split="test")
    val = _prior_file(root / "npys" / "tiny-val.npy", cnn, model, seed=2, split="val")
    ckpts = {}
    for key, gan in (("toy", {"variant": "toy"}), ("lsft", {}),
                     ("control", {"variant": "toy", "priors": "none", "out": str(root / "models" / "toy-control")})):
        cfg = load_config(gan_config(root / key, test, val, epochs=2, **gan))
        run_gan_stage(cfg, log=lambda _m: None)
        ckpts[key] = f"{cfg.gan_prefix}.pt"
    return {"root": root, "cnn": cnn, "test": test, "val": val, "ckpts": ckpts}


def test_the_toy_is_registered_by_name_and_trained_by_the_gan_stage(world):
    assert "toy" in names(adversarial=True) and "toy_l1" in generator_keys()
    model, meta = load_generator(world["ckpts"]["toy"], expect_variant="toy")
    assert type(model) is ToyGenerator and not model.training and model.config() == {"n_priors": N}
    assert (meta.variant, meta.size, meta.n, meta.generator_config) == ("toy", SIZE, N, {"n_priors": N})
    assert meta.epoch in (1, 2) and len(meta.history) == 2 and meta.gan["variant"] == "toy"  # the best epoch
    with pytest.raises(UserError, match="is a toy checkpoint; use cnnprior explain --variant toy"):
        load_generator(world["ckpts"]["toy"], expect_variant="lsft")
    with pytest.raises(UserError, match="'tyo' is not a registered generator \\(did you mean 'toy'\\?\\)"):
        get("tyo")


def test_explain_the_toy_with_the_api_the_inference_run_and_the_cli(world, tmp_path):
    ex = Explainer.from_checkpoints(world["ckpts"]["toy"], device="cpu", variant="toy")
    t = read_priors(world["test"]).tensors()
    maps = ex.generate(t["image"], t["priors"])
    assert maps.shape == (COUNT, 1, SIZE, SIZE) and 0 <= float(maps.min()) <= float(maps.max()) <= 1
    folder, metrics = run(Options(variant="toy", checkpoint=world["ckpts"]["toy"], priors=str(world["test"]),
                                  device="cpu", out=str(tmp_path / "run"), quiet=True, learned=[]))
    assert metrics["count"] == COUNT and metrics["variant"] == "toy" and (folder / "sheet.png").is_file()
    assert cli.main(["explain", "--variant", "toy", "--checkpoint", world["ckpts"]["toy"], "--priors",
                     str(world["test"]), "--device", "cpu", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    saved = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert saved["variant"] == "toy" and saved["count"] == COUNT


def test_evaluate_the_toy_beside_lsft_with_its_image_only_control(world):
    root, ckpts = world["root"], world["ckpts"]
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "name": "toy", "priors": str(world["test"]), "lsft": ckpts["lsft"], "explainers": {"toy": ckpts["toy"]},
        "num": COUNT, "batch_size": 4, "device": "cpu", "sections": ["control"],
        "control": {"toy": ckpts["control"], "speed_num": 4}}))
    cfg = load_eval_config(config)
    assert cfg.explainers == {"lsft": ckpts["lsft"], "toy": ckpts["toy"]}  # report order: the registry's
    assert evaluate_main(["--config", str(config), "--out", str(root / "report")]) == 0
    m = json.loads((root / "report" / "metrics.json").read_text())
    assert {"LSFT", "TOY"} <= set(m["fidelity"]) and set(m["gans"]) == {"LSFT", "TOY"}
    assert m["fidelity"]["TOY"]["margin"]["over"]  # its margin over the best trivial baseline
    control = m["control"]
    assert set(control["controls"]) == {"TOY control"}
    assert set(control["margins"]) == {"LSFT − TOY control", "TOY − TOY control"}
    assert control["controls"]["TOY control"]["differences"]["TOY"] == []  # same recipe, only the priors zeroed
    report = (root / "report" / "report.md").read_text()
    assert "TOY − TOY control" in report and "TOY: `" in report
    bad = root / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "priors": str(world["test"]), "toy": ckpts["toy"], "num": COUNT,
                                   "device": "cpu", "sections": ["control"], "control": {"toy": ckpts["toy"]}}))
    with pytest.raises(UserError, match="control.toy: .* was trained with gan.priors: cnn, not an image-only"):
        run_evaluation(load_eval_config(bad), str(root / "bad-report"), log=lambda _m: None)
