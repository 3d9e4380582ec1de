"""Tests for the sanity checks: scores in cnnprior.evaluate.sanity (hand-checked values), the image-only control generator
(`gan.priors: none`), section options, and a tiny end-to-end evaluation with the mprt / prior_swap / control /
gridpg sections."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from cnnprior.cnn.model import build_cnn, save_cnn
from cnnprior.core.config import load_config
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import file_sha256
from cnnprior.evaluate import sanity
from cnnprior.evaluate.config import load_eval_config
from cnnprior.evaluate.run import main
from cnnprior.evaluate.sanity import (
    average_ranks,
    cell_masks,
    energy_in_cell,
    format_ci,
    grid_images,
    mean_ci,
    mprt,
    mprt_verdict,
    pointing_chance,
    sample_grids,
    smooth_maps,
    spearman_abs,
    swap_donors,
)
from cnnprior.evaluate.sections import EvalContext
from cnnprior.gan.checkpoint import MaskedInputGenerator, load_generator
from cnnprior.gan.data import load_gan_data
from cnnprior.gan.train import run_gan_stage
from cnnprior.maps import metrics
from cnnprior.maps.ops import resize_maps
from cnnprior.priors.cams import live_cams
from cnnprior.priors.extract import extractor_from
from cnnprior.priors.priorfile import PRIORS_FORMAT, PriorWriter, make_records
from cnnprior.priors.spec import spec_from_sidecar
from tests.helpers import gan_config

CLASSES = ["a", "b", "c", "d", "e"]
SIZE, N, R = 16, 4, 64  # maps, priors, CNN input (64 px: resnet18's final map is 2x2, not a constant 1x1)


def _rho(a: list[float], b: list[float]) -> float:
    return float(spearman_abs(torch.tensor([a]), torch.tensor([b]))[0])


# ----------------------------------------------------------------------------------------- scores
def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist() == [[3.5, 1.0, 3.5, 2.0]]
    assert average_ranks(torch.tensor([[5.0, 5.0, 5.0]])).tolist() == [[2.0, 2.0, 2.0]]


def test_spearman_hand_cases():
    assert _rho([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2 / (4*15)
    # ties: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): cov 4.5, var 4.5 and 5 -> 4.5 / sqrt(22.5) = 3 / sqrt(10)
    assert _rho([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    assert _rho([-3, 1, 2], [3, 1, 2]) == pytest.approx(1.0)  # of absolute values
    assert _rho([4, 3, 2, 1], [1, 2, 3, 4]) == pytest.approx(-1.0)
    assert _rho([0, 0, 0, 0], [1, 2, 3, 4]) == 0  # no rank order
    maps = torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(spearman_abs(maps, maps ** 3), torch.ones(3, dtype=torch.float64))  # monotone


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 5, (4, 30), generator=g).float(), torch.randint(0, 7, (4, 30), generator=g).float()
    ours = spearman_abs(a, b)
    for i in range(4):
        assert float(ours[i]) == pytest.approx(stats.spearmanr(a[i].numpy(), b[i].numpy())[0], abs=1e-12)


def test_energy_in_cell_hand_grid():
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                      [1.0, 1.0, 0.0, 2.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [0.0, -5.0, 0.0, 0.0]]).expand(4, 1, 4, 4)
    # positive energy 6: top-left 4, top-right 2, the negative value in the bottom-left cell counts for nothing
    assert energy_in_cell(m, torch.arange(4)).tolist() == pytest.approx([4 / 6, 2 / 6, 0.0, 0.0])
    assert energy_in_cell(torch.zeros(1, 4, 4), torch.tensor([2])).tolist() == [0.0]
    assert energy_in_cell(torch.ones(4, 1, 6, 6), torch.arange(4)).tolist() == pytest.approx([0.25] * 4)
    masks = cell_masks(torch.tensor([3]), 4)[0, 0]
    assert masks.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_grid_layout():
    cells = torch.arange(4).float().view(1, 4, 1, 1, 1).expand(1, 4, 1, 2, 2)
    assert grid_images(cells)[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_chance_level_is_the_mask_fraction():
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:6, 3:5] = 1  # 8 of 64 pixels
    assert pointing_chance(mask).tolist() == [0.125]
    # a uniform random point hits with that probability: one-hot maps at random points, pointing game
    g = torch.Generator().manual_seed(0)
    points = torch.randint(0, 64, (20000,), generator=g)
    maps = torch.zeros(20000, 64).scatter_(1, points.view(-1, 1), 1.0).view(-1, 8, 8)
    hits = metrics.pointing_game(maps, mask.expand(20000, 8, 8))
    assert float(hits.mean()) == pytest.approx(0.125, abs=0.01)
    # and the energy share of a uniform map
    assert float(metrics.energy_pointing_game(torch.ones(1, 8, 8), mask)[0]) == pytest.approx(0.125)


def test_bootstrap_interval_brackets_the_mean_and_shrinks():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.5, 0.2, 20), rng.normal(0.5, 0.2, 2000)
    for values in (small, large):
        s = mean_ci(values)
        assert s["lo"] < s["mean"] < s["hi"] and s["n"] == len(values)
        assert s["mean"] == pytest.approx(values.mean())
    assert (mean_ci(large)["hi"] - mean_ci(large)["lo"]) < 0.3 * (mean_ci(small)["hi"] - mean_ci(small)["lo"])
    assert mean_ci([1.0, math.nan, 3.0])["n"] == 2 and mean_ci([1.0, math.nan, 3.0])["mean"] == 2.0
    empty = mean_ci([])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and format_ci(empty) == "–"
    assert format_ci({"mean": 0.5, "lo": 0.25, "hi": 0.75, "n": 3}) == "0.500 [0.250, 0.750]"


def test_smooth_maps_blur_in_range():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 1, 16, 16, generator=g)
    for sigma in sanity.SMOOTHING_SIGMAS:
        s = smooth_maps(maps, sigma)
        assert s.shape == maps.shape and float(s.amin()) == 0 and float(s.amax()) == pytest.approx(1.0)
        assert s.diff(dim=-1).abs().mean() < maps.diff(dim=-1).abs().mean()
    assert float(smooth_maps(torch.zeros(1, 1, 16, 16), 4).abs().max()) == 0


def test_sample_grids_four_kept_classes():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    keep = torch.tensor([True, False, True, True, True, False, True, True, False, False])
    idx, cells = sample_grids(labels, keep, num=9, seed=3)
    assert idx.shape == (9, 4) and cells.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert all(keep[idx].flatten()) and all(len(set(labels[row].tolist())) == 4 for row in idx)
    assert torch.equal(idx, sample_grids(labels, keep, num=9, seed=3)[0])
    keep[6:] = False  # classes 0, 1, 2 only
    assert sample_grids(labels, keep, num=9, seed=3)[0].shape == (0, 4)


def test_swap_donors():
    classes = torch.tensor([0, 0, 0, 1, 1, 2])
    same = swap_donors(classes, same_class=True, seed=0)
    for i, j in enumerate(same.tolist()):
        assert (j == -1) if i == 5 else (j != i and classes[j] == classes[i])
    anyc = swap_donors(classes, same_class=False, seed=0)
    assert all(j != i and j >= 0 for i, j in enumerate(anyc.tolist()))
    assert torch.equal(anyc, swap_donors(classes, same_class=False, seed=0))


def test_confident_correct():
    class Toy(torch.nn.Module):
        """Logits = 10 x the mean of each colour channel: the class is the brightest channel."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 10 * x.mean((2, 3)) * self.w

    images = torch.zeros(3, 3, 4, 4)
    images[0, 0], images[1, 1], images[2, 2] = 1.0, 1.0, 0.05
    keep, p = sanity.confident_correct(Toy(), images, torch.tensor([0, 2, 2]), 0.9, batch_size=2)
    assert keep.tolist() == [True, False, False]  # wrong class; right class but p ~ 0.37
    assert float(p[0]) == pytest.approx(math.exp(10) / (math.exp(10) + 2))


