"""Tests for the learned baselines (`linear`, `convnet`), the L1-only GAN twins (gan.adv_weight 0) and how evaluation
and inference compare a GAN with them: models, training through the gan stage, eval margins, inference columns."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cnnprior.cnn.model import build_cnn, save_cnn
from cnnprior.core.config import load_config
from cnnprior.core.runtime import epoch_order, seed_everything
from cnnprior.evaluate import run as evaluate_run
from cnnprior.evaluate.config import L1_SUFFIX, generator_keys
from cnnprior.explain import inference
from cnnprior.explain.learned import KEY_PREFIX, load_learned, sibling_paths
from cnnprior.gan.checkpoint import load_generator
from cnnprior.gan.data import load_gan_data
from cnnprior.gan.models import build_discriminator, build_generator, get, names
from cnnprior.gan.models.base import DEFAULT
from cnnprior.gan.models.convnet import ConvRegressor
from cnnprior.gan.models.linear import LinearBaseline
from cnnprior.gan.train import EPOCH_STATS, gan_paths, run_gan_stage
from cnnprior.maps import metrics
from cnnprior.present.viz import SHEET_PAD
from cnnprior.priors.read import read_priors
from tests.helpers import SIZE, N, gan_config, tiny_data, write_priors

D_STATS = ("d_real", "d_fake", "g_adv", "d_loss")  # the EPOCH_STATS only a trained discriminator has
TEST_COUNT = 12


def _quiet(_msg: str) -> None:
    pass


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _nested_equal(a: object, b: object) -> bool:
    """Exact equality of nested dicts/lists of tensors and primitives."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_nested_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _initial_networks(cfg) -> tuple[dict, dict]:
    """G's and D's initial weights exactly as the gan stage builds them (seed, then G, then D)."""
    gc = cfg.gan
    seed_everything(gc.seed)
    g = build_generator(gc.variant, N, gc.width, gc.depth, gc.cond_channels, gc.cond_hidden)
    d = build_discriminator(gc.disc_width, gc.disc_layers)
    return ({k: v.detach().clone() for k, v in g.state_dict().items()},
            {k: v.detach().clone() for k, v in d.state_dict().items()})


