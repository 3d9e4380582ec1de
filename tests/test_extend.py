"""The extension examples of docs/development.md, run as they stand on that page: a generator, a CAM method, an
evaluation section and a data source, each one block of code registered by name where it is defined."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cnnprior.cnn.layers import conv_layers
from cnnprior.cnn.model import build_cnn
from cnnprior.core.config import load_config
from cnnprior.core.errors import UserError
from cnnprior.data import splits
from cnnprior.evaluate import sections
from cnnprior.evaluate.sections import base as section_base
from cnnprior.gan.models import base as generator_base
from cnnprior.present.report import Report
from cnnprior.priors import cams
from cnnprior.priors.extract import PriorExtractor
from cnnprior.priors.spec import PriorSpec

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "development.md"


def example(heading: str) -> str:
    """The python block under `### <heading>` in docs/development.md."""
    text = GUIDE.read_text()
    part = text.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", part, flags=re.S)
    assert len(blocks) == 1, f"{heading}: expected one python block, found {len(blocks)}"
    return blocks[0]


def run_example(heading: str, name: str) -> types.ModuleType:
    """Execute the example as a module of its own (dataclasses and registries see a real module)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(example(heading), f"{GUIDE}:{heading}", "exec"), module.__dict__)
    return module


@pytest.fixture()
def guide_generator():
    yield run_example("Add a generator", "guide_generator")
    generator_base.REGISTRY.pop("mixer", None)


def test_the_generator_example_registers_builds_and_maps(guide_generator):
    cls = generator_base.get("mixer")
    assert cls is guide_generator.Mixer and not cls.adversarial
    gan = load_config(None, ["gan.variant=mixer"]).gan
    g = cls.from_config(gan, n_priors=4)
    with torch.no_grad():
        out = g(torch.rand(2, 3, 16, 16), torch.rand(2, 4, 16, 16))
    assert out.shape == (2, 1, 16, 16) and 0 <= float(out.min()) <= float(out.max()) <= 1
    assert g.config() == {"n_priors": 4}


@pytest.fixture()
def guide_cams():
    yield run_example("Add a CAM method", "guide_cams")
    for name in ("gradtimesact", "eigengradcam"):
        cams.unregister(name)


def test_the_cam_example_extracts_priors_and_the_grad_cam_class_is_refused_for_extraction(guide_cams):
    torch.manual_seed(0)
    model = build_cnn("resnet18", ["a", "b", "c"], image_size=32).eval()
    images, classes = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    ours = PriorExtractor(model, conv_layers(model), PriorSpec(size=8, n=4, method="gradtimesact"))(images, classes)
    hires = PriorExtractor(model, conv_layers(model), PriorSpec(size=8, n=4, method="hirescam"))(images, classes)
    assert torch.allclose(ours["priors"], hires["priors"], atol=1e-5)  # HiResCAM's map is sum(grad x act)
    assert cams.get("gradtimesact").title == "Gradient x Activation"
    assert not cams.get("eigengradcam").one_pass
    with pytest.raises(UserError, match="eigengradcam"):
        PriorExtractor(model, conv_layers(model), PriorSpec(size=8, n=4, method="eigengradcam"))


@pytest.fixture()
def guide_section():
    yield run_example("Add an evaluation section", "guide_section")
    section_base.SECTIONS.pop("centre", None)
    section_base.OPTIONS.pop("centre", None)


def test_the_section_example_registers_runs_and_renders(guide_section, tmp_path):
    assert "centre" in sections.selectable_names()
    section = section_base.SECTIONS["centre"]
    maps = torch.zeros(3, 1, 8, 8)
    maps[:, :, 3:5, 3:5] = 1.0  # all of the mass in the centre
    maps[2, :, 0, 0] = 4.0  # image 2: half of it in a corner
    ctx = SimpleNamespace(options=lambda name: guide_section.CentreOptions(), data={"target": maps})
    results = section().run(ctx)
    assert results == {"radius": 0.25, "target_share": pytest.approx((1 + 1 + 0.5) / 3)}
    report = Report("t")
    section().render(report, results, tmp_path, ctx)
    assert "0.833" in report.markdown()


@pytest.fixture()
def guide_source():
    yield run_example("Add a data source", "guide_source")
    splits.OPENERS.pop("stripes", None)


def test_the_data_source_example_is_opened_by_name_and_split(guide_source):
    cfg = load_config(None, ["data.source=stripes", "data.image_size=16", "data.shapes_count=40"]).data
    view = splits.load_split(cfg, "train")
    item = view[0]
    assert item["image"].shape == (3, 16, 16) and item["label"] in (0, 1)
    assert float(item["image"].min()) == 0.0 and float(item["image"].max()) == 1.0  # black and white stripes
    assert splits.open_source(cfg).class_names == ["horizontal", "vertical"]
    bad = load_config(None, ["data.source=stripse"]).data
    with pytest.raises(UserError, match="did you mean 'stripes'"):
        splits.open_source(bad)