def test_mprt_verdict_criterion():
    stages = ["fc", "layer4", "layer3"]
    ref = [1.0, 0.16, 0.17, -0.09]
    fails = mprt_verdict({"GAN": [1.0, 0.61, 0.61, 0.49], "ref": ref}, stages, "GAN", "ref")
    assert not fails["passes"] and fails["failed_steps"] == [1, 2, 3]
    # gaps 0.45, 0.44, 0.58: the largest at step 3 (randomised down to layer3)
    assert fails["worst_step"] == 3 and fails["worst_stage"] == "layer3"
    assert fails["worst_gap"] == pytest.approx(0.58)
    ok = mprt_verdict({"GAN": [1.0, 0.26, 0.20, 0.0], "ref": ref}, stages, "GAN", "ref")  # +0.10 exactly passes
    assert ok["passes"] and ok["failed_steps"] == []
    one = mprt_verdict({"GAN": [1.0, 0.2, 0.3, 0.0], "ref": ref}, stages, "GAN", "ref")
    assert not one["passes"] and one["failed_steps"] == [2]
    text = sanity.verdict_sentence(fails, {"GAN": [1.0, 0.61, 0.61, 0.49], "ref": ref})
    assert "GAN fails MPRT" in text and "3 of 3" in text and "+0.580 at step 3" in text and "`layer3`" in text