def _train(root: Path, name: str, train: Path, val: Path, **gan: object) -> dict:
    """One tiny gan-stage run under root/name: its config, result, paths, log lines and last checkpoint."""
    sub = root / name
    variant = gan.get("variant", "lsft")
    cfg = load_config(gan_config(sub, train, val, out=str(sub / "models" / f"tiny-{variant}"), **gan))
    lines: list[str] = []
    result = run_gan_stage(cfg, log=lines.append)
    paths = gan_paths(cfg)
    return {"cfg": cfg, "result": result, "paths": paths, "lines": lines,
            "last": torch.load(paths["last"], weights_only=True)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Tiny data (S=16, n=4; target = mean of the priors) and one-epoch runs: convnet and linear (config left at
    gan.adv_weight 1), an LSFT GAN (adv_weight 1) and its L1-only twin (adv_weight 0)."""
    root = tmp_path_factory.mktemp("learned")
    train, val = tiny_data(root)
    test = write_priors(root / "npys" / "tiny-test.npy", TEST_COUNT, seed=3, split="test")
    runs = {
        "convnet": _train(root, "convnet", train, val, variant="convnet"),
        "linear": _train(root, "linear", train, val, variant="linear"),
        "lsft": _train(root, "lsft", train, val),
        "lsft_l1": _train(root, "lsft_l1", train, val, adv_weight=0),
    }
    return {"root": root, "train": train, "val": val, "test": test, "runs": runs}


# ----------------------------------------------------------------------------------------- registry and models
def test_registry_lists_gans_and_baselines() -> None:
    builtin = ("lsft", "gsft", "linear", "convnet")
    assert names()[:4] == builtin  # the built-ins first, in their `order`; generators registered later follow
    assert names(adversarial=True)[:2] == ("lsft", "gsft") and names(adversarial=False)[:2] == ("linear", "convnet")
    assert DEFAULT == "lsft"
    assert [get(v).adversarial for v in builtin] == [True, True, False, False]
    assert get("linear") is LinearBaseline and get("convnet") is ConvRegressor
    assert generator_keys()[:6] == ("lsft", "gsft", "lsft_l1", "gsft_l1", "linear", "convnet") and L1_SUFFIX == "_l1"


@pytest.mark.parametrize("variant", ["linear", "convnet"])
def test_baselines_build_map_and_rebuild(variant: str) -> None:
    torch.manual_seed(0)
    model = build_generator(variant, 8, 32, 3, 8, 8)
    assert type(model) is get(variant) and model.variant == variant
    g = torch.Generator().manual_seed(1)
    image, priors = torch.rand(3, 3, 20, 20, generator=g), torch.rand(3, 8, 20, 20, generator=g)
    with torch.no_grad():
        out = model(image, priors)
    assert out.shape == (3, 1, 20, 20) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    # config() rebuilds the same architecture; with the same seed, the same weights and the same maps
    assert model.config()["n_priors"] == 8
    torch.manual_seed(0)
    again = type(model)(**model.config())
    assert _equal_states(model.state_dict(), again.state_dict())
    torch.manual_seed(123)  # another seed: the loaded weights, not the init, make it identical
    other = type(model)(**model.config())
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other(image, priors), out)
    with pytest.raises(ValueError, match=r"expected priors of shape \(B, 8, H, W\)"):
        model(image, priors[:, :4])


def test_linear_starts_as_the_mean_of_the_priors_and_clamps() -> None:
    model = build_generator("linear", 8, 64, 7, 8, 8)  # width / depth are accepted and ignored
    assert model.config() == {"n_priors": 8}
    assert sum(p.numel() for p in model.parameters()) == 8 + 3 + 1  # one weight per input channel, one bias
    g = torch.Generator().manual_seed(2)
    # multiples of 1/256 and a weight of 1/8: every product and partial sum is exact in float32
    priors = torch.randint(0, 257, (4, 8, 16, 16), generator=g).float() / 256
    image = torch.rand(4, 3, 16, 16, generator=g)
    with torch.no_grad():
        assert torch.equal(model(image, priors), priors.mean(1, keepdim=True))
        four = build_generator("linear", 4, 8, 1, 8, 8)
        p4 = torch.rand(2, 4, 9, 9, generator=g)
        assert torch.allclose(four(torch.rand(2, 3, 9, 9, generator=g), p4), p4.mean(1, keepdim=True), atol=1e-7)
        # clamped to [0, 1]: a large bias saturates at 1, a large negative one at 0
        model.mix.bias.fill_(5.0)
        assert torch.equal(model(image, priors), torch.ones(4, 1, 16, 16))
        model.mix.bias.fill_(-5.0)
        assert torch.equal(model(image, priors), torch.zeros(4, 1, 16, 16))
        # the image channels count once their weights do: 0.25 * red + bias 0.1
        model.mix.weight.zero_()
        model.mix.weight[0, 8] = 0.25
        model.mix.bias.fill_(0.1)
        assert torch.allclose(model(image, priors), 0.25 * image[:, :1] + 0.1, atol=1e-7)


def test_convnet_parameter_count_and_receptive_structure() -> None:
    model = build_generator("convnet", 8, 32, 3, 8, 8)
    assert model.config() == {"n_priors": 8, "width": 32, "depth": 3}
    # conv 11->32 (5x5) + bias, two convs 32->32 (5x5) + bias, conv 32->1 (5x5) + bias
    expected = (11 * 32 * 25 + 32) + 2 * (32 * 32 * 25 + 32) + (32 * 1 * 25 + 1)
    assert expected == 60_897
    assert sum(p.numel() for p in model.parameters()) == expected
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == \
        [(11, 32, (5, 5), (2, 2)), (32, 32, (5, 5), (2, 2)), (32, 32, (5, 5), (2, 2)), (32, 1, (5, 5), (2, 2))]
    # the map is the sigmoid of the last conv: strictly inside (0, 1), and it depends on the image
    torch.manual_seed(0)
    image, priors = torch.rand(2, 3, 12, 12), torch.rand(2, 8, 12, 12)
    with torch.no_grad():
        out = model(image, priors)
        assert 0 < float(out.min()) and float(out.max()) < 1
        assert not torch.equal(out, model(torch.zeros_like(image), priors))
    small = build_generator("convnet", 4, 8, 1, 8, 8)  # the tiny training config's size
    assert sum(p.numel() for p in small.parameters()) == (7 * 8 * 25 + 8) + (8 * 25 + 1)
    with pytest.raises(ValueError, match="depth >= 1"):
        ConvRegressor(8, 32, 0)


# ----------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("variant", ["convnet", "linear"])
def test_baseline_trains_without_discriminator(trained, variant: str) -> None:
    run = trained["runs"][variant]
    cfg, result, last, paths = run["cfg"], run["result"], run["last"], run["paths"]
    assert cfg.gan.adv_weight == 1.0  # the config asks for the adversarial term ...
    g0, d0 = _initial_networks(cfg)
    # ... but D is never trained: its weights and optimiser are the untouched initial ones
    assert _equal_states(last["discriminator"], d0)
    assert last["optim_d"]["state"] == {}
    assert not _equal_states(last["generator"], g0)  # G did learn
    assert len(last["optim_g"]["state"]) == len(g0)
    assert (last["epoch"], last["step"], last["variant"]) == (1, 4, variant)
    (h,) = result["history"]
    assert all(math.isnan(h[k]) for k in D_STATS), h
    assert math.isfinite(h["l1"]) and 0 < h["l1"] < 1
    assert all(math.isfinite(h[f"val_{k}"]) for k in ("l1", "r")) and -1 <= h["val_r"] <= 1
    assert set(EPOCH_STATS) <= h.keys()
    assert run["lines"][0].startswith(f"gan: {variant} generator (")
    assert run["lines"][1].startswith("epoch 1/1: L1 ")
    for key in ("best", "last", "export"):
        model, meta = load_generator(paths[key], expect_variant=variant)
        assert type(model) is get(variant) and not model.training
        assert meta["variant"] == variant and meta["priors_meta"]["n"] == N and meta["priors_meta"]["size"] == SIZE
        assert meta["metrics"]["r"] == h["val_r"] and math.isfinite(meta["metrics"]["r"])
    model, _ = load_generator(paths["export"])
    assert _equal_states(model.state_dict(), last["generator"])
    # the stored validation r is what the loaded model scores on the validation file
    t = read_priors(trained["val"]).tensors()
    with torch.no_grad():
        pred = model(t["image"], t["priors"])
    assert pred.shape == (16, 1, SIZE, SIZE) and 0 <= float(pred.min()) and float(pred.max()) <= 1
    assert h["val_r"] == pytest.approx(float(metrics.pearson(pred, t["target"]).mean()), abs=1e-6)
    assert h["val_l1"] == pytest.approx(float(metrics.l1(pred, t["target"]).mean()), abs=1e-6)


def _l1_only_run(cfg) -> dict:
    """One epoch of Adam on l1_weight * mean |G - T| alone, written out by hand: the seed, G then D built as the stage
    builds them (D only to draw the same random numbers), the stage's batches, CPU determinism as the stage sets it."""
    gc = cfg.gan
    train_data, _, _ = load_gan_data(cfg)
    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        seed_everything(gc.seed)
        g = build_generator(gc.variant, N, gc.width, gc.depth, gc.cond_channels, gc.cond_hidden)
        build_discriminator(gc.disc_width, gc.disc_layers)
        opt = torch.optim.Adam(g.parameters(), lr=gc.lr, betas=(gc.beta1, gc.beta2))
        g.train()
        order = epoch_order(gc.seed, 0, len(train_data))
        for b in range(0, len(order), gc.batch_size):
            image, priors, target = train_data.batch(order[b:b + gc.batch_size], torch.device("cpu"))
            opt.zero_grad(set_to_none=True)
            (gc.l1_weight * (g(image, priors).float() - target).abs().mean()).backward()
            opt.step()
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    return g.state_dict()


@pytest.mark.parametrize("variant", ["convnet", "linear"])
def test_baseline_training_is_a_plain_l1_loop(trained, variant: str) -> None:
    """The trainer's L1-only path is exactly Adam on l1_weight * mean |G - T| (bit for bit)."""
    run = trained["runs"][variant]
    assert _nested_equal(run["last"]["generator"], _l1_only_run(run["cfg"]))


def test_l1_twin_leaves_the_discriminator_alone_and_equals_a_plain_l1_loop(trained) -> None:
    twin, gan = trained["runs"]["lsft_l1"], trained["runs"]["lsft"]
    assert twin["cfg"].gan.adv_weight == 0.0 and gan["cfg"].gan.adv_weight == 1.0
    g0, d0 = _initial_networks(twin["cfg"])
    assert _equal_states(g0, _initial_networks(gan["cfg"])[0])  # same seed: same starting generator
    last = twin["last"]
    assert _equal_states(last["discriminator"], d0) and last["optim_d"]["state"] == {}
    (h,) = twin["result"]["history"]
    assert all(math.isnan(h[k]) for k in D_STATS) and math.isfinite(h["l1"]) and math.isfinite(h["val_r"])
    assert last["config"]["gan"]["adv_weight"] == 0.0  # what evaluation's `lsft_l1` key checks

    # the twin's generator: Adam on the L1 term alone, bit for bit, nothing from D
    assert _nested_equal(last["generator"], _l1_only_run(twin["cfg"]))

    # with adv_weight 1 the discriminator trains, its statistics are real, and G ends elsewhere
    glast = gan["last"]
    assert not _equal_states(glast["discriminator"], d0) and glast["optim_d"]["state"] != {}
    (hg,) = gan["result"]["history"]
    assert 0 < hg["d_real"] < 1 and 0 < hg["d_fake"] < 1 and hg["g_adv"] > 0 and hg["d_loss"] > 0
    assert not _equal_states(glast["generator"], last["generator"])


def test_convnet_resume_at_epoch_boundary_is_exact(trained, tmp_path) -> None:
    train, val = trained["train"], trained["val"]
    config = gan_config(tmp_path / "a", train, val, variant="convnet", epochs=1, out=str(tmp_path / "a" / "run"))
    run_gan_stage(load_config(config), log=_quiet)
    continued = run_gan_stage(load_config(config, ["gan.epochs=2"]), resume=True, log=_quiet)
    straight = run_gan_stage(load_config(gan_config(tmp_path / "b", train, val, variant="convnet", epochs=2,
                                                    out=str(tmp_path / "b" / "run"))), log=_quiet)
    a = torch.load(tmp_path / "a" / "run-last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run-last.pt", weights_only=True)
    for key in ("generator", "discriminator", "optim_g", "optim_d"):
        assert _nested_equal(a[key], b[key]), key
    assert a["step"] == b["step"] == 8 and [h["epoch"] for h in continued["history"]] == [1, 2]
    assert continued["history"][1]["val_r"] == straight["history"][1]["val_r"]
    assert math.isnan(continued["history"][1]["d_real"])


# ----------------------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def evaluation(trained) -> dict:
    """A 2-class CNN (fidelity never runs it) and a fidelity-only eval config: lsft + lsft_l1 + convnet + linear."""
    root = trained["root"]
    torch.manual_seed(0)
    cnn_path = save_cnn(build_cnn("resnet18", ["circle", "square"], image_size=32), root / "models" / "tiny-cnn.pt",
                        val_accuracy=0.5, epoch=0, config={}, dataset="shapes")
    runs = trained["runs"]
    settings = {"name": "learned", "priors": str(trained["test"]), "cnn": str(cnn_path), "num": TEST_COUNT,
                "batch_size": 4, "device": "cpu", "sections": [],
                **{key: str(runs[key]["paths"]["export"]) for key in ("lsft", "lsft_l1", "convnet", "linear")}}
    config = root / "eval-learned.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    out = root / "report"
    assert evaluate_run.main(["--config", str(config), "--out", str(out)]) == 0
    return {"settings": settings, "config": config, "out": out,
            "metrics": json.loads((out / "metrics.json").read_text(encoding="utf-8"))}


def _val_r(path: str | Path) -> float:
    return float(load_generator(path)[1]["metrics"]["r"])


def _per_image(path: str | Path, t: dict) -> dict[str, torch.Tensor]:
    model, _ = load_generator(path)
    with torch.no_grad():
        pred = model(t["image"], t["priors"])
    return {"l1": metrics.l1(pred, t["target"]), "r": metrics.pearson(pred, t["target"])}


def test_eval_rows_and_learned_margins(evaluation, trained) -> None:
    m, s = evaluation["metrics"], evaluation["settings"]
    fid = m["fidelity"]
    assert list(fid)[:4] == ["LSFT", "LSFT (L1 only)", "learned linear", "learned convnet"]
    assert set(m["gans"]) == {"LSFT", "LSFT (L1 only)", "learned linear", "learned convnet"}
    assert m["sections_run"] == ["fidelity"]
    r_lin, r_conv = _val_r(s["linear"]), _val_r(s["convnet"])
    assert r_lin != r_conv
    best_key = "linear" if r_lin > r_conv else "convnet"
    lsft = fid["LSFT"]
    assert {"margin", "margin_learned", "margin_twin"} <= lsft.keys()
    assert lsft["margin_learned"]["over"] == f"learned {best_key} (val r {max(r_lin, r_conv):.3f})"
    assert lsft["margin_twin"]["over"] == "LSFT (L1 only)"
    for label in ("LSFT (L1 only)", "learned linear", "learned convnet"):  # only GANs get these margins
        assert "margin_learned" not in fid[label] and "margin_twin" not in fid[label] and "margin" in fid[label]
    # the numbers: paired per-image differences of the loaded models' maps on the evaluated records
    t = read_priors(trained["test"]).tensors()
    ours = _per_image(s["lsft"], t)
    for key, other in (("margin_learned", s[best_key]), ("margin_twin", s["lsft_l1"])):
        theirs = _per_image(other, t)
        for score in ("l1", "r"):
            diff = (ours[score] - theirs[score]).double()
            assert lsft[key][score] == pytest.approx(float(diff.mean()), abs=1e-6), (key, score)
            lo, hi = lsft[key][f"{score}_ci95"]
            assert lo - 1e-9 <= lsft[key][score] <= hi + 1e-9
    assert fid["learned convnet"]["r"] == pytest.approx(float(_per_image(s["convnet"], t)["r"].mean()), abs=1e-6)
    md = (evaluation["out"] / "report.md").read_text(encoding="utf-8")
    assert "margin over the best learned baseline" in md and "The adversarial ablation" in md
    assert f"| LSFT | learned {best_key} (val r {max(r_lin, r_conv):.3f}) |" in md
    assert "| LSFT | LSFT (L1 only) |" in md


def test_eval_picks_the_learned_baseline_with_the_higher_val_r(evaluation, trained, tmp_path) -> None:
    """Lower the better baseline's recorded val r in a copy: the margin switches to the other one."""
    s = evaluation["settings"]
    r_lin, r_conv = _val_r(s["linear"]), _val_r(s["convnet"])
    best, other = ("linear", "convnet") if r_lin > r_conv else ("convnet", "linear")
    ck = torch.load(s[best], weights_only=True)
    ck["metrics"] = {**ck["metrics"], "r": -0.5}
    demoted = tmp_path / f"demoted-{best}.pt"
    torch.save(ck, demoted)
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({**s, best: str(demoted)}), encoding="utf-8")
    assert evaluate_run.main(["--config", str(config), "--out", str(tmp_path / "report")]) == 0
    m = json.loads((tmp_path / "report" / "metrics.json").read_text(encoding="utf-8"))
    assert m["fidelity"]["LSFT"]["margin_learned"]["over"] == f"learned {other} (val r {_val_r(s[other]):.3f})"
    # without any learned baseline or twin, no such margins (and no empty tables)
    config.write_text(yaml.safe_dump({**s, "convnet": "", "linear": "", "lsft_l1": ""}), encoding="utf-8")
    assert evaluate_run.main(["--config", str(config), "--out", str(tmp_path / "bare")]) == 0
    bare = json.loads((tmp_path / "bare" / "metrics.json").read_text(encoding="utf-8"))
    assert "margin" in bare["fidelity"]["LSFT"]
    assert "margin_learned" not in bare["fidelity"]["LSFT"] and "margin_twin" not in bare["fidelity"]["LSFT"]
    md = (tmp_path / "bare" / "report.md").read_text(encoding="utf-8")
    assert "best learned baseline" not in md and "adversarial ablation" not in md


