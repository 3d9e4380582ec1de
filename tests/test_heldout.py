"""Tests for the held-out sanity checks (issue 22): permuted labels and the random-label classifier run, the
randomised-prior file names and orders, `sanity.mprt(follow=)`, the mprt section's randomisations, the `datarand` and
`smprt` sections, the prior swap of a priors-only generator and the control's recipe differences.

Tiny on purpose: 32 px shapes for the classifier stage, the 64 px "decisive" CNN and 16 px prior files of
tests/test_sanity.py for the evaluation sections (one LSFT generator, 4 images, seeds 2, one randomisation step)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from cnnprior.cnn import train as cnn_train
from cnnprior.cnn.model import build_cnn, load_cnn, save_cnn
from cnnprior.cnn.randomise import INITS, ORDERS, randomise, randomised_stages, step_labels
from cnnprior.cnn.train import cnn_seed, evaluate_accuracy, train_cnn
from cnnprior.core.config import load_config
from cnnprior.core.errors import UserError
from cnnprior.data.relabel import Relabelled, permuted_labels
from cnnprior.data.splits import load_split
from cnnprior.evaluate.randomisations import parse_randomisations, training_randomisations, training_seeds
from cnnprior.evaluate.run import main
from cnnprior.evaluate.sanity import mprt, same_size_spearman, spearman_abs
from cnnprior.evaluate.sections.control import recipe_differences
from cnnprior.evaluate.sections.datarand import CHANCE_TOLERANCE, DataRandOptions, DataRandSection
from cnnprior.evaluate.sections.mprt import sanity_weight
from cnnprior.evaluate.sections.swap import priors_only
from cnnprior.gan.checkpoint import GAN_FORMAT, GeneratorMeta
from cnnprior.gan.train import run_gan_stage
from cnnprior.maps.ops import resize_maps
from cnnprior.present.report import Report
from cnnprior.priors.cams import live_cams
from cnnprior.priors.random_priors import (
    parse_random_prior_path,
    random_prior_path,
    run_random_priors_stage,
    stage_steps,
)
from cnnprior.priors.read import read_priors
from tests.helpers import gan_config
from tests.test_sanity import CLASSES, R, _decisive_cnn, _images16, _prior_file

REF = "Grad-CAM (target)"  # the prior file's target (the tiny world's reference method)


def _quiet(_msg: str) -> None:
    pass


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ========================================================================================= 1. permuted labels
def test_permuted_labels_keep_class_counts_and_are_seeded() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), 25))
    before = labels.copy()
    same = permuted_labels(labels, 0.0, 3)
    assert np.array_equal(same, labels) and same is not labels
    for share in (0.3, 0.5, 1.0):
        out = permuted_labels(labels, share, 3)
        assert np.array_equal(np.bincount(out, minlength=4), np.bincount(labels, minlength=4)), share
        assert 0 < int((out != labels).sum()) <= round(share * len(labels)), share  # only drawn positions move
        assert np.array_equal(out, permuted_labels(labels, share, 3))  # deterministic
        assert not np.array_equal(out, permuted_labels(labels, share, 4))  # seeded
    assert (permuted_labels(labels, 1.0, 3) != labels).mean() > 0.5  # about 1 - 1/4 differ
    assert np.array_equal(labels, before)  # the input is left alone
    distinct = np.arange(60)
    full = permuted_labels(distinct, 1.0, 1)
    assert np.array_equal(np.sort(full), distinct) and not np.array_equal(full, distinct)  # a permutation
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="share must be in"):
            permuted_labels(labels, bad, 0)


class _View:
    """A split view stand-in: labels, class names, dict items, describe()."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels, self.class_names = labels, ["a", "b", "c"]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1,), float(i)), "label": int(self.labels[i]), "index": 100 + i}

    def describe(self) -> str:
        return "fake view: 3 classes"


def test_relabelled_items_carry_the_permuted_labels() -> None:
    view = _View(np.tile(np.arange(3), 10))
    r = Relabelled(view, 1.0, 5)
    assert np.array_equal(r.labels, permuted_labels(view.labels, 1.0, 5)) and len(r) == 30
    assert r.class_names == view.class_names
    for i in range(30):
        item = r[i]
        assert item["label"] == int(r.labels[i]) and item["index"] == 100 + i and float(item["image"][0]) == i
    assert r.changed == pytest.approx(float((r.labels != view.labels).mean())) and r.changed > 0.3
    assert r.describe().startswith("fake view: 3 classes; ") and "100%" in r.describe() and "seed 5" in r.describe()
    none = Relabelled(view, 0.0, 5)
    assert none.changed == 0.0 and all(none[i]["label"] == view.labels[i] for i in range(30))


# ========================================================================================= 2. classifier stage
def test_cnn_seed_and_random_labels_config() -> None:
    cfg = load_config(None, ["data.seed=5"])
    assert cfg.cnn.seed == -1 and cfg.cnn.random_labels == 0.0 and cnn_seed(cfg) == 5
    assert cnn_seed(load_config(None, ["data.seed=5", "cnn.seed=9"])) == 9
    assert cnn_seed(load_config(None, ["data.seed=5", "cnn.seed=0"])) == 0  # 0 is a seed, not "unset"
    for bad in ("cnn.random_labels=1.5", "cnn.random_labels=-0.1", "cnn.seed=-2"):
        with pytest.raises(UserError) as info:
            load_config(None, [bad])
        assert "\n" not in str(info.value), bad