@pytest.fixture(scope="module")
def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_cnn("resnet18", CLASSES, image_size=64).eval()


def _cam_and_image_maps(images: torch.Tensor, classes: torch.Tensor):
    """maps_of for mprt: live Grad-CAM of layer3 (reads the CNN) and the image's gray level (does not)."""

    def maps_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        cam = live_cams(model, model.net.layer3[-1], images, classes, "gradcam", batch_size=4)
        return {"cam": cam, "image": images.mean(1, keepdim=True)}

    return maps_of


def test_mprt_deterministic_and_image_only_method_never_falls(small_cnn):
    g = torch.Generator().manual_seed(0)
    images, classes = torch.rand(4, 3, 64, 64, generator=g), torch.tensor([0, 1, 2, 3])
    fn = _cam_and_image_maps(images, classes)
    a, b = mprt(small_cnn, fn, seed=1, steps=3), mprt(small_cnn, fn, seed=1, steps=3)
    assert a["stages"] == ["fc", "layer4", "layer3", "layer2", "layer1", "stem"]
    assert [s["randomised"] for s in a["steps"]] == ["none", "fc", "layer4", "layer3"]
    for sa, sb in zip(a["steps"], b["steps"], strict=True):
        for key in ("spearman", "ssim"):
            for m in sa[key]:
                assert torch.equal(torch.nan_to_num(sa[key][m], 9.0), torch.nan_to_num(sb[key][m], 9.0)), (key, m)
    for s in a["steps"]:  # the image-only method is identical at every step
        assert s["spearman"]["image"].tolist() == pytest.approx([1.0] * 4)
    assert a["steps"][0]["spearman"]["cam"].tolist() == pytest.approx([1.0] * 4)
    assert a["steps"][0]["ssim"]["cam"].tolist() == pytest.approx([1.0] * 4)
    c = mprt(small_cnn, fn, seed=2, steps=3)
    assert not torch.equal(torch.nan_to_num(a["steps"][3]["spearman"]["cam"], 9.0),
                           torch.nan_to_num(c["steps"][3]["spearman"]["cam"], 9.0))
    # the step-0 maps do not depend on the seed: handed in, they give the same result
    d = mprt(small_cnn, fn, seed=2, steps=3, ref=a["ref"])
    for sc, sd in zip(c["steps"], d["steps"], strict=True):
        assert torch.equal(torch.nan_to_num(sc["spearman"]["cam"], 9.0), torch.nan_to_num(sd["spearman"]["cam"], 9.0))


def test_explain_batched_fixes_the_class(small_cnn):
    ex = extractor_from(small_cnn, spec_from_sidecar({"size": SIZE, "n": N, "target": "final"}))
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for c in range(3):
        fixed = torch.full((3,), c)
        out = sanity.explain_batched(ex, images, fixed, batch_size=2)
        direct = ex(images, classes=fixed)
        assert out["priors"].shape == (3, N, SIZE, SIZE) and out["target"].shape == (3, 1, SIZE, SIZE)
        assert torch.allclose(out["target"][:, 0], sanity.quantise(direct["target"]))
        assert torch.equal(direct["explained"], fixed)