def test_eval_refuses_an_adversarial_checkpoint_as_l1_twin(evaluation, trained, tmp_path, capsys) -> None:
    s, runs = evaluation["settings"], trained["runs"]
    adversarial = str(runs["lsft"]["paths"]["export"])
    for key, path, message in (
            ("lsft_l1", adversarial, f"key 'lsft_l1': {adversarial} was trained with gan.adv_weight 1.0, not 0"),
            ("convnet", s["lsft"], f"key 'convnet': {s['lsft']} is a lsft checkpoint"),
            ("lsft", s["convnet"], f"key 'lsft': {s['convnet']} is a convnet checkpoint")):
        config = tmp_path / f"bad-{key}.yaml"
        config.write_text(yaml.safe_dump({**s, key: path}), encoding="utf-8")
        out = tmp_path / f"out-{key}"
        capsys.readouterr()
        assert evaluate_run.main(["--config", str(config), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
        assert not out.exists()
    # an L1-only model under a GAN key is accepted, with a warning note
    config = tmp_path / "twin-as-gan.yaml"
    config.write_text(yaml.safe_dump({**s, "lsft": s["lsft_l1"], "convnet": "", "linear": ""}), encoding="utf-8")
    assert evaluate_run.main(["--config", str(config), "--out", str(tmp_path / "twin")]) == 0
    notes = json.loads((tmp_path / "twin" / "metrics.json").read_text(encoding="utf-8"))["notes"]
    assert any("was trained with gan.adv_weight 0: it is an L1-only model" in n for n in notes), notes


# ----------------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def beside(trained) -> dict:
    """The LSFT generator as models/run-lsft.pt with the learned baselines beside it (run-convnet.pt) or not."""
    root, runs = trained["root"] / "inference", trained["runs"]
    only_conv = root / "conv"
    both = root / "both"
    alone = root / "alone"
    for folder in (only_conv, both, alone):
        (folder / "models").mkdir(parents=True)
        shutil.copy(runs["lsft"]["paths"]["export"], folder / "models" / "run-lsft.pt")
    for folder in (only_conv, both):
        shutil.copy(runs["convnet"]["paths"]["export"], folder / "models" / "run-convnet.pt")
    shutil.copy(runs["linear"]["paths"]["export"], both / "models" / "run-linear.pt")
    return {"conv": only_conv / "models" / "run-lsft.pt", "both": both / "models" / "run-lsft.pt",
            "alone": alone / "models" / "run-lsft.pt", "root": root}


def _infer(ckpt: Path, priors: Path, out: Path, *extra: str, quiet: bool = True) -> int:
    return inference.main(["--checkpoint", str(ckpt), "--priors", str(priors), "--out", str(out), "--device", "cpu",
                           "--batch-size", "5", *(["--quiet"] if quiet else []), *extra], variant="lsft")


def _read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def test_sibling_paths(beside) -> None:
    conv = beside["conv"]
    assert sibling_paths(conv) == [conv.with_name("run-convnet.pt")]
    assert sibling_paths(beside["both"]) == [beside["both"].with_name(f"run-{b}.pt") for b in ("linear", "convnet")]
    assert sibling_paths(beside["alone"]) == []
    best = conv.with_name("run-lsft-best.pt")  # what the gan stage writes: the prefix is before -lsft
    assert sibling_paths(best) == [conv.with_name("run-convnet.pt")]
    assert sibling_paths(conv.with_name("no-gan-here.pt")) == []


def test_inference_scores_the_convnet_beside_the_generator(beside, trained, tmp_path, capsys) -> None:
    out = tmp_path / "conv"
    capsys.readouterr()
    assert _infer(beside["conv"], trained["test"], out, quiet=False) == 0
    printed = capsys.readouterr().out
    m = _read_metrics(out)
    conv_path = beside["conv"].with_name("run-convnet.pt")
    val_r = _val_r(conv_path)
    assert "learned_convnet" in m["mean"] and "learned_linear" not in m["mean"]
    assert m["labels"]["learned_convnet"] == f"learned convnet (L1-trained regressor, val r {val_r:.3f})"
    row = m["mean"]["learned_convnet"]
    assert math.isfinite(row["r"]) and row["r_ci95"][0] <= row["r"] <= row["r_ci95"][1]
    # the numbers: the convnet's maps of the test records, scored directly
    t = read_priors(trained["test"]).tensors()
    direct = _per_image(conv_path, t)
    assert row["r"] == pytest.approx(float(direct["r"].mean()), abs=2e-6)
    assert row["l1"] == pytest.approx(float(direct["l1"].mean()), abs=2e-6)
    ml = m["margin_learned"]
    assert ml["over"] == "learned_convnet"
    diff = [e["gan"]["r"] - e["learned_convnet"]["r"] for e in m["per_image"]]
    assert ml["r"] == pytest.approx(float(np.mean(diff)), abs=1e-5)
    gan = _per_image(beside["conv"], t)
    assert ml["r"] == pytest.approx(float((gan["r"] - direct["r"]).double().mean()), abs=2e-6)
    # the printed table: a row for the convnet and the GAN's margin over it
    label = m["labels"]["learned_convnet"]
    assert any(line.startswith(label) and f"{row['r']:.3f} [" in line for line in printed.splitlines()), printed
    assert f"GAN r - {label} r: {ml['r']:+.3f}, 95% CI [{ml['r_ci95'][0]:.3f}, {ml['r_ci95'][1]:.3f}]" in printed
    # the sheet's extra column and the index's
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "learned convnet (L1-trained regressor" in html
    with Image.open(out / "sheet.png") as sheet:
        width_with = sheet.width
    bare = tmp_path / "none"
    assert _infer(beside["conv"], trained["test"], bare, "--learned", "none") == 0
    mb = _read_metrics(bare)
    assert not any(k.startswith(KEY_PREFIX) for k in mb["mean"]) and "margin_learned" not in mb
    assert not any(k.startswith(KEY_PREFIX) for k in mb["labels"])
    assert mb["mean"]["gan"] == m["mean"]["gan"] and mb["margin"] == m["margin"]  # the rest is unchanged
    with Image.open(bare / "sheet.png") as sheet:
        assert width_with - sheet.width == inference.SHEET_CELL + SHEET_PAD  # one more column
    assert "learned convnet" not in (bare / "index.html").read_text(encoding="utf-8")


def test_inference_margin_over_the_baseline_with_the_higher_val_r(beside, trained, tmp_path) -> None:
    out = tmp_path / "both"
    assert _infer(beside["both"], trained["test"], out) == 0
    m = _read_metrics(out)
    folder = beside["both"].parent
    vals = {b: _val_r(folder / f"run-{b}.pt") for b in ("linear", "convnet")}
    assert {"learned_linear", "learned_convnet"} <= m["mean"].keys()
    best = max(vals, key=vals.get)
    assert m["margin_learned"]["over"] == KEY_PREFIX + best
    diff = [e["gan"]["r"] - e[KEY_PREFIX + best]["r"] for e in m["per_image"]]
    assert m["margin_learned"]["r"] == pytest.approx(float(np.mean(diff)), abs=1e-5)
    # explicit --learned: only the named file, wherever it lies
    out2 = tmp_path / "explicit"
    other = min(vals, key=vals.get)
    assert _infer(beside["alone"], trained["test"], out2, "--learned", str(folder / f"run-{other}.pt")) == 0
    m2 = _read_metrics(out2)
    assert [k for k in m2["mean"] if k.startswith(KEY_PREFIX)] == [KEY_PREFIX + other]
    assert m2["margin_learned"]["over"] == KEY_PREFIX + other
    # no sibling, no --learned: nothing learned
    out3 = tmp_path / "alone"
    assert _infer(beside["alone"], trained["test"], out3) == 0
    assert "margin_learned" not in _read_metrics(out3)


def test_inference_refuses_a_gan_as_learned_baseline(beside, trained, tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    capsys.readouterr()
    assert _infer(beside["alone"], trained["test"], out, "--learned", str(beside["alone"])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --learned: ") and "is a lsft checkpoint, not a learned baseline" in err
    assert "\n" not in err and not out.exists()
    assert _infer(beside["alone"], trained["test"], out, "--learned", str(tmp_path / "absent.pt")) == 2
    assert "no such file" in capsys.readouterr().err and not out.exists()
    # a learned baseline is no GAN: lsft inference refuses it as --checkpoint
    conv = beside["conv"].with_name("run-convnet.pt")
    assert _infer(conv, trained["test"], out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {conv} is a learned-baseline (convnet) checkpoint, not a GAN") and "\n" not in err and not out.exists()


def test_load_learned_leaves_out_a_baseline_trained_on_other_priors(beside, trained, tmp_path) -> None:
    gmeta = load_generator(beside["alone"])[1]
    ck = torch.load(beside["conv"].with_name("run-convnet.pt"), weights_only=True)
    ck["priors_meta"] = {**ck["priors_meta"], "size": SIZE * 2}
    torch.save(ck, tmp_path / "big-convnet.pt")
    learned, notes = load_learned([str(tmp_path / "big-convnet.pt")], beside["alone"], gmeta, torch.device("cpu"))
    assert learned == [] and len(notes) == 1 and "left out" in notes[0] and "32" in notes[0]
    learned, notes = load_learned(None, beside["both"], gmeta, torch.device("cpu"))
    assert [b.key for b in learned] == ["learned_linear", "learned_convnet"] and notes == []
    assert all(b.val_r is not None and math.isfinite(b.val_r) for b in learned)
    assert load_learned([], beside["both"], gmeta, torch.device("cpu")) == ([], [])


def test_mprt_pairs_each_gan_with_the_best_learned_baseline_and_its_twin(evaluation, tmp_path) -> None:
    s = evaluation["settings"]
    r_lin, r_conv = _val_r(s["linear"]), _val_r(s["convnet"])
    best = "learned linear" if r_lin > r_conv else "learned convnet"
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({**s, "sections": ["mprt"], "mprt": {"num": 4, "steps": 1, "seeds": 2}}),
                      encoding="utf-8")
    assert evaluate_run.main(["--config", str(config), "--out", str(tmp_path / "report")]) == 0
    m = json.loads((tmp_path / "report" / "metrics.json").read_text(encoding="utf-8"))
    steps = m["mprt"]["steps"]
    assert list(steps[0]["paired"]) == [f"LSFT − {best}", "LSFT − LSFT (L1 only)"]
    for st in steps:  # a paired mean is the difference of the two methods' means (same images, same seeds)
        for pair, stat in st["paired"].items():
            a, b = pair.split(" − ")
            if stat["mean"] is not None and st["spearman"][a]["mean"] is not None:
                assert stat["mean"] == pytest.approx(st["spearman"][a]["mean"] - st["spearman"][b]["mean"], abs=1e-6)
    assert "Paired per image (Spearman" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