def _classifier_cfg(root: Path, name: str, *overrides: str):
    base = ["name=tiny", "data.source=shapes", "data.shapes_count=40", "data.image_size=32", "data.val_fraction=0.2",
            "data.test_fraction=0.2", "cnn.arch=resnet18", "cnn.epochs=2", "cnn.batch_size=8", "cnn.device=cpu",
            "cnn.random_labels=1.0", f"cnn.checkpoint={root / name / 'cnn.pt'}"]
    return load_config(None, base + list(overrides))


VAL_SEQUENCE = (0.8, 0.2)  # the patched validation accuracy of epochs 1, 2: the best epoch would be the first


@pytest.fixture(scope="module")
def random_label_runs(tmp_path_factory) -> dict:
    """Three 2-epoch random-label runs (cnn.seed -1, 0 = data.seed, 1), validation accuracy patched to fall."""
    root = tmp_path_factory.mktemp("randlabels")
    real = cnn_train._validate
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        calls: list[int] = []

        def fake_validate(model, loader, device, ctx):
            if isinstance(loader.dataset, Relabelled):  # fitting the permuted train labels: the real number
                return real(model, loader, device, ctx)
            calls.append(1)
            return VAL_SEQUENCE[(len(calls) - 1) % 2]

        mp.setattr(cnn_train, "_validate", fake_validate)
        for name, seed in (("unset", "-1"), ("zero", "0"), ("one", "1")):
            calls.clear()
            cfg = _classifier_cfg(root, name, f"cnn.seed={seed}")
            lines: list[str] = []
            result = train_cnn(cfg, log=lines.append)
            runs[name] = {"cfg": cfg, "result": result, "lines": lines, "ckpt": torch.load(
                cfg.cnn_checkpoint, map_location="cpu", weights_only=True)}
    return runs


