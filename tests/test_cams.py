"""The CAM method registry (our own methods, grad-cam classes, declared capabilities), the hooks we own
(`priors.hooks.record`) and the typed prior-file metadata (`priors.meta.PriorMeta`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cnnprior.cli import train_main
from cnnprior.cnn.layers import conv_layers
from cnnprior.core.errors import UserError
from cnnprior.priors import cams
from cnnprior.priors.cams import CamMethod, live_cams, register, unregister
from cnnprior.priors.extract import PriorExtractor, extractor_from
from cnnprior.priors.hooks import record
from cnnprior.priors.meta import PRIORS_FORMAT, PriorMeta
from cnnprior.priors.random_priors import run_random_priors_stage
from cnnprior.priors.read import read_priors
from cnnprior.priors.spec import PriorSpec
from cnnprior.priors.stage import run_priors_stage
from tests.helpers import REPO, sidecar_meta, write_priors

SCORECAM_LINE = ("priors.method: Score-CAM ('scorecam') cannot be extracted for all layers in one pass (its map needs "
                 "more than one layer's activations and gradients); one-pass methods: gradcam, gradcam++, xgradcam, "
                 "layercam, hirescam")


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------- registry
@pytest.fixture
def gradxact():
    """Our own method, registered for one test: the docs' "Add a CAM method" example."""

    @register
    class GradTimesActivation(CamMethod):
        """Sum over channels of gradient x activation (HiResCAM's map, in torch)."""

        name, title = "gradxact", "Grad x Activation"

        def raw(self, activations, gradients):
            return (activations * gradients).sum(1)

    yield GradTimesActivation
    unregister("gradxact")


def test_our_own_method_registers_and_runs_in_the_extraction_and_live(zigzag: nn.Module, gradxact) -> None:
    assert "gradxact" in cams.NAMES and cams.names(one_pass=True)[-1] == "gradxact"
    method = cams.get("gradxact")
    assert isinstance(method, gradxact) and method.needs_gradients and method.one_pass
    assert cams.title("gradxact") == "Grad x Activation"
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    layers = conv_layers(zigzag, image_size=16)
    ours = PriorExtractor(zigzag, layers, PriorSpec(size=16, method="gradxact")).layer_maps(x)[0]
    hires = PriorExtractor(zigzag, layers, PriorSpec(size=16, method="hirescam")).layer_maps(x)[0]
    assert (ours - hires).abs().max() < 1e-5  # HiResCAM is the same formula, by grad-cam's numpy
    # live single-layer maps through the grad-cam class the method gets (its one hook is `raw`)
    classes = zigzag(x).argmax(1)
    for i, (name, layer) in enumerate(layers):
        live = live_cams(zigzag, layer, x, classes, "gradxact", batch_size=2)[:, 0]
        ref = live_cams(zigzag, layer, x, classes, "hirescam", batch_size=2)[:, 0]
        assert (live - ref).abs().max() < 1e-5, name
        assert (live - ours[:, i]).abs().max() < 1e-5, name  # the extraction's map of the layer, at 16 px
    assert no_hooks(zigzag) and all(p.grad is None for p in zigzag.parameters())


def test_a_grad_cam_class_registers_by_keywords(zigzag: nn.Module) -> None:
    from pytorch_grad_cam import GradCAMElementWise

    entry = register("gradcamew", "Grad-CAM element-wise", cam=GradCAMElementWise)
    try:
        assert cams.get("gradcamew") is entry and entry.cam_class() is GradCAMElementWise
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        layers = conv_layers(zigzag, image_size=16)
        maps = PriorExtractor(zigzag, layers, PriorSpec(size=16, method="gradcamew")).layer_maps(x)[0]
        for i, (name, layer) in enumerate(layers):
            with GradCAMElementWise(zigzag, target_layers=[layer]) as cam:
                assert np.abs(cam(x, None) - maps[:, i].numpy()).max() < 1e-5, name
        with pytest.raises(ValueError, match=r"'gradcamew' is already registered"):
            register("gradcamew", "again", cam="GradCAMElementWise")
    finally:
        unregister("gradcamew")
    assert "gradcamew" not in cams.NAMES


def test_capabilities_are_declared() -> None:
    one_pass = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
    assert cams.names(one_pass=True) == one_pass and cams.DEFAULT == "gradcam"
    assert all(cams.get(m).needs_gradients for m in one_pass)
    score = cams.get("scorecam")
    assert not score.one_pass and not score.needs_gradients and score.title == "Score-CAM"
    with pytest.raises(TypeError, match="needs the title and the grad-cam class"):
        register("nameonly")


def test_unknown_method_is_one_line_with_did_you_mean() -> None:
    with pytest.raises(UserError, match=r"^priors.method: unknown CAM method 'gradcamm' \(did you mean 'gradcam'\?\)$"):
        cams.get("gradcamm")
    with pytest.raises(UserError, match=r"^gan.x: unknown CAM method 'nope' \(known: gradcam, gradcam\+\+, .*scorecam\)$"):
        cams.get("nope", "gan.x")