def _stub_ctx(kind: str) -> EvalContext:
    """12 images whose target is the mean of their priors; one stub GAN that copies either the priors' mean
    (it follows the CNN) or the image's gray level (it reads only the image: then the target is the gray)."""
    g = torch.Generator().manual_seed(0)
    image, priors = torch.rand(12, 3, 8, 8, generator=g), torch.rand(12, N, 8, 8, generator=g)
    follow = kind == "priors"

    def model(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return p.mean(1, keepdim=True) if follow else x.mean(1, keepdim=True)

    target = model(image, priors)
    gan = SimpleNamespace(label="STUB", model=model, maps=target.clone())
    data = {"image": image, "priors": priors, "target": target, "explained": torch.arange(12) % 3}
    return EvalContext(SimpleNamespace(batch_size=5), None, data, 12, None, {}, [gan], torch.device("cpu"), [],
                       lambda _m: None)


@pytest.mark.parametrize("kind", ["priors", "image"])
def test_prior_swap_on_stub_generators(kind):
    from cnnprior.evaluate.sections.swap import PriorSwapSection

    res = PriorSwapSection().run(_stub_ctx(kind))
    for donors in res["donors"].values():
        s = donors["gans"]["STUB"]
        assert s["unswapped_r"]["mean"] == pytest.approx(1.0)
        if kind == "priors":  # the map is the donor's target exactly
            assert s["r_donor"]["mean"] == pytest.approx(1.0) and s["donor_minus_own"]["lo"] > 0
        else:  # the map ignores the swapped priors: still its own target
            assert s["r_own"]["mean"] == pytest.approx(1.0) and s["donor_minus_own"]["hi"] < 0
    assert res["donors"]["same class"]["pairs"] == 12 and res["donors"]["any class"]["pairs"] == 12


# ----------------------------------------------------------------------------------------- tiny world
def _images16(count: int, seed: int) -> torch.Tensor:
    """16 px images (quantised like a prior file), each with a bright square on noise."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, SIZE, SIZE, generator=g) * 0.4
    for i in range(count):
        y, x = torch.randint(0, 10, (2,), generator=g).tolist()
        images[i, i % 3, y:y + 6, x:x + 6] = 0.95
    return torch.round(images * 255) / 255


def _decisive_cnn(images32: torch.Tensor) -> torch.nn.Module:
    """A random resnet18 whose fc separates these images' centred features: varied, confident predictions."""
    torch.manual_seed(0)
    model = build_cnn("resnet18", CLASSES, image_size=R).eval()
    feats: dict[str, torch.Tensor] = {}
    hook = model.net.avgpool.register_forward_hook(lambda m, i, o: feats.setdefault("f", o.flatten(1)))
    with torch.no_grad():
        model(images32)
    hook.remove()
    f = feats["f"]
    w = torch.randn(len(CLASSES), f.shape[1], generator=torch.Generator().manual_seed(1)) / f.std(0).clamp_min(1e-6)
    with torch.no_grad():
        model.net.fc.weight.copy_(3 * w)
        model.net.fc.bias.copy_(-(3 * w) @ f.mean(0))
    return model


def _prior_file(path: Path, model, cnn_path: Path, images16: torch.Tensor, split: str) -> Path:
    """Priors made the way the priors stage makes them; labels := the CNN's predictions (all correct)."""
    ex = extractor_from(model, spec_from_sidecar({"size": SIZE, "n": N, "target": "final",
                                                  "layer_outputs": "activated"}))
    out = ex(resize_maps(images16, R))
    meta = {"format": PRIORS_FORMAT, **ex.spec.as_dict(), **ex.describe(), "split": split, "dataset": "noise",
            "class_names": CLASSES, "has_masks": False,
            "cnn": {"arch": "resnet18", "checkpoint": str(cnn_path), "checkpoint_sha256": file_sha256(cnn_path),
                    "image_size": R, "val_accuracy": 1.0}, "config": {}}
    writer = PriorWriter(path, len(images16), meta)
    writer.write(make_records(out, images16, out["pred"], torch.zeros(len(images16), SIZE, SIZE),
                              torch.arange(len(images16)), SIZE, N, with_mask=False))
    return writer.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A decisive CNN, test and val prior files, tiny LSFT/GSFT generators and an image-only LSFT control."""
    root = tmp_path_factory.mktemp("sanity")
    test16, val16 = _images16(16, 0), _images16(16, 1)
    model = _decisive_cnn(resize_maps(torch.cat([test16, val16]), R))
    cnn_path = save_cnn(model, root / "models" / "tiny-cnn.pt", val_accuracy=1.0, epoch=0, config={},
                        dataset="noise")
    test = _prior_file(root / "npys" / "tiny-test.npy", model, cnn_path, test16, "test")
    val = _prior_file(root / "npys" / "tiny-val.npy", model, cnn_path, val16, "val")
    ckpts = {}
    for key, extra in (("lsft", {}), ("gsft", {"variant": "gsft"}), ("control", {"priors": "none",
                                                                                 "out": str(root / "models" / "ctl")})):
        cfg = load_config(gan_config(root / key, val, val, epochs=1, **extra))
        ckpts[key] = run_gan_stage(cfg, log=lambda _m: None)["last"]
    return {"root": root, "test": test, "val": val, "cnn": cnn_path, "ckpts": ckpts, "model": model}


def test_image_only_control_ignores_priors(world):
    gen, meta = load_generator(world["ckpts"]["control"])
    assert isinstance(gen, MaskedInputGenerator) and meta["config"]["gan"]["priors"] == "none"
    g = torch.Generator().manual_seed(0)
    image, p1, p2 = (torch.rand(2, c, SIZE, SIZE, generator=g) for c in (3, N, N))
    with torch.no_grad():
        assert torch.equal(gen(image, p1), gen(image, p2))
        assert torch.equal(gen(image, p1), gen.generator(image, torch.zeros_like(p1)))
    plain, _ = load_generator(world["ckpts"]["lsft"])
    assert not isinstance(plain, MaskedInputGenerator)


def test_priors_none_zeroes_training_and_validation_data(world):
    cfg = load_config(gan_config(world["root"] / "z", world["val"], world["val"], priors="none"))
    train, val, _ = load_gan_data(cfg)
    assert int(train.priors.abs().max()) == 0 and int(val.priors.abs().max()) == 0
    assert int(train.image.max()) > 0 and int(train.target.max()) > 0


def test_resume_refuses_another_priors_setting(world):
    cfg = load_config(gan_config(world["root"] / "control", world["val"], world["val"], epochs=2, priors="cnn",
                                 out=str(world["root"] / "models" / "ctl")))
    with pytest.raises(UserError, match="gan.priors: none but the config says cnn"):
        run_gan_stage(cfg, resume=True, log=lambda _m: None)


def test_priors_only_generator_ignores_the_image(world):
    cfg = load_config(gan_config(world["root"] / "po", world["val"], world["val"], image="none",
                                 out=str(world["root"] / "models" / "po")))
    train, val, _ = load_gan_data(cfg)
    assert int(train.image.abs().max()) == 0 and int(val.image.abs().max()) == 0 and int(train.priors.max()) > 0
    gen, meta = load_generator(run_gan_stage(cfg, log=lambda _m: None)["last"])
    assert isinstance(gen, MaskedInputGenerator) and meta["config"]["gan"]["image"] == "none"
    g = torch.Generator().manual_seed(1)
    i1, i2, p1, p2 = (torch.rand(2, c, SIZE, SIZE, generator=g) for c in (3, 3, N, N))
    with torch.no_grad():
        assert torch.equal(gen(i1, p1), gen(i2, p1))
        assert not torch.equal(gen(i1, p1), gen(i1, p2))
    cfg2 = load_config(gan_config(world["root"] / "po", world["val"], world["val"], image="use", epochs=2,
                                  out=str(world["root"] / "models" / "po")))
    with pytest.raises(UserError, match="gan.image: none but the config says use"):
        run_gan_stage(cfg2, resume=True, log=lambda _m: None)


def test_image_dropout_changes_training_and_stays_deterministic(world):
    runs = {}
    for name, p in (("a", 0.0), ("b", 0.5), ("c", 0.5)):
        cfg = load_config(gan_config(world["root"] / f"dr{name}", world["val"], world["val"], image_dropout=p,
                                     out=str(world["root"] / "models" / f"dr{name}")))
        last = run_gan_stage(cfg, log=lambda _m: None)["last"]
        runs[name] = torch.load(last, weights_only=True)["generator"]
    same = lambda x, y: all(torch.equal(x[k], y[k]) for k in x)  # noqa: E731
    assert same(runs["b"], runs["c"]) and not same(runs["a"], runs["b"])


def test_init_warm_starts_from_a_checkpoint_and_refuses_other_architectures(world):
    src = world["ckpts"]["lsft"]
    cfg = load_config(gan_config(world["root"] / "warm", world["val"], world["val"], epochs=0, init=src,
                                 out=str(world["root"] / "models" / "warm")))
    result = run_gan_stage(cfg, log=lambda _m: None)
    assert result["epochs"] == 0
    wide = load_config(gan_config(world["root"] / "warm2", world["val"], world["val"], init=src, width=16,
                                  out=str(world["root"] / "models" / "warm2")))
    with pytest.raises(UserError, match="gan.init: .* has gan.width: 8 but the config says 16"):
        run_gan_stage(wide, log=lambda _m: None)
    cfg1 = load_config(gan_config(world["root"] / "warm3", world["val"], world["val"], epochs=1, init=src, lr=0.0,
                                  out=str(world["root"] / "models" / "warm3")))
    last = torch.load(run_gan_stage(cfg1, log=lambda _m: None)["last"], weights_only=True)
    start = torch.load(src, weights_only=True)
    # lr 0: the warm-started weights come through one epoch unchanged
    assert all(torch.equal(last["generator"][k], start["generator"][k]) for k in start["generator"])


# ----------------------------------------------------------------------------------------- options
def _eval_yaml(world: dict, path: Path, **extra: object) -> Path:
    data = {"name": "sanity", "priors": str(world["test"]), "lsft": world["ckpts"]["lsft"],
            "gsft": world["ckpts"]["gsft"], "num": 16, "batch_size": 8, "device": "cpu", "steps": 2, "road_num": 0,
            **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def test_section_options_parse_and_override(world, tmp_path):
    path = _eval_yaml(world, tmp_path / "e.yaml", sections=["mprt", "gridpg"], mprt={"num": 8},
                      control={"lsft": world["ckpts"]["control"]}, faithfulness={"insertion": "blurred"})
    cfg = load_eval_config(path, ["mprt.seed=3", "gridpg.min_prob=0.5", "gridpg.num=2"])
    from cnnprior.evaluate.sections import options_of

    assert cfg.sections == ["mprt", "gridpg"]
    assert (options_of(cfg, "mprt").num, options_of(cfg, "mprt").seed, options_of(cfg, "mprt").steps) == (8, 3, 0)
    assert options_of(cfg, "gridpg").min_prob == 0.5 and options_of(cfg, "gridpg").num == 2
    assert options_of(cfg, "control").checkpoints["lsft"] == world["ckpts"]["control"]
    assert options_of(cfg, "faithfulness").insertion == "blurred"
    assert options_of(cfg, "prior_swap").num == 0  # defaults when unset


def test_section_option_errors_are_one_line(world, tmp_path, capsys):
    cases = [({"mprt": {"nmu": 3}}, (), "unknown key 'mprt.nmu' (did you mean 'mprt.num'?)"),
             ({"mprt": {"num": 0}}, (), "key 'mprt.num': 0 is below the minimum 1"),
             ({"gridpg": {"min_prob": "high"}}, (), "key 'gridpg.min_prob': expected float"),
             ({"control": {"lsft": "nope.pt"}}, (), "key 'control.lsft': nope.pt: file not found"),
             ({"mprt": 5}, (), "key 'mprt': expected a mapping"),
             ({"faithfulness": {"insertion": "grey"}}, (), "'grey' is not one of black, blurred"),
             ({}, ("--set", "sections=mprt,gridgp"), "(did you mean 'gridpg'?)")]
    for extra, args, message in cases:
        path = _eval_yaml(world, tmp_path / "bad.yaml", **extra)
        rc = main(["--config", str(path), "--out", str(tmp_path / "never"), *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and message in err, (message, err)


def test_control_must_be_image_only(world, tmp_path, capsys):
    path = _eval_yaml(world, tmp_path / "c.yaml", sections=["control"], control={"lsft": world["ckpts"]["lsft"]})
    assert main(["--config", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "not an image-only control" in capsys.readouterr().err


def test_faithfulness_blurred_insertion_and_matched_smoothing(world, tmp_path):
    path = _eval_yaml(world, tmp_path / "f.yaml", num=4, sections=["faithfulness"],
                      faithfulness={"insertion": "blurred", "blur_sigma": 2})
    assert main(["--config", str(path), "--out", str(tmp_path / "r")]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    rows = m["faithfulness"]
    assert {f"target (stored Grad-CAM) σ={s}px" for s in (2, 4, 8)} <= set(rows)
    assert all(0 <= r["insertion_auc_blurred"] <= 1 for r in rows.values())
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Insertion AUC (blurred start) ↑" in md and "**N = 4 images**; deletion/insertion with 2 steps" in md


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def sanity_report(world) -> dict:
    path = _eval_yaml(world, world["root"] / "eval.yaml", sections=["mprt", "prior_swap", "control", "gridpg"],
                      mprt={"num": 6, "seed": 0}, gridpg={"num": 8, "min_prob": 0.5},
                      control={"lsft": world["ckpts"]["control"], "speed_num": 8})
    out = world["root"] / "report"
    assert main(["--config", str(path), "--out", str(out)]) == 0
    return {"out": out, "metrics": json.loads((out / "metrics.json").read_text()), "lsft": world["ckpts"]["lsft"]}


def m_choice(report: dict) -> int:
    """The best single prior the tiny LSFT chose on validation (its checkpoint's baselines)."""
    gen_meta = torch.load(report["lsft"], map_location="cpu", weights_only=True)["priors_meta"]
    return int(gen_meta["baselines"]["best_prior"])


def test_end_to_end_mprt(sanity_report):
    m = sanity_report["metrics"]["mprt"]
    assert m["images"] == 6 and m["stages"] == ["fc", "layer4", "layer3", "layer2", "layer1", "stem"]
    assert m["methods"][:5] == ["LSFT", "GSFT", "Grad-CAM (target)", "Grad-CAM++", "LayerCAM"]
    best = f"C{m_choice(sanity_report)} (val)"
    assert m["methods"][5:] == ["mean of priors", best]  # the GANs' inputs, recomputed per step
    assert len(m["steps"]) == 7 and m["steps"][0]["randomised"] == "none"
    for method in m["methods"]:
        s0 = m["steps"][0]["spearman"][method]
        assert s0["n"] == 0 or s0["mean"] == pytest.approx(1.0)  # step 0 = the trained CNN's own maps
        for st in m["steps"]:
            s = st["spearman"][method]
            assert s["n"] == 0 or (-1 <= s["mean"] <= 1 and s["lo"] <= s["mean"] + 1e-9 <= s["hi"] + 2e-9)
    assert m["step0_target_l1"]["mean"] < 1 / 255  # recomputed step-0 targets = the stored ones (up to uint8)
    for label in ("LSFT", "GSFT"):
        v = m["verdicts"][label]
        assert v["steps"] == 6 and v["reference"] == "Grad-CAM (target)" and isinstance(v["passes"], bool)
    assert m["options"] == {"num": 6, "steps": 0, "seed": 0, "seeds": 1, "randomisations": "top_down", "emprt_bins": 100}
    assert m["seeds"] == [0] and set(m["per_seed"]) == {"0"}
    assert m["per_seed"]["0"]["LSFT"]["worst_gap"] == pytest.approx(m["verdicts"]["LSFT"]["worst_gap"], abs=1e-9)


def test_end_to_end_swap_control_gridpg(sanity_report):
    m = sanity_report["metrics"]
    swap = m["prior_swap"]
    assert swap["images"] == 16 and set(swap["donors"]) == {"same class", "any class"}
    anyc = swap["donors"]["any class"]
    assert anyc["pairs"] == 16 and set(anyc["gans"]) == {"LSFT", "GSFT"}
    s = anyc["gans"]["LSFT"]
    assert s["donor_minus_own"]["mean"] == pytest.approx(s["r_donor"]["mean"] - s["r_own"]["mean"], abs=1e-6)
    control = m["control"]
    assert set(control["controls"]) == {"LSFT control"} and set(control["margins"]) == {
        "LSFT − LSFT control", "GSFT − LSFT control"}
    mg = control["margins"]["LSFT − LSFT control"]
    assert mg["margin"]["mean"] == pytest.approx(mg["gan_r"]["mean"] - mg["control_r"]["mean"], abs=1e-6)
    assert mg["gan_r"]["mean"] == pytest.approx(m["fidelity"]["LSFT"]["r"], abs=1e-6)
    assert {"LSFT control generator", "LSFT generator", "Grad-CAM (CNN forward + backward)"} <= set(control["speed"])
    assert all(v > 0 for v in control["speed"].values())
    grid = m["gridpg"]
    assert grid["grids"] == 8 and grid["kept_classes"] >= 4 and grid["chance"] == 0.25
    assert set(grid["methods"]) >= {"LSFT", "GSFT", "Grad-CAM (target)", "Grad-CAM++", "LayerCAM",
                                    "Grad-CAM (target) σ=2px", "Grad-CAM (target) σ=8px"}
    assert all(0 <= s["mean"] <= 1 for s in grid["methods"].values())
    assert m["sections_run"] == ["fidelity", "mprt", "prior_swap", "control", "gridpg"]
    assert {"mprt", "prior_swap", "control", "gridpg"} <= set(m["runtime_s"])


def test_end_to_end_report(sanity_report):
    out = sanity_report["out"]
    assert (out / "mprt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for text in ("## 7. Sanity check: model-parameter randomisation (MPRT)", "## 8. Control: prior swap",
                 "## 9. Control: image-only generator", "## 10. Grid pointing game (GridPG)",
                 "a generator passes a randomisation when, at every step", "**N = 6 images**",
                 "not an explanation of the CNN", "off their training distribution", "![MPRT"):
        assert text in md, text
    assert len(re.findall(r"\*\*\S+ (passes MPRT|fails MPRT \([a-z, ]+\))\*\*:", md)) == 2  # one per GAN
    assert "sections not run: faithfulness, localisation, relevance, generalisation" in md
    assert (out / "report.html").read_text().count('src="data:image/png;base64,') >= 1


def test_mprt_pools_several_seeds_and_gives_each_seed_its_verdict(world, tmp_path):
    def run(name: str, **mprt_opts: int) -> dict:
        path = _eval_yaml(world, tmp_path / f"{name}.yaml", sections=["mprt"], mprt={"num": 4, "steps": 2, **mprt_opts})
        assert main(["--config", str(path), "--out", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name / "metrics.json").read_text())["mprt"]

    both, five, six = run("both", seed=5, seeds=2), run("five", seed=5), run("six", seed=6)
    assert both["seeds"] == [5, 6] and set(both["per_seed"]) == {"5", "6"} and six["seeds"] == [6]
    def same_verdict(a: dict, b: dict) -> None:
        assert {k: v for k, v in a.items() if k != "worst_gap"} == {k: v for k, v in b.items() if k != "worst_gap"}
        assert a["worst_gap"] == pytest.approx(b["worst_gap"], abs=1e-9, nan_ok=True)

    for label in ("LSFT", "GSFT"):  # each seed within the pooled run = that seed run alone
        same_verdict(both["per_seed"]["5"][label], five["verdicts"][label])
        same_verdict(both["per_seed"]["6"][label], six["verdicts"][label])
    for k, st in enumerate(both["steps"]):
        for m in both["methods"]:
            # per image averaged over the seeds, then over the N images: N values, the mean of the seeds' means
            pooled, a, b = st["spearman"][m], five["steps"][k]["spearman"][m], six["steps"][k]["spearman"][m]
            assert pooled["n"] == a["n"] == b["n"], (k, m)
            if pooled["n"]:
                assert pooled["mean"] == pytest.approx((a["mean"] + b["mean"]) / 2, abs=1e-9), (k, m)
    for label in ("LSFT", "GSFT"):  # so no pooled gap exceeds both seeds' worst
        v = both["verdicts"][label]
        assert v["worst_gap"] <= max(both["per_seed"][s][label]["worst_gap"] for s in ("5", "6")) + 1e-9
    md = (tmp_path / "both" / "report.md").read_text()
    assert "seeds 5–6: at each step every image's similarity is averaged over the 2 randomised networks" in md
    assert "| passes |" in md and " of 2 |" in md


def test_mprt_names_the_training_seeds_and_defaults_to_a_held_out_seed():
    from cnnprior.evaluate.randomisations import training_seeds
    from cnnprior.evaluate.sections.mprt import MPRTOptions

    meta = {"priors_meta": {"randomised": {"files": ["npys/x-train-random-fc-s0.npy", "npys/x-train-random-stem-s2.npy",
                                                     "npys/x-train-random-fc-s0.npy"]}}}
    assert training_seeds(meta) == [0, 2]
    assert training_seeds({}) == [] and training_seeds({"priors_meta": {}}) == []
    assert MPRTOptions().seed not in range(3)  # not a seed the priors stage writes by default