def test_random_label_run_keeps_the_last_epoch_and_records_train_accuracy(random_label_runs) -> None:
    run = random_label_runs["unset"]
    cfg = run["cfg"]
    model, meta = load_cnn(cfg.cnn_checkpoint)
    assert meta["epoch"] == 2 and meta["val_accuracy"] == VAL_SEQUENCE[1]  # the last epoch, not the best val
    assert meta["config"]["cnn"]["random_labels"] == 1.0
    hist = meta["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and [h["val_accuracy"] for h in hist] == list(VAL_SEQUENCE)
    assert "train_accuracy" not in hist[0] and 0.0 <= hist[-1]["train_accuracy"] <= 1.0  # measured at the end only
    assert any("train accuracy on the permuted labels" in line for line in run["lines"])
    # the recorded train accuracy is the kept model's fit of the *permuted* train labels, in eval mode
    train = load_split(cfg.data, "train")
    relabelled = Relabelled(train, 1.0, cnn_seed(cfg))
    assert relabelled.changed > 0
    loader = torch.utils.data.DataLoader(relabelled, batch_size=8, shuffle=False)
    assert evaluate_accuracy(model, loader, torch.device("cpu")) == pytest.approx(hist[-1]["train_accuracy"])


def test_true_label_history_has_no_train_accuracy(tmp_path) -> None:
    cfg = _classifier_cfg(tmp_path, "true", "cnn.random_labels=0", "cnn.epochs=1", "data.shapes_count=20",
                          "cnn.arch=mobilenet_v3_small")
    train_cnn(cfg, log=_quiet)
    _, meta = load_cnn(cfg.cnn_checkpoint)
    assert all("train_accuracy" not in h for h in meta["history"])


def test_cnn_seed_changes_the_weights_and_minus_one_is_data_seed(random_label_runs) -> None:
    states = {k: r["ckpt"]["state_dict"] for k, r in random_label_runs.items()}
    assert _states_equal(states["unset"], states["zero"])  # cnn.seed -1 = data.seed (0)
    assert not _states_equal(states["zero"], states["one"])
    hist = {k: [h.get("train_accuracy") for h in r["ckpt"]["history"]] for k, r in random_label_runs.items()}
    assert hist["unset"] == hist["zero"]


def test_datarand_fit_of_reports_the_effective_seed(random_label_runs) -> None:
    from cnnprior.evaluate.sections.datarand import fit_of

    _, meta = load_cnn(random_label_runs["unset"]["cfg"].cnn_checkpoint)
    assert fit_of(meta)["seed"] == cnn_seed(random_label_runs["unset"]["cfg"]) == 0


def test_datarand_fit_of_flags_a_cnn_whose_true_label_accuracy_is_not_at_chance() -> None:
    """The planted failures: the old 900-image CNN reached 25 % on the true val labels of 10 classes; a CNN far below
    chance is off as well. A CNN at 10.4 % passes the check."""
    from cnnprior.evaluate.sections.datarand import fit_of

    def meta(val: float) -> dict:
        return {"config": {"cnn": {"random_labels": 1.0, "seed": 7}, "data": {"seed": 0}}, "val_accuracy": val,
                "epoch": 3, "history": [{"train_accuracy": 0.11}], "class_names": [str(i) for i in range(10)]}

    assert fit_of(meta(0.25))["at_chance"] is False
    assert fit_of(meta(0.042))["at_chance"] is False  # below chance carries class information as well
    assert fit_of(meta(0.104))["at_chance"] is True and fit_of(meta(0.104))["chance"] == pytest.approx(0.1)
    assert fit_of({"config": {}, "class_names": []})["at_chance"] is None


# ========================================================================================= 3. random prior files
STAGE_NAMES = ["fc", "layer4", "features.3", "blocks.2-1.conv_dw", "stage_2.block-1", "x-s2", "s1"]


def test_random_prior_path_round_trips_every_order_and_init() -> None:
    assert random_prior_path("npys/x", "fc", 0) == Path("npys/x-train-random-fc-s0.npy")  # the old name
    assert random_prior_path("npys/x", "fc", 0, "top_down", "default") == Path("npys/x-train-random-fc-s0.npy")
    assert random_prior_path("npys/x", "fc", 3, "independent", "normal") == Path(
        "npys/x-train-random-independent_normal-fc-s3.npy")
    names = set()
    for order in ORDERS:
        for init in INITS:
            for stage in STAGE_NAMES:
                for seed in (0, 7, 1234):
                    path = random_prior_path("npys/my-prefix_v1.2", stage, seed, order, init)
                    names.add(path)
                    assert parse_random_prior_path(path) == {"order": order, "init": init, "stage": stage,
                                                             "seed": seed}, path
                    assert parse_random_prior_path(str(path)) == parse_random_prior_path(path)
    assert len(names) == len(ORDERS) * len(INITS) * len(STAGE_NAMES) * 3  # no two schemes share a file
    assert parse_random_prior_path("npys/x-train.npy") is None
    assert parse_random_prior_path("npys/x-train-random-fc.npy") is None


def test_stage_steps_per_order() -> None:
    model = build_cnn("resnet18", CLASSES, 32)
    stages = ["fc", "layer4", "layer3", "layer2", "layer1", "stem"]
    assert stage_steps(model, ["all"]) == [(i + 1, s) for i, s in enumerate(stages)]
    assert stage_steps(model, ["all"], "independent") == [(i + 1, s) for i, s in enumerate(stages)]
    assert stage_steps(model, ["all"], "bottom_up") == [(6 - i, s) for i, s in enumerate(stages)]
    assert stage_steps(model, ["layer3", "fc"], "bottom_up") == [(4, "layer3"), (6, "fc")]
    for order in ORDERS:  # the step of a stage re-initialises that stage and ends (or starts) the cascade at it
        for step, stage in stage_steps(model, ["all"], order):
            idx = randomised_stages(6, order, step)
            assert stages.index(stage) in idx and step_labels(model, order)[step] == stage, (order, stage)
    with pytest.raises(UserError, match="'layer9' is not a stage"):
        stage_steps(model, ["layer9"], "bottom_up")


def test_randomised_order_and_init_config() -> None:
    cfg = load_config(None, [])
    assert (cfg.priors.randomised_order, cfg.priors.randomised_init) == ("top_down", "default")
    cfg = load_config(None, ["priors.randomised_order=bottom_up", "priors.randomised_init=kaiming_normal"])
    assert (cfg.priors.randomised_order, cfg.priors.randomised_init) == ("bottom_up", "kaiming_normal")
    for bad, word in (("priors.randomised_order=sideways", "sideways"), ("priors.randomised_init=he", "he")):
        with pytest.raises(UserError) as info:
            load_config(None, [bad])
        msg = str(info.value)
        assert "\n" not in msg and word in msg and "randomised_" in msg, msg


def test_priors_stage_writes_independent_normal_files(tiny_config) -> None:
    cfg = tiny_config("priors.size=16", "priors.n=4", "priors.splits=[train]", "priors.randomised_stages=[fc, layer3]",
                      "priors.randomised_limit=4", "priors.randomised_order=independent",
                      "priors.randomised_init=normal")
    torch.manual_seed(0)
    model = build_cnn("resnet18", ["circle", "square", "triangle", "cross", "star"], 32)
    save_cnn(model, cfg.cnn_checkpoint, val_accuracy=0.2, epoch=0, config={}, dataset="shapes")
    written = run_random_priors_stage(cfg, log=_quiet)
    assert written == [random_prior_path(cfg.priors_prefix, s, 0, "independent", "normal") for s in ("fc", "layer3")]
    for path, (step, stage) in zip(written, [(1, "fc"), (3, "layer3")], strict=True):
        assert "-train-random-independent_normal-" in path.name
        pf = read_priors(path)
        assert len(pf) == 4
        rnd = pf.meta["randomised"]
        assert (rnd["order"], rnd["init"], rnd["stage"], rnd["steps"], rnd["seed"]) == ("independent", "normal",
                                                                                          stage, step, 0)
        assert parse_random_prior_path(path) == {"order": "independent", "init": "normal",
                                                                             "stage": stage, "seed": 0}
    # the file's name is what the mprt section reads back as the training scheme
    meta = {"priors_meta": {"randomised": {"files": [str(p) for p in written]}}}
    assert training_randomisations(meta) == [{"order": "independent", "init": "normal", "seeds": [0]}]


# ========================================================================================= 4. sanity.mprt(follow=)
@pytest.fixture(scope="module")
def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_cnn("resnet18", CLASSES, image_size=64).eval()


def _maps_fn(images: torch.Tensor, classes: torch.Tensor):
    """cam: live Grad-CAM of layer3 (64 px); small: the gray image at 16 px (reads no CNN, another size)."""

    def maps_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        cam = live_cams(model, model.net.layer3[-1], images, classes, "gradcam", batch_size=4)
        return {"cam": cam, "small": F.avg_pool2d(images.mean(1, keepdim=True), 4)}

    return maps_of


def test_mprt_follow_and_last_step_maps(small_cnn) -> None:
    g = torch.Generator().manual_seed(0)
    images, classes = torch.rand(4, 3, 64, 64, generator=g), torch.tensor([0, 1, 2, 3])
    fn = _maps_fn(images, classes)
    res = mprt(small_cnn, fn, seed=1, steps=2, order="bottom_up", init="normal", follow="cam")
    assert [s["randomised"] for s in res["steps"]] == ["none", "stem", "layer1"]
    finite = 0
    for st in res["steps"]:
        assert set(st["follow"]) == {"cam", "small"}
        f = st["follow"]["cam"]
        ok = ~torch.isnan(f)
        finite += int(ok.sum())
        assert torch.allclose(f[ok].double(), torch.ones(int(ok.sum()), dtype=torch.float64), atol=1e-6)
    assert finite > 0
    assert [("maps" in s) for s in res["steps"]] == [False, False, True]
    assert set(res["steps"][-1]["maps"]) == {"cam", "small"}
    # follow = similarity to the *randomised* CNN's own map at that step (recomputed here)
    maps = fn(randomise(small_cnn, "bottom_up", 2, 1, "normal"))
    assert torch.equal(res["steps"][-1]["maps"]["cam"], maps["cam"])
    expect = same_size_spearman(maps["small"], maps["cam"])
    got = res["steps"][-1]["follow"]["small"]
    ok = ~torch.isnan(got)
    assert ok.any() and torch.allclose(got[ok].double(), expect[ok].double(), atol=1e-9)
    plain = mprt(small_cnn, fn, seed=1, steps=1)
    assert all("follow" not in s for s in plain["steps"]) and "maps" in plain["steps"][-1]


def test_mprt_follow_is_nan_where_the_followed_map_is_constant(small_cnn) -> None:
    gray = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def maps_of(_model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {"flat": torch.full((3, 1, 8, 8), 0.5), "gray": gray}

    res = mprt(small_cnn, maps_of, seed=0, steps=1, follow="flat")
    for st in res["steps"]:
        assert all(bool(torch.isnan(v).all()) for v in st["follow"].values())


def test_same_size_spearman_resizes() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.rand(3, 1, 8, 8, generator=g)
    big = F.interpolate(a, size=32, mode="nearest")
    rho = same_size_spearman(a, big)
    assert rho.shape == (3,) and bool((rho > 0.9).all())
    assert torch.allclose(rho, spearman_abs(a, resize_maps(big, 8)))
    assert torch.equal(same_size_spearman(a, a), spearman_abs(a, a))
    flipped = same_size_spearman(a, F.interpolate(a.flip(-1).flip(-2), size=32, mode="nearest"))
    assert bool((flipped < 0.9).all())


# ========================================================================================= 5. mprt options
def test_parse_randomisations() -> None:
    assert parse_randomisations("top_down") == [("top_down", "top_down", "default")]
    assert parse_randomisations(" bottom_up , independent:normal,full:kaiming_normal,") == [
        ("bottom_up", "bottom_up", "default"), ("independent:normal", "independent", "normal"),
        ("full:kaiming_normal", "full", "kaiming_normal")]
    for bad in ("sideways", "top_down:he", "top_down,bogus:normal", "full:Normal", "", " , "):
        with pytest.raises(UserError) as info:
            parse_randomisations(bad)
        assert "mprt.randomisations" in str(info.value) and "\n" not in str(info.value), bad


def test_parse_randomisations_full_colon_empty_is_default() -> None:
    """`full:` (an empty init) reads as the default init (documented here, as the code does it)."""
    assert parse_randomisations("full:") == [("full:", "full", "default")]


def test_training_randomisations_from_file_names() -> None:
    files = ["npys/x-train-random-independent_normal-fc-s0.npy", "npys/x-train-random-independent_normal-stem-s2.npy",
             "npys/x-train-random-fc-s1.npy", "npys/x-train-random-bottom_up_kaiming_normal-layer4-s0.npy",
             "npys/x-train-random-independent_normal-fc-s0.npy", "npys/unrelated.npy"]
    meta = {"priors_meta": {"randomised": {"files": files}}}
    assert training_randomisations(meta) == [
        {"order": "bottom_up", "init": "kaiming_normal", "seeds": [0]},
        {"order": "independent", "init": "normal", "seeds": [0, 2]},
        {"order": "top_down", "init": "default", "seeds": [1]}]
    assert training_seeds(meta) == [0, 1, 2]
    assert training_randomisations({}) == [] and training_randomisations({"priors_meta": {"randomised": None}}) == []


def _meta(**entries: object) -> GeneratorMeta:
    """The metadata of a generator checkpoint holding `entries` beside the required ones."""
    required = {"format": GAN_FORMAT, "variant": "lsft", "generator_config": {"n_priors": 4},
                "priors_meta": {"size": 16, "n": 4}}
    return GeneratorMeta.parse({**required, **entries}, "g.pt")


def test_sanity_weight_from_the_checkpoint_config() -> None:
    assert sanity_weight(_meta(config={"gan": {"sanity_weight": 8}})) == 8.0
    assert sanity_weight(_meta(config={"gan": {}})) == 0.0 and sanity_weight(_meta()) == 0.0  # older: off
    assert sanity_weight(_meta(config=None)) == 0.0


# ========================================================================================= 9. control recipe
def _gan_meta(step: int = 100, **gan: object) -> GeneratorMeta:
    cfg = {"variant": "lsft", "epochs": 3, "batch_size": 8, "lr": 1e-3, "priors": "cnn", "image": "use", "out": "a",
           "device": "cpu", "checkpoint_every": 0, "val": "v.npy", "val_limit": 0, "randomised_share": 0.5}
    cfg.update(gan)
    return _meta(step=step, config={"gan": cfg}, priors_meta={"size": 16, "n": 4, "train_files": ["t.npy"],
                                                               "randomised": {"files": ["r-s0.npy"], "share": 0.5}})


def test_recipe_differences() -> None:
    gan = _gan_meta()
    assert recipe_differences(gan, _gan_meta()) == []
    free = _gan_meta(priors="none", image="none", out="b", device="cuda", checkpoint_every=5, val="w.npy", val_limit=9)
    assert recipe_differences(gan, free) == []
    diffs = recipe_differences(gan, _gan_meta(epochs=4))
    assert len(diffs) == 1 and "gan.epochs" in diffs[0] and "3" in diffs[0] and "4" in diffs[0]
    diffs = recipe_differences(gan, _gan_meta(step=50))
    assert len(diffs) == 1 and "samples seen" in diffs[0] and "800" in diffs[0] and "400" in diffs[0]
    diffs = recipe_differences(gan, _gan_meta(step=50, batch_size=16))  # same samples, another batch size
    assert len(diffs) == 1 and "gan.batch_size" in diffs[0]
    other = _gan_meta()
    other["priors_meta"]["train_files"] = ["u.npy"]
    diffs = recipe_differences(gan, other)
    assert len(diffs) == 1 and "train prior files" in diffs[0] and "u.npy" in diffs[0]
    other = _gan_meta()
    other["priors_meta"]["randomised"] = None
    diffs = recipe_differences(gan, other)
    assert len(diffs) == 1 and "randomised" in diffs[0]
    extra = _gan_meta()
    extra["config"]["gan"]["init"] = "warm.pt"  # a key only one side has
    assert any("gan.init" in d for d in recipe_differences(gan, extra))


def test_recipe_differences_ignore_keys_added_since_with_their_defaults() -> None:
    old = _gan_meta()  # a checkpoint written before gan.precision / gan.compile existed
    new = _gan_meta(precision="fp32", compile=False)  # the same recipe, trained by today's code
    assert recipe_differences(old, new) == []


def test_priors_only() -> None:
    assert priors_only(_meta(config={"gan": {"image": "none"}}))
    assert not priors_only(_meta(config={"gan": {"image": "use"}}))
    assert not priors_only(_meta(config={"gan": {}})) and not priors_only(_meta()) and not priors_only(None)
    assert not priors_only(_meta(config=None))


def test_generator_meta_parses_once_and_refuses_other_versions() -> None:
    meta = _meta(config={"gan": {"adv_weight": 0, "priors": "none"}}, metrics={"r": 0.5}, epoch=3, step=7)
    assert (meta.variant, meta.size, meta.n, meta.epoch, meta.step, meta.val_r) == ("lsft", 16, 4, 3, 7, 0.5)
    assert meta.adv_weight == 0.0 and meta.inputs == ("use", "none") and meta["epoch"] == 3 and "format" in meta
    assert meta.path == "g.pt" and meta["priors_meta"] is meta.priors_meta
    with pytest.raises(UserError, match=r"g.pt: a generator checkpoint of an older or unknown version \(no priors_meta"):
        GeneratorMeta.parse({"format": GAN_FORMAT, "variant": "lsft", "generator_config": {"n_priors": 4}}, "g.pt")
    with pytest.raises(UserError, match="another cnnprior version"):
        GeneratorMeta.parse({"format": "cnnprior-gan/2"}, "g.pt")
    with pytest.raises(UserError, match="not a GAN checkpoint"):
        GeneratorMeta.parse({"format": "cnnprior-cnn/1"}, "g.pt")


# ========================================================================================= tiny evaluation world
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """test_sanity's decisive 64 px CNN and 16 px prior files (12 images each); an LSFT generator, a copy of it
    that claims training on `independent:normal` seed-0 files, a priors-only LSFT, an image-only control, and CNNs
    for datarand."""
    root = tmp_path_factory.mktemp("heldout")
    test16, val16 = _images16(12, 0), _images16(12, 1)
    model = _decisive_cnn(resize_maps(torch.cat([test16, val16]), R))
    cnn_path = save_cnn(model, root / "models" / "tiny-cnn.pt", val_accuracy=1.0, epoch=0, config={},
                        dataset="noise")
    test = _prior_file(root / "npys" / "tiny-test.npy", model, cnn_path, test16, "test")
    val = _prior_file(root / "npys" / "tiny-val.npy", model, cnn_path, val16, "val")
    ckpts = {}
    for key, extra in (("lsft", {}), ("po", {"image": "none"}), ("control", {"priors": "none"})):
        cfg = load_config(gan_config(root / key, val, val, epochs=1, batch_size=6,
                                     out=str(root / "models" / key), **extra))
        ckpts[key] = run_gan_stage(cfg, log=_quiet)["last"]
    raw = torch.load(ckpts["lsft"], map_location="cpu", weights_only=True)
    raw["priors_meta"]["randomised"] = {"share": 0.5, "count": 6, "files": [
        "npys/x-train-random-independent_normal-fc-s0.npy", "npys/x-train-random-independent_normal-stem-s0.npy"]}
    raw["config"]["gan"]["sanity_weight"] = 4.0  # and training with the randomisation term on them
    claims = root / "models" / "lsft-claims.pt"
    torch.save(raw, claims)
    cnns = {}
    # data-randomisation CNNs: a random-label one (other weights), a copy of the evaluated CNN flagged as random-label
    random_cfg = {"cnn": {"random_labels": 1.0, "seed": 7}}
    hist = [{"epoch": 1, "val_accuracy": 0.2, "train_loss": 1.0, "seconds": 1.0, "train_accuracy": 0.875}]
    torch.manual_seed(5)
    cnns["random"] = save_cnn(build_cnn("resnet18", CLASSES, R).eval(), root / "models" / "rl.pt", val_accuracy=0.2,
                              epoch=1, config=random_cfg, dataset="noise", history=hist)
    cnns["same"] = save_cnn(model, root / "models" / "rl-same.pt", val_accuracy=0.2, epoch=1, config=random_cfg,
                            dataset="noise", history=hist)
    cnns["arch"] = save_cnn(build_cnn("mobilenet_v3_small", CLASSES, R), root / "models" / "arch.pt",
                            val_accuracy=0.2, epoch=1, config=random_cfg, dataset="noise", history=hist)
    cnns["size"] = save_cnn(build_cnn("resnet18", CLASSES, 32), root / "models" / "size.pt", val_accuracy=0.2,
                            epoch=1, config=random_cfg, dataset="noise", history=hist)
    cnns["classes"] = save_cnn(build_cnn("resnet18", CLASSES[:4] + ["z"], R), root / "models" / "classes.pt",
                               val_accuracy=0.2, epoch=1, config=random_cfg, dataset="noise", history=hist)
    return {"root": root, "test": test, "cnn": cnn_path, "ckpts": ckpts, "claims": claims, "cnns": cnns,
            "model": model}


def _evaluate(world: dict, name: str, lsft: Path | str, **extra: object) -> dict:
    data = {"name": name, "priors": str(world["test"]), "lsft": str(lsft), "num": 12, "batch_size": 6,
            "device": "cpu", "steps": 2, "road_num": 0, **extra}
    path = world["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = world["root"] / f"eval-{name}"
    assert main(["--config", str(path), "--out", str(out)]) == 0
    return {"out": out, "metrics": json.loads((out / "metrics.json").read_text(encoding="utf-8")),
            "md": (out / "report.md").read_text(encoding="utf-8")}


@pytest.fixture(scope="module")
def held(world) -> dict:
    """mprt with three randomisations (seeds 0-1: seed 0 is one the `claims` generator trained on for
    independent:normal), datarand with the random-label CNN, smprt, prior swap and the control."""
    return _evaluate(world, "held", world["claims"],
                     sections=["mprt", "datarand", "smprt", "prior_swap", "control"],
                     mprt={"num": 4, "seed": 0, "seeds": 2, "steps": 1,
                           "randomisations": "top_down,independent:normal,full:kaiming_normal"},
                     datarand={"cnn": str(world["cnns"]["random"]), "num": 4},
                     smprt={"num": 2, "samples": 2, "noise": 0.1, "randomisations": "bottom_up,full", "seed": 3,
                            "seeds": 1},
                     control={"lsft": str(world["ckpts"]["control"]), "speed_num": 6})


# ----------------------------------------------------------------------------------------- 5. mprt section
def test_mprt_randomisation_blocks(held) -> None:
    m = held["metrics"]["mprt"]
    blocks = m["randomisations"]
    assert [(b["name"], b["order"], b["init"]) for b in blocks] == [
        ("top_down", "top_down", "default"), ("independent:normal", "independent", "normal"),
        ("full:kaiming_normal", "full", "kaiming_normal")]
    assert [[s["randomised"] for s in b["steps"]] for b in blocks] == [["none", "fc"], ["none", "fc"],
                                                                      ["none", "every stage"]]
    for key in ("steps", "verdicts", "per_seed", "stages"):  # the top level is the first block
        assert m[key] == blocks[0][key], key
    methods = m["methods"]
    assert methods[:4] == ["LSFT", REF, "Grad-CAM++", "LayerCAM"] and m["seeds"] == [0, 1]
    for b in blocks:
        assert {"name", "order", "init", "steps", "verdicts", "per_seed", "emprt"} <= set(b)
        assert set(b["per_seed"]) == {"0", "1"} and set(b["verdicts"]) == {"LSFT"}
        assert isinstance(b["verdicts"]["LSFT"]["passes"], bool) and b["verdicts"]["LSFT"]["steps"] == 1
        assert set(b["emprt"]) == set(methods)
        for st in b["steps"]:
            assert set(st["spearman"]) == set(st["ssim"]) == set(st["follow"]) == set(methods)
            f = st["follow"][REF]
            assert f["n"] > 0 and f["mean"] == pytest.approx(1.0)  # the reference follows itself
        for meth in methods:
            s0 = b["steps"][0]["spearman"][meth]
            assert s0["n"] == 0 or s0["mean"] == pytest.approx(1.0)
    # step 0 (the trained CNN) is the same in every block; the randomised steps are not
    assert all(b["steps"][0]["spearman"] == blocks[0]["steps"][0]["spearman"] for b in blocks)
    assert blocks[0]["steps"][1]["spearman"][REF] != blocks[2]["steps"][1]["spearman"][REF]


def test_mprt_training_scheme_and_overlap(held) -> None:
    m = held["metrics"]["mprt"]
    blocks = {b["name"]: b for b in m["randomisations"]}
    assert m["training_randomisations"]["LSFT"] == [{"order": "independent", "init": "normal", "seeds": [0]}]
    assert blocks["independent:normal"]["same_scheme_in_training"] == ["LSFT"]
    assert blocks["independent:normal"]["seen_in_training"] == ["LSFT"]  # seed 0 is among the checks' seeds
    for name in ("top_down", "full:kaiming_normal"):  # seed 0 as well, but another scheme: held out
        assert blocks[name]["same_scheme_in_training"] == [] and blocks[name]["seen_in_training"] == []
    assert m["seen_in_training"] == ["LSFT"]
    md = held["md"]
    table = [line for line in md.splitlines() if line.startswith("| `")]
    rows = {line.split("|")[1].strip(): line for line in table}
    assert {"`top_down`", "`independent:normal`", "`full:kaiming_normal`"} <= set(rows)
    assert "(trained on this scheme)" in rows["`independent:normal`"]
    assert "(trained on this scheme)" not in rows["`top_down`"] + rows["`full:kaiming_normal`"]
    assert "Verdicts (MPRT: the failed rules" in md and "| randomisation | LSFT MPRT | LSFT eMPRT |" in md
    for b in m["randomisations"]:  # eMPRT judged per generator beside MPRT
        assert set(b["emprt_verdicts"]) == {"LSFT"} and b["floors"] and set(b["verdicts"]["LSFT"]) >= {"reasons"}
    # the same networks twice are judged once: full (every stage at once) with kaiming_normal is no other step here
    assert all(b["repeated_steps"] == {} for b in m["randomisations"])
    assert "**Warning**: LSFT trained on prior files from the very randomised networks" in md
    assert "independent` cascade, init `normal`, seeds 0" in md
    assert m["sanity_weights"] == {"LSFT": 4.0}
    assert "Trained with the randomisation term (`gan.sanity_weight`" in md and "LSFT: weight 4." in md
    assert (held["out"] / "mprt.png").is_file() and (held["out"] / "mprt-independent-normal.png").is_file()


def test_mprt_section_refuses_an_unknown_randomisation(world, capsys) -> None:
    path = world["root"] / "bad-rand.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "priors": str(world["test"]), "lsft": str(world["ckpts"]["lsft"]),
                                    "num": 12, "device": "cpu", "sections": ["mprt"],
                                    "mprt": {"num": 2, "randomisations": "top_down,sideways:normal"}}))
    capsys.readouterr()
    assert main(["--config", str(path), "--out", str(world["root"] / "bad-rand")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mprt.randomisations" in err and "sideways" in err, err


# ----------------------------------------------------------------------------------------- 6. datarand
def test_datarand_reports_similarity_follow_gap_and_verdict(held, world) -> None:
    d = held["metrics"]["datarand"]
    methods = held["metrics"]["mprt"]["methods"]
    assert d["cnn"] == str(world["cnns"]["random"]) and d["images"] == 4 and d["reference"] == REF
    classes = len(world["model"].class_names)
    assert d["fit"] == {"random_labels": 1.0, "train_accuracy": 0.875, "val_accuracy": 0.2, "epochs": 1, "seed": 7,
                        "classes": classes, "chance": 1 / classes,
                        "at_chance": abs(0.2 - 1 / classes) <= CHANCE_TOLERANCE}
    assert d["at_chance"] == d["fit"]["at_chance"]
    assert d["methods"] == methods
    for key in ("spearman", "ssim", "follow"):
        assert set(d[key]) == set(methods), key
    assert d["follow"][REF]["n"] > 0 and d["follow"][REF]["mean"] == pytest.approx(1.0)
    assert d["spearman"][REF]["mean"] < 0.99  # another CNN: the reference's maps moved
    assert set(d["gap"]) == {"LSFT"} and set(d["verdicts"]) == {"LSFT"}
    gap = d["gap"]["LSFT"]
    assert gap["mean"] == pytest.approx(d["spearman"]["LSFT"]["mean"] - d["spearman"][REF]["mean"], abs=1e-6)
    v = d["verdicts"]["LSFT"]
    assert ("similarity" in v["reasons"]) == (abs(gap["mean"]) > 0.10)  # two-sided
    assert v["passes"] == (not v["reasons"]) and set(v["reasons"]) <= {"similarity", "degenerate", "follow"}
    md = held["md"]
    assert "Sanity check: data randomisation" in md and "ρ vs trained-CNN maps" in md and "87.5%" in md


def test_datarand_with_the_evaluated_cnn_itself_scores_one(world) -> None:
    """The evaluated CNN's own weights as 'random-label' CNN: every map is its trained-CNN map (ρ = 1, gap 0)."""
    res = _evaluate(world, "same", world["ckpts"]["lsft"], sections=["datarand"],
                    datarand={"cnn": str(world["cnns"]["same"]), "num": 3})
    d = res["metrics"]["datarand"]
    for meth, s in d["spearman"].items():
        assert s["n"] == 0 or s["mean"] == pytest.approx(1.0, abs=1e-6), meth
    assert d["gap"]["LSFT"]["mean"] == pytest.approx(0.0, abs=1e-6)
    # the similarity rule passes (gap 0); whether this tiny LSFT follows Grad-CAM as well as its own inputs is the
    # follow rule's question, judged on the same maps
    v = d["verdicts"]["LSFT"]
    assert "similarity" not in v["reasons"] and "degenerate" not in v["reasons"]
    assert v["passes"] == (v["follow_gaps"][0] >= -0.10)
    assert "datarand: no data-randomisation CNN" not in res["md"]


def test_datarand_refuses_other_cnns(world, capsys) -> None:
    _, own = load_cnn(world["cnn"])
    ctx = lambda path: SimpleNamespace(options=lambda _n: DataRandOptions(cnn=str(path)), notes=[],  # noqa: E731
                                       device=torch.device("cpu"), cnn_meta=own)
    for key, word in (("arch", "arch"), ("size", "image_size"), ("classes", "class_names")):
        with pytest.raises(UserError) as info:
            DataRandSection().run(ctx(world["cnns"][key]))
        assert "\n" not in str(info.value) and f"has {word}" in str(info.value), key
    with pytest.raises(UserError, match="trained on the true labels"):
        DataRandSection().run(ctx(world["cnn"]))
    # through the command: exit 2, one line
    path = world["root"] / "true-labels.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "priors": str(world["test"]), "lsft": str(world["ckpts"]["lsft"]),
                                    "num": 12, "device": "cpu", "road_num": 0, "sections": ["datarand"],
                                    "datarand": {"cnn": str(world["cnn"]), "num": 2}}))
    capsys.readouterr()
    assert main(["--config", str(path), "--out", str(world["root"] / "true-labels")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "datarand.cnn" in err and "true labels" in err, err


def test_datarand_without_a_cnn_notes_and_renders_a_sentence() -> None:
    ctx = SimpleNamespace(options=lambda _n: DataRandOptions(), notes=[])
    section = DataRandSection()
    results = section.run(ctx)
    assert results == {"cnn": ""}
    assert ctx.notes == ["datarand: no data-randomisation CNN configured (datarand.cnn)"]
    report = Report("t")
    section.render(report, results, Path("."), ctx)
    assert "No data-randomisation CNN configured" in report.markdown()


# ----------------------------------------------------------------------------------------- 7. smprt
def test_smprt_steps_and_verdicts(held, world) -> None:
    s = held["metrics"]["smprt"]
    assert s["images"] == 2 and s["samples"] == 2 and s["noise"] == 0.1 and s["seeds"] == [3]
    assert [b["name"] for b in s["randomisations"]] == ["bottom_up"]  # full is skipped
    (b,) = s["randomisations"]
    labels = step_labels(world["model"], "bottom_up")
    assert [st["randomised"] for st in b["steps"]] == labels[1:] and [st["step"] for st in b["steps"]] == [
        1, 2, 3, 4, 5, 6]
    methods = held["metrics"]["mprt"]["methods"]
    assert s["methods"] == methods
    for st in b["steps"]:
        assert set(st["spearman"]) == set(methods)
        for v in st["spearman"].values():
            assert v["n"] == 0 or -1 - 1e-9 <= v["mean"] <= 1 + 1e-9
    v = b["verdicts"]["LSFT"]
    assert isinstance(v["passes"], bool) and v["steps"] == 6 and v["reference"] == REF
    assert "smooth MPRT (sMPRT)" in held["md"] and "**`bottom_up`** — LSFT:" in held["md"]


# ----------------------------------------------------------------------------------------- 8. prior swap
def _swap_rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith(("| same class | LSFT", "| any class | LSFT"))]


def test_swap_specificity_verdict_for_a_priors_only_generator(world, held) -> None:
    res = _evaluate(world, "po", world["ckpts"]["po"], sections=["prior_swap", "control"],
                    control={"lsft": str(world["ckpts"]["control"]), "speed_num": 6})
    swap = res["metrics"]["prior_swap"]
    rows = _swap_rows(res["md"])
    assert len(rows) == 2
    for (kind, e), row in zip(swap["donors"].items(), rows, strict=True):
        s = e["gans"]["LSFT"]
        assert s["priors_only"] is True
        expect = ("pass (follows the donor's target)" if s["donor_minus_own"]["lo"] > 0
                  else "FAIL (no closer to the donor's target)")
        assert row.startswith(f"| {kind} |") and row.rstrip(" |").endswith(expect), row
        assert "the donor (the priors)" not in row and "its own image" not in row
    # a generator that reads the image keeps the old column
    plain = held["metrics"]["prior_swap"]["donors"]
    assert all(e["gans"]["LSFT"]["priors_only"] is False for e in plain.values())
    for row in _swap_rows(held["md"]):
        assert row.rstrip(" |").endswith(("the donor (the priors)", "its own image", "undecided")), row
    # 9: the control trained with the priors-only generator's recipe (only gan.priors / gan.image differ)
    assert res["metrics"]["control"]["controls"]["LSFT control"]["differences"] == {"LSFT": []}
    assert "LSFT control vs LSFT: same recipe, budget and files (only the priors zeroed)." in res["md"]


# ----------------------------------------------------------------------------------------- 9. control section
def test_control_names_what_differs(held) -> None:
    diffs = held["metrics"]["control"]["controls"]["LSFT control"]["differences"]["LSFT"]
    # the `claims` copy names randomised-CNN files and a randomisation term the control never had; nothing else
    assert len(diffs) == 2 and diffs[0] == "gan.sanity_weight: 4.0 vs 0.0", diffs
    assert diffs[1].startswith("randomised-CNN prior files:"), diffs
    assert "LSFT control vs LSFT: **trained differently**: gan.sanity_weight: 4.0 vs 0.0; randomised-CNN" in held["md"]


def test_overlap_of_full_and_independent_with_top_down_training_files(world) -> None:
    from cnnprior.cnn.randomise import full_reinit, model_stages

    model = world["model"]
    k = len(model_stages(model))
    # the identities the flag misses (randomise seeds stage j by (seed, j, init) alone, whatever the order)
    for a, b in ((full_reinit(model, 0), randomise(model, "top_down", k, 0)),
                 (randomise(model, "independent", 1, 0), randomise(model, "top_down", 1, 0)),
                 (randomise(model, "bottom_up", k, 0), randomise(model, "top_down", k, 0))):
        assert _states_equal(a.state_dict(), b.state_dict())
    raw = torch.load(world["ckpts"]["lsft"], map_location="cpu", weights_only=True)
    raw["priors_meta"]["randomised"] = {"share": 0.5, "count": 6, "files": [
        "npys/x-train-random-fc-s0.npy", "npys/x-train-random-stem-s0.npy"]}  # top_down, default init, seed 0
    path = world["root"] / "models" / "lsft-topdown.pt"
    torch.save(raw, path)
    res = _evaluate(world, "overlap", path, sections=["mprt"],
                    mprt={"num": 2, "seed": 0, "seeds": 1, "steps": 1, "randomisations": "full,independent"})
    blocks = {b["name"]: b for b in res["metrics"]["mprt"]["randomisations"]}
    assert blocks["full"]["seen_in_training"] == ["LSFT"]
    assert blocks["independent"]["seen_in_training"] == ["LSFT"]