def test_a_method_without_one_pass_is_refused_before_any_work(zigzag: nn.Module, tiny_config) -> None:
    calls = []
    zigzag.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(UserError) as info:
        extractor_from(zigzag, PriorSpec(size=16, method="scorecam"))
    assert str(info.value) == SCORECAM_LINE
    assert not calls  # the model never ran
    # the stages: refused before the CNN checkpoint is even looked for (there is none)
    cfg = tiny_config("priors.method=scorecam", "priors.randomised_stages=[layer4]")
    assert not Path(cfg.cnn_checkpoint).exists()
    for stage in (run_priors_stage, run_random_priors_stage):
        with pytest.raises(UserError) as info:
            stage(cfg)
        assert str(info.value) == SCORECAM_LINE, stage.__name__
    # a non-one-pass method still gives live single-layer maps (grad-cam's class, extra forward passes)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    maps = live_cams(zigzag, zigzag.head, x, torch.tensor([0, 1]), "scorecam", batch_size=2)
    assert maps.shape == (2, 1, 16, 16) and 0 <= maps.min() and maps.max() <= 1


def test_the_cli_refuses_an_unknown_method_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "c.yaml"
    shutil.copy(REPO / "configs" / "shapes_resnet18.yaml", config)
    code = train_main(["--config", str(config), "--stage", "priors", "--set", "priors.method=gradcam+"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "unknown CAM method 'gradcam+' (did you mean 'gradcam++'?)" in err[0], err


# ----------------------------------------------------------------------------------------- hooks
def test_record_keeps_first_outputs_by_layer_and_gradients_and_removes_its_hooks(zigzag: nn.Module) -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    layers = [zigzag.stem, zigzag.mid, zigzag.unused, zigzag.head]
    with record(layers) as rec:
        assert all(len(m._forward_hooks) == 1 for m in layers)
        logits = zigzag(x)
        assert sorted(rec.activations) == [0, 1, 3] and rec.missing() == [2]  # `unused` never ran
        with torch.no_grad():  # (hooked modules run without gradients record nothing)
            first_mid = zigzag.mid(torch.relu(zigzag.stem(x)))
        torch.testing.assert_close(rec.activations[1], first_mid)  # `mid` ran twice: its first call
        score = logits[:, 1].sum()
        expected = torch.autograd.grad(score, rec.activations[3], retain_graph=True)[0]
        rec.backward(score)
        torch.testing.assert_close(rec.gradients[3], expected)
        assert set(rec.gradients) == {0, 1, 3} and not rec.overwritten()
        rec.clear()
        with torch.no_grad():
            zigzag(x)
        assert rec.activations == {}  # nothing is recorded without gradients
    assert no_hooks(zigzag) and rec.activations == {} and rec.gradients == {}
    assert all(p.grad is None for p in zigzag.parameters())
    zigzag.fail = True
    with pytest.raises(RuntimeError, match="on purpose"), record(layers):
        zigzag(x)
    assert no_hooks(zigzag)


def test_record_copies_outputs_that_an_inplace_op_would_overwrite() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(inplace=True))
    x = torch.randn(1, 3, 8, 8)
    with record([conv], copy=False) as rec:
        model(x)
        assert rec.overwritten() == {0} and rec.activations[0].min() >= 0  # the ReLU changed the record
    with record([conv]) as rec:
        model(x)
        assert not rec.overwritten() and rec.activations[0].min() < 0  # the ReLU changed a copy


# ----------------------------------------------------------------------------------------- metadata
def test_shipped_prior_file_parses_unchanged() -> None:
    pf = read_priors(REPO / "npys" / "fashion_resnet18-test.npy", verify=True)  # content hash checked
    m = pf.info
    assert (m.size, m.n, m.method, m.count, m.split, m.cnn.arch) == (64, 8, "gradcam", 256, "test", "resnet18")
    assert m.spec.target == "final" and m.spec.target_layer == "net.layer4.1" and m.positions[-1] == 17
    assert m.content_sha256 == "350b92daed8b076bae6416c43b1bab48279178c7b64eac881451e5f5c1ac8ebf"
    assert m.has_masks is False and len(m.class_names) == 10 and m.randomised is None


def test_metadata_of_another_version_is_one_clear_error(tmp_path: Path) -> None:
    path = write_priors(tmp_path / "p.npy", 4, seed=0)
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    assert PriorMeta.parse(meta).spec.target == "last_conv"  # `last` in files of before `final`
    sidecar.write_text(json.dumps(dict(meta, format="cnnprior-priors/2")))
    with pytest.raises(UserError, match=r"^\S+p\.json: sidecar of format 'cnnprior-priors/2', from another version of "
                                        r"cnnprior \(this version reads 'cnnprior-priors/1'\); rewrite it with this "
                                        r"version$"):
        read_priors(path)
    with pytest.raises(UserError, match=r"^here: not a cnnprior prior sidecar \(format None, expected "):
        PriorMeta.parse({"size": 8}, "here")
    with pytest.raises(UserError, match=r"^here: sidecar key 'n' is 'x', not an integer$"):
        PriorMeta.parse(dict(sidecar_meta(count=1), n="x"), "here")
    with pytest.raises(UserError, match=r"^here: malformed sidecar \(KeyError: 'seed'\)$"):
        PriorMeta.parse(sidecar_meta(count=1, randomised={"steps": 1, "stage": "fc"}), "here")
    assert PRIORS_FORMAT == "cnnprior-priors/1"
