"""Tests for the Python API (cnnprior.explain.api): `Explainer` against the `lsft_inference.py --images` run folder,
its output contract, `GANCAM` with pytorch-grad-cam's utilities and metrics, and a generator-only `Explainer`.

Hermetic and small: a random resnet18 at 64 px (3 classes), an LSFT generator (width 8, S=16, n=4) trained for
100 steps to imitate the mean of its priors (so its maps respond to the priors, unlike an untrained one whose
output sits at 0.5 +- 0.03), synthetic-shapes images; everything is written under pytest's tmp folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import cnnprior
from cnnprior.cnn.layers import final_layer, last_block
from cnnprior.cnn.model import build_cnn, load_cnn, save_cnn
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import atomic_torch_save
from cnnprior.data.sources.shapes import ShapesSource
from cnnprior.explain import inference
from cnnprior.explain.api import GANCAM, Explainer, Explanation
from cnnprior.gan.checkpoint import GAN_FORMAT, load_generator
from cnnprior.gan.data import priors_meta
from cnnprior.gan.models import build_generator
from cnnprior.maps.metrics import fidelity, pearson
from cnnprior.present.viz import colorize, invert_colormap
from cnnprior.priors.extract import extractor_from
from cnnprior.priors.priorfile import records_tensors
from cnnprior.priors.read import read_priors
from cnnprior.priors.spec import PriorSpec
from tests.helpers import SIZE, N, write_priors

CLASSES = ["circle", "square", "triangle"]
IMG = 64  # the CNN's input size: resnet18's last block is 2x2 there, so the Grad-CAM target is not constant
COUNT = 5  # images explained

# What a map survives on its way through a jet-coloured PNG: `colorize` stores index round(255 m) (<= 0.5/255
# off), and `invert_colormap` gives back that index exactly, except for jet's repeated pure blue (indices 29..32
# share one colour and invert to their mean 30.5: <= 1.5/255 more). Bilinear resizing is a convex combination, so
# the bound also holds for an inverted map resized to the input size. The few 1e-6 are float32 arithmetic.
PNG_TOL = 2.0 / 255.0 + 1e-6


def _train_generator(t: dict[str, torch.Tensor], steps: int = 100) -> torch.nn.Module:
    """A tiny LSFT generator fitted (L1, Adam) to the prior file's target, the mean of the priors (~2 s)."""
    torch.manual_seed(0)
    g = build_generator("lsft", N, 8, 1, 8, 8)
    opt = torch.optim.Adam(g.parameters(), lr=3e-3)
    for _ in range(steps):
        i = torch.randint(0, len(t["image"]), (8,))
        loss = (g(t["image"][i], t["priors"][i]) - t["target"][i]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return g.eval()


def _save_generator(path: Path, g: torch.nn.Module, pmeta: dict) -> Path:
    """A generator checkpoint with the entries gan/train.py's checkpoints carry for inference."""
    return atomic_torch_save({"format": GAN_FORMAT, "variant": "lsft", "generator_config": g.config(),
                              "generator": {k: v.detach().clone() for k, v in g.state_dict().items()},
                              "epoch": 1, "step": 100, "config": {"gan": {"variant": "lsft"}}, "priors_meta": pmeta,
                              "metrics": {}, "history": []}, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A CNN checkpoint, a generator checkpoint whose priors_meta matches the CNN's layers (and one whose
    doesn't), the prior file it was fitted on, and COUNT uint8 shapes images at the CNN's input size."""
    root = tmp_path_factory.mktemp("api")
    train = write_priors(root / "npys" / "tiny-train.npy", 64, seed=1)
    pf = read_priors(train)
    pm = priors_meta(pf, [str(train)])
    g = _train_generator(pf.tensors())
    with torch.no_grad():
        fitted = pearson(g(*(pf.tensors()[k] for k in ("image", "priors"))), pf.tensors()["target"]).mean().item()
    assert fitted > 0.8, f"the tiny generator failed to fit its priors (r={fitted:.3f}); the tests below need it"

    torch.manual_seed(0)
    cnn = build_cnn("resnet18", CLASSES, image_size=IMG)
    cnn_path = save_cnn(cnn, root / "models" / "tiny-cnn.pt", val_accuracy=0.5, epoch=0, config={}, dataset="shapes")
    spec = PriorSpec(size=SIZE, n=N)
    described = extractor_from(cnn, spec).describe()
    img_pm = {**pm, **spec.as_dict(), "cnn_arch": "resnet18", "layers": described["layers"],
              "target_layer": described["target_layer"], "prior_layers": described["prior_layers"]}
    src = ShapesSource(COUNT, IMG, seed=3)
    pixels = np.stack([src.load(i)[0] for i in range(COUNT)])  # (COUNT, IMG, IMG, 3) uint8
    return {"root": root, "train": train, "cnn": cnn_path, "pixels": pixels,
            "gen": _save_generator(root / "models" / "img-lsft.pt", g, img_pm),
            "gen_other_layers": _save_generator(root / "models" / "tiny-lsft.pt", g, pm)}


@pytest.fixture(scope="module")
def ex(world: dict) -> Explainer:
    return Explainer.from_checkpoints(generator=world["gen"], cnn=world["cnn"], device="cpu")


@pytest.fixture(scope="module")
def images(world: dict) -> torch.Tensor:
    """The shapes images as the API takes them: float (B, 3, IMG, IMG) = uint8 / 255."""
    return torch.from_numpy(world["pixels"]).permute(0, 3, 1, 2).float() / 255.0


def gan_at_s(ex: Explainer, e: Explanation) -> torch.Tensor:
    """The generator's maps (B, 1, S, S) for an explanation's records (what the inference CLI colours)."""
    t = records_tensors(e.records, ex.size)
    return ex.generate(t["image"], t["priors"])


def upsample(maps: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B, S, S) -> (B, H, W), bilinear as the API resizes."""
    m = torch.as_tensor(np.asarray(maps, dtype=np.float32))[:, None]
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


# ----------------------------------------------------------------------------------------- vs the CLI
def test_explainer_maps_equal_the_inference_cli_maps(world, ex, images, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, px in enumerate(world["pixels"]):
        Image.fromarray(px).save(folder / f"img{i}.png")
    out = tmp_path / "run"
    assert inference.main(["--images", str(folder), "--cnn", str(world["cnn"]), "--checkpoint", str(world["gen"]),
                           "--out", str(out), "--device", "cpu", "--quiet"], variant="lsft") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["count"] == COUNT and (m["size"], m["n"]) == (SIZE, N) and m["input"] == "images"
    per = m["per_image"]
    assert [Path(p["source"]).name for p in per] == [f"img{i}.png" for i in range(COUNT)]

    e = ex.explain(images)
    assert e.maps.shape == (COUNT, IMG, IMG)
    assert float(e.maps.std(axis=(1, 2)).min()) > 0.02  # real maps: the PNG tolerance below is not vacuous
    # the samples: same images, classes and probabilities
    assert [p["explained"] for p in per] == e.classes.tolist()
    assert [p["pred"] for p in per] == e.predicted.tolist()
    assert [p["class"] for p in per] == [CLASSES[k] for k in e.classes]
    assert np.allclose([p["prob"] for p in per], e.probs, atol=1e-6)  # metrics.json keeps 6 decimals

    pred = gan_at_s(ex, e)  # (B, 1, S, S)
    target = torch.from_numpy(e.records["target"]).float()[:, None] / 255.0
    direct = fidelity(pred, target)  # the CLI scores its GAN map against the Grad-CAM target at S
    assert np.allclose([p["gan"]["l1"] for p in per], direct["l1"].numpy(), atol=2e-6)
    assert np.allclose([p["gan"]["r"] for p in per], direct["r"].numpy(), atol=2e-6)
    assert float(direct["r"].abs().max()) > 0.05  # scores of non-trivial maps, not 0 = 0

    for i, p in enumerate(per):
        # at S: the run's pictures are exactly the Explainer's maps coloured (and its records' images)
        assert np.array_equal(read_png(out / "inputs" / p["file"]), e.records["image"][i])
        gan_png = read_png(out / "gan" / p["file"])
        assert gan_png.shape == (SIZE, SIZE, 3)
        assert np.array_equal(gan_png, colorize(pred[i, 0].numpy()))
        assert np.array_equal(read_png(out / "gradcam" / p["file"]), colorize(e.records["target"][i] / 255.0))
        gan_s = invert_colormap(gan_png)
        assert np.abs(gan_s - pred[i, 0].numpy()).max() <= PNG_TOL
        # at the input size: ex(images) is the CLI's map resized (bilinear) from S to the image
        assert np.abs(upsample(gan_s[None], (IMG, IMG))[0] - e.maps[i]).max() <= PNG_TOL
        gradcam_s = invert_colormap(read_png(out / "gradcam" / p["file"]))
        assert np.abs(upsample(gradcam_s[None], (IMG, IMG))[0] - e.gradcam[i]).max() <= PNG_TOL
    assert np.array_equal(ex(images), e.maps)  # __call__ is explain(...).maps


# ----------------------------------------------------------------------------------------- output contract
@pytest.mark.parametrize("shape", [(2, 3, IMG, IMG), (3, 3, 40, 56), (1, 3, SIZE, SIZE), (2, 3, 97, 33),
                                   (1, 3, SIZE, 24)])
def test_maps_are_float32_in_0_1_at_the_input_size(ex, shape) -> None:
    torch.manual_seed(1)
    x = torch.rand(*shape)
    b, _, h, w = shape
    e = ex.explain(x)
    for maps in (e.maps, e.gradcam):
        assert isinstance(maps, np.ndarray) and maps.dtype == np.float32 and maps.shape == (b, h, w)
        assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    assert e.priors.dtype == np.float32 and e.priors.shape == (b, N, h, w)
    assert e.priors.min() >= 0.0 and e.priors.max() <= 1.0
    assert e.classes.dtype == np.int64 and e.predicted.dtype == np.int64 and e.probs.dtype == np.float32
    assert e.classes.shape == e.predicted.shape == e.probs.shape == (b,)
    assert np.array_equal(e.classes, e.predicted)  # no targets: the predicted class is explained
    assert ((e.probs > 1.0 / len(CLASSES) - 1e-6) & (e.probs <= 1.0)).all()  # the argmax's softmax
    assert len(e.records) == b and e.records["image"].shape == (b, SIZE, SIZE, 3)
    # the maps are the generator's S x S maps resized to the input (identical when the input is S x S)
    assert np.abs(e.maps - upsample(gan_at_s(ex, e)[:, 0], (h, w))).max() <= 1e-6
    assert np.abs(e.gradcam - upsample(e.records["target"] / 255.0, (h, w))).max() <= 1e-6


def test_targets_choose_the_explained_class(ex, images) -> None:
    e0 = ex.explain(images)
    targets = (e0.predicted + 1 + np.arange(COUNT) % 2) % len(CLASSES)  # both other classes, never the predicted
    e1 = ex.explain(images, targets=targets.tolist())
    assert np.array_equal(e1.classes, targets)
    assert np.array_equal(e1.predicted, e0.predicted)  # the prediction does not move
    with torch.no_grad():
        logits = ex.model(ex.preprocess(images))
    probs = torch.softmax(logits, 1)
    assert np.allclose(e1.probs, probs[torch.arange(COUNT), torch.from_numpy(targets)].numpy(), atol=1e-5)
    assert np.allclose(e0.probs, probs.max(1).values.numpy(), atol=1e-5)
    # another class, other priors, another map: for every image (target != predicted for all of them here)
    diff = np.abs(e1.maps - e0.maps).max(axis=(1, 2))
    assert (diff > 0.02).all(), diff
    assert not np.array_equal(e1.records["priors"], e0.records["priors"])
    # the predicted class given explicitly (list or tensor) is the default explanation
    assert np.array_equal(ex(images, targets=torch.from_numpy(e0.predicted)), e0.maps)
    assert np.array_equal(ex(images, targets=e0.predicted.tolist()), e0.maps)
    assert np.array_equal(ex(images, targets=torch.from_numpy(targets)), e1.maps)


def test_model_of_preprocess_is_the_cnn(world, ex, images) -> None:
    cnn, meta = load_cnn(world["cnn"])  # an independent TargetCNN: RGB in [0, 1] -> logits
    assert ex.class_names == CLASSES == meta["class_names"]
    torch.manual_seed(2)
    for x in (images, torch.rand(2, 3, 40, 56), torch.rand(1, 3, 128, 128)):
        inp = ex.preprocess(x)
        assert inp.shape == (len(x), 3, IMG, IMG)
        with torch.no_grad():
            ours, theirs = ex.model(inp), cnn(x)
        assert ours.shape == (len(x), len(CLASSES))
        assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    # unprocess undoes the normalisation
    assert torch.allclose(ex.unprocess(ex.preprocess(images)), images, atol=1e-6)
    with torch.no_grad():
        assert np.array_equal(ex.explain(images).predicted, ex.model(ex.preprocess(images)).argmax(1).numpy())


def test_bad_input_is_a_value_or_type_error(world, ex, images) -> None:
    """A library user gets ValueError / TypeError for bad tensors and arguments; a checkpoint of the wrong kind is a
    UserError (the command lines' one-line error)."""
    bad = {ValueError: [images[0], images[:, :1], torch.rand(2, 4, IMG, IMG)],
           TypeError: [images.numpy(), images.tolist(), None]}
    for kind, inputs in bad.items():
        for x in inputs:
            for call in (ex, ex.explain, ex.records, ex.preprocess):
                with pytest.raises(kind, match=r"images: expected a float tensor \(B, 3, H, W\)"):
                    call(x)
    for targets in ([0], [0] * (COUNT + 1), []):
        with pytest.raises(ValueError, match=f"targets: {len(targets)} classes for {COUNT} images"):
            ex(images, targets=targets)
    cam = GANCAM(ex)
    with pytest.raises(ValueError, match="aug_smooth"):
        cam(input_tensor=ex.preprocess(images), aug_smooth=True)
    with pytest.raises(TypeError, match="ClassifierOutputTarget"):
        cam(input_tensor=ex.preprocess(images), targets=[lambda out: out[0]] * COUNT)
    with pytest.raises(UserError, match="is a lsft checkpoint"):
        Explainer.from_checkpoints(generator=world["gen"], cnn=world["cnn"], device="cpu", variant="gsft")


def test_any_height_when_the_width_equals_s(ex) -> None:
    assert ex(torch.rand(1, 3, 24, SIZE)).shape == (1, 24, SIZE)


def test_out_of_range_target_is_a_value_error(ex, images) -> None:
    with pytest.raises(ValueError, match="targets: classes must be in"):
        ex(images[:2], targets=[len(CLASSES), 0])
    with pytest.raises(ValueError, match="targets: classes must be in"):
        ex(images[:2], targets=[-1, 0])
    with pytest.raises(TypeError, match="uint8"):
        ex((images[:2] * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"images: values span \[0, 2.*expected RGB in \[0, 1\]"):
        ex(images[:2] * 2)
    with pytest.raises(TypeError, match="targets: class indices must be integers, got torch.float"):
        ex(images[:2], targets=[0.7, 1.2])


def test_mismatched_layers_are_noted(world, ex) -> None:
    assert ex.notes == []
    other = Explainer.from_checkpoints(generator=world["gen_other_layers"], cnn=world["cnn"], device="cpu")
    assert len(other.notes) == 1 and "conv layers" in other.notes[0]


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "vgg11_bn", "resnet34"])
def test_a_cnn_of_another_architecture_gets_its_own_target_and_block(world, arch, tmp_path) -> None:
    """--images with any --cnn: a generator fitted to ResNet-18 priors explains another architecture with that
    CNN's own final feature map as the target and that CNN's last block left out (never ResNet-18's layer names)."""
    torch.manual_seed(0)
    other = build_cnn(arch, CLASSES, image_size=IMG)
    path = save_cnn(other, tmp_path / f"{arch}-cnn.pt", val_accuracy=0.5, epoch=0, config={}, dataset="shapes")
    ex2 = Explainer.from_checkpoints(generator=world["gen"], cnn=path, device="cpu")
    d = ex2.extractor.describe()
    assert d["target_layer"] == final_layer(other, IMG)[0] and d["left_out_blocks"] == last_block(
        other, d["target_layer"], IMG)
    assert len(ex2.notes) == 1 and f"arch {arch} vs resnet18" in ex2.notes[0]
    maps = ex2(torch.from_numpy(world["pixels"][:2]).permute(0, 3, 1, 2).float() / 255)
    assert maps.shape == (2, IMG, IMG) and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_package_exports() -> None:
    assert cnnprior.Explainer is Explainer and cnnprior.GANCAM is GANCAM and cnnprior.Explanation is Explanation


# ----------------------------------------------------------------------------------------- GANCAM
def test_gancam_follows_the_grad_cam_protocol(ex, images) -> None:
    cam = GANCAM(ex)
    assert cam.model is ex.model
    x = ex.preprocess(images)
    plain = cam(input_tensor=x, targets=None)
    with GradCAM(model=ex.model, target_layers=[ex.model.layer4[-1]]) as gradcam:
        reference = gradcam(input_tensor=x, targets=None)  # what pytorch-grad-cam returns for the same input
    assert type(plain) is type(reference) and plain.dtype == reference.dtype == np.float32
    assert plain.shape == reference.shape == (COUNT, IMG, IMG)
    assert plain.min() >= 0.0 and plain.max() <= 1.0
    # the GAN map of the images preprocess came from: unprocess(preprocess(x)) is x to ~6e-8, which can at most
    # flip the uint8 rounding of a stray prior pixel (1/255); measured here: identical maps
    assert np.abs(plain - ex(images)).max() <= 1 / 255

    e0 = ex.explain(images)
    classes = [int(k) for k in (e0.predicted + 1 + np.arange(COUNT) % 2) % len(CLASSES)]
    targeted = cam(input_tensor=x, targets=[ClassifierOutputTarget(k) for k in classes])
    assert np.abs(targeted - ex(images, targets=classes)).max() <= 1 / 255
    assert np.abs(targeted - plain).max(axis=(1, 2)).min() > 0.02  # the targets were used

    # input at another size: preprocess resizes to the CNN's input, the maps come at input_tensor's size
    torch.manual_seed(3)
    x2 = ex.preprocess(torch.rand(2, 3, 40, 56))
    maps2 = cam(input_tensor=x2)
    assert maps2.shape == (2, IMG, IMG) and maps2.dtype == np.float32
    assert np.abs(maps2 - ex(ex.unprocess(x2))).max() <= 1e-6

    with GANCAM(ex) as ctx:
        assert isinstance(ctx, GANCAM)
        again = ctx(input_tensor=x, targets=[ClassifierOutputTarget(k) for k in classes])
    assert np.array_equal(again, targeted)


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")  # grad-cam's ROAD
def test_gancam_maps_work_with_show_cam_on_image_and_road(ex, images) -> None:
    cam = GANCAM(ex)
    x = ex.preprocess(images)
    classes = [int(k) for k in ex.explain(images).predicted]
    targets = [ClassifierOutputTarget(k) for k in classes]
    grayscale = cam(input_tensor=x, targets=targets)

    rgb = ex.unprocess(x)[0].permute(1, 2, 0).cpu().numpy().astype(np.float32)
    vis = show_cam_on_image(rgb, grayscale[0], use_rgb=True)
    assert vis.dtype == np.uint8 and vis.shape == (IMG, IMG, 3)
    flat = show_cam_on_image(rgb, np.zeros_like(grayscale[0]), use_rgb=True)
    assert np.abs(vis.astype(int) - flat.astype(int)).max() > 20  # the GAN map shows in the overlay

    torch.manual_seed(0)  # the ROAD imputer adds torch noise
    metric = ROADMostRelevantFirst(percentile=50)
    scores = metric(x, grayscale, targets, ex.model)
    assert isinstance(scores, np.ndarray) and scores.shape == (COUNT,) and np.isfinite(scores).all()
    torch.manual_seed(0)
    again, perturbed = metric(x, grayscale, targets, ex.model, return_visualization=True)
    assert np.array_equal(again, scores)
    # the score is the explained logit after imputing the most relevant half minus before
    with torch.no_grad():
        before, after = ex.model(x), ex.model(perturbed)
    k = torch.tensor(classes)
    expected = (after[torch.arange(COUNT), k] - before[torch.arange(COUNT), k]).numpy()
    assert np.allclose(scores, expected, atol=1e-4)
    for i in range(COUNT):
        keep = torch.from_numpy(grayscale[i] < np.percentile(grayscale[i], 50))
        changed = (perturbed[i] != x[i]).any(0)
        assert not changed[keep].any()  # the less relevant half is untouched
        # the most relevant half is imputed: every changed pixel lies at or above the median (ties at the median
        # make that set one or a few pixels more than half, depending on the float order of the map)
        assert 0.4 < changed.float().mean().item() <= (~keep).float().mean().item()


# ----------------------------------------------------------------------------------------- generator only
def test_generator_only_explainer_generates_but_refuses_images(world, images) -> None:
    exg = Explainer.from_checkpoints(generator=world["gen"], cnn=None, device="cpu", batch_size=3)
    assert exg.cnn is None and (exg.size, exg.n) == (SIZE, N)
    t = read_priors(world["train"]).tensors(slice(0, 10))
    out = exg.generate(t["image"], t["priors"])
    assert out.shape == (10, 1, SIZE, SIZE) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.min() >= 0.0 and out.max() <= 1.0
    gen, _ = load_generator(world["gen"], "lsft")
    with torch.no_grad():
        reference = gen(t["image"], t["priors"])  # one batch of 10 vs the explainer's batches of 3
    assert torch.allclose(out, reference, atol=1e-6)
    assert pearson(out, t["target"]).mean().item() > 0.8  # it imitates the prior file's target
    assert exg.generate(t["image"][:0], t["priors"][:0]).shape == (0, 1, SIZE, SIZE)

    for call in (exg, exg.explain, exg.records, exg.preprocess):
        with pytest.raises(ValueError, match="no CNN"):
            call(images)
    with pytest.raises(ValueError, match="no CNN"):
        exg(images, targets=[0] * COUNT)
    with pytest.raises(ValueError, match="no CNN"):
        _ = exg.model
    with pytest.raises(ValueError, match="no CNN"):
        GANCAM(exg)
