"""Prior files from re-initialised copies of the target CNN, and mixing them into GAN training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cnnprior.cnn.model import build_cnn, load_cnn, save_cnn
from cnnprior.core.config import load_config
from cnnprior.core.errors import UserError
from cnnprior.gan import step as gan_step
from cnnprior.gan.data import MapData, randomised_files, with_randomised, with_references
from cnnprior.gan.step import pearson_rows, sanity_term
from cnnprior.gan.train import run_gan_stage
from cnnprior.priors.random_priors import random_prior_path, run_random_priors_stage, stage_steps
from cnnprior.priors.read import read_priors
from cnnprior.priors.stage import run_priors_stage


@pytest.fixture
def stage_files(tiny_config, tmp_path: Path) -> dict:
    cfg = tiny_config("priors.size=16", "priors.n=4", "priors.splits=[train]", "priors.train_limit=8",
                      "priors.randomised_stages=[fc, layer3]", "priors.randomised_limit=6")
    torch.manual_seed(0)
    save_cnn(build_cnn("resnet18", ["circle", "square", "triangle", "cross", "star"], 32),
             cfg.cnn_checkpoint, val_accuracy=0.2, epoch=0, config={}, dataset="shapes")
    trained = run_priors_stage(cfg, log=lambda _m: None)
    written = run_random_priors_stage(cfg, log=lambda _m: None)
    return {"cfg": cfg, "trained": trained[0], "random": written}


def test_random_prior_files_explain_the_trained_cnns_class_with_the_copys_maps(stage_files) -> None:
    cfg = stage_files["cfg"]
    assert stage_files["random"] == [random_prior_path(cfg.priors_prefix, "fc", 0),
                                     random_prior_path(cfg.priors_prefix, "layer3", 0)]
    model, _ = load_cnn(cfg.cnn_checkpoint)
    trained = read_priors(stage_files["trained"])
    for path, (step, stage) in zip(stage_files["random"], [(1, "fc"), (3, "layer3")], strict=True):
        pf = read_priors(path)
        assert len(pf) == 6 and pf.meta["randomised"] == {"steps": step, "stage": stage, "seed": 0,
                                                           "order": "top_down", "init": "default",
                                                           "explained": "the trained CNN's predicted class"}
        assert (pf.records["explained"] >= 0).all()
        shared = [(k, int(np.flatnonzero(trained.records["index"] == i)[0]))
                  for k, i in enumerate(pf.records["index"]) if i in trained.records["index"]]
        assert shared  # the same images as the trained CNN's file, with the copy's maps ...
        # ... explaining the class the trained CNN predicted for them (its own file's explained class)
        assert all(pf.records["explained"][k] == trained.records["explained"][j] for k, j in shared)
        assert max(np.abs(pf.records["priors"][k].astype(int) - trained.records["priors"][j]).max()
                   for k, j in shared) > 10


def test_randomised_stage_names_and_refusals(stage_files) -> None:
    cfg = stage_files["cfg"]
    model, _ = load_cnn(cfg.cnn_checkpoint)
    assert stage_steps(model, ["all"]) == [(1, "fc"), (2, "layer4"), (3, "layer3"), (4, "layer2"), (5, "layer1"),
                                           (6, "stem")]
    with pytest.raises(UserError, match=r"priors.randomised_stages: 'layer9' is not a stage.*fc, layer4"):
        stage_steps(model, ["layer9"])
    with pytest.raises(UserError, match=r"prior file exists; use --resume to keep it, --overwrite"):
        run_random_priors_stage(cfg, log=lambda _m: None)


def test_gan_data_mixes_randomised_records_at_the_configured_share(stage_files, tiny_config) -> None:
    cfg = stage_files["cfg"]
    ref = read_priors(stage_files["trained"])
    train = MapData.from_files([ref])
    mix_cfg = load_config(None, [f"priors.out={cfg.priors.out}", "gan.randomised_share=0.5"])
    mixed, info = with_randomised(mix_cfg, train, ref)
    assert len(mixed) == 16 and info["count"] == 8 and info["files"] == [str(p) for p in stage_files["random"]]
    assert torch.equal(mixed.image[:8], train.image)  # the trained CNN's records first, unchanged
    pool = torch.cat([torch.from_numpy(np.ascontiguousarray(read_priors(p).records["target"])) for p in info["files"]])
    extra = mixed.target[8:, 0]
    assert all(any(torch.equal(t, p) for p in pool) for t in extra)  # the rest come from the random files
    again, _ = with_randomised(mix_cfg, train, ref)
    assert torch.equal(again.target, mixed.target)  # deterministic for gan.seed
    too_much = load_config(None, [f"priors.out={cfg.priors.out}", "gan.randomised_share=0.9"])
    with pytest.raises(UserError, match=r"needs 72 randomised-copy records but .* hold 12"):
        with_randomised(too_much, train, ref)
    none = load_config(None, [f"priors.out={cfg.priors.out}x", "gan.randomised_share=0.5"])
    with pytest.raises(UserError, match=r"no randomised-copy prior files exist.*randomised_stages=\[all\]"):
        with_randomised(none, train, ref)


def test_gan_takes_only_the_randomised_files_its_own_priors_config_writes(tmp_path) -> None:
    """With gan.randomised empty the recipe takes the files of its own priors scheme and seeds only: files another
    config wrote under the same prefix (other orders, inits, seeds, stages) must not change what it trains on."""
    prefix = str(tmp_path / "cnn")
    mine = [random_prior_path(prefix, stage, seed) for stage in ("fc", "layer4") for seed in (0, 1)]
    others = [random_prior_path(prefix, "fc", 2), random_prior_path(prefix, "fc", 0, "bottom_up", "xavier_uniform"),
              random_prior_path(prefix, "layer4", 0, "independent", "default"),
              random_prior_path(prefix, "layer4", 0, "top_down", "kaiming_normal")]
    for path in mine + others:
        path.write_bytes(b"")
    cfg = load_config(None, [f"priors.out={prefix}", "priors.randomised_seeds=2", "priors.randomised_stages=[all]"])
    assert randomised_files(cfg) == sorted(map(str, mine))
    assert randomised_files(load_config(None, [f"priors.out={prefix}", "priors.randomised_seeds=2",
                                               "priors.randomised_stages=[fc]"])) == sorted(str(p) for p in mine[:2])
    xavier = load_config(None, [f"priors.out={prefix}", "priors.randomised_order=bottom_up",
                                "priors.randomised_init=xavier_uniform", "priors.randomised_stages=[all]"])
    assert randomised_files(xavier) == [str(others[1])]
    listed = load_config(None, [f"priors.out={prefix}", f"gan.randomised=[{others[0]}]"])
    assert randomised_files(listed) == [str(others[0])]  # an explicit list wins


# ----------------------------------------------------------------------------------------- gan.sanity_weight
def test_sanity_weight_pairs_each_randomised_copy_with_the_trained_cnns_record_of_its_image(stage_files) -> None:
    cfg = stage_files["cfg"]
    ref = read_priors(stage_files["trained"])
    train = MapData.from_files([ref])
    mix_cfg = load_config(None, [f"priors.out={cfg.priors.out}", "gan.randomised_share=0.5", "gan.sanity_weight=5"])
    mixed, info = with_randomised(mix_cfg, train, ref)
    plain, _ = with_randomised(load_config(None, [f"priors.out={cfg.priors.out}", "gan.randomised_share=0.5"]),
                               train, ref)
    assert torch.equal(mixed.target, plain.target)  # the same samples: only the pairing is added
    assert plain.refs is None and mixed.refs is not None and len(mixed.refs) == len(mixed) == 16
    assert (mixed.refs[:8] == -1).all()  # the trained CNN's own records have no partner
    index = np.concatenate([np.asarray(p["index"]) for p in mixed.parts])[mixed.positions()]
    reference, paired = mixed.reference(torch.arange(16), torch.device("cpu"))
    assert info["paired"] == int(paired.sum()) > 0 and torch.equal(paired[:8], torch.zeros(8))
    for k in range(8, 16):
        hit = np.flatnonzero(np.asarray(ref.records["index"]) == index[k])
        if len(hit):  # its image is among the training records: the trained CNN's target of that image
            assert paired[k] == 1 and torch.equal(reference[k, 0], torch.from_numpy(
                np.array(ref.records["target"][hit[0]])).float() / 255)
        else:
            assert paired[k] == 0 and int(reference[k].abs().max()) == 0
    # the pairing survives taking samples in another order (the epoch's shuffle)
    order = torch.tensor([12, 3, 9])
    sub = mixed.take(order)
    assert torch.equal(sub.reference(torch.arange(3), torch.device("cpu"))[0], reference[order])
    assert torch.equal(sub.target, mixed.target[order])


def test_sanity_weight_refusals(stage_files) -> None:
    with pytest.raises(UserError, match=r"gan.sanity_weight.*gan.randomised_share > 0"):
        load_config(None, ["gan.sanity_weight=1"])
    ref, copy = read_priors(stage_files["trained"]), read_priors(stage_files["random"][0])
    pool = MapData.from_files([copy])
    no_train = MapData.from_files([ref]).take(np.array([], dtype=np.int64))  # no training image to pair with
    with pytest.raises(UserError, match=r"none of the 2 randomised-copy samples has its image"):
        with_references(no_train, pool.take(torch.arange(2)), ref, [copy], ["copy.npy"])
    copy.meta = {**copy.meta, "cnn": {**copy.meta["cnn"], "checkpoint_sha256": "0" * 64}}  # another CNN's copy
    train = MapData.from_files([ref])
    with pytest.raises(UserError, match=r"copy.npy: gan.sanity_weight pairs .* is not the training files' CNN"):
        with_references(train, pool.take(torch.arange(2)), ref, [copy], ["copy.npy"])


def test_sanity_term_penalises_keeping_more_of_the_trained_map_than_the_random_cnns_grad_cam() -> None:
    torch.manual_seed(0)
    trained = torch.rand(4, 1, 8, 8)
    random_target = torch.rand(4, 1, 8, 8)
    paired = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # the map is the random CNN's own Grad-CAM: it keeps exactly what Grad-CAM keeps -> 0
    assert float(sanity_term(random_target, random_target, trained, paired)) == 0.0
    # the map is the trained CNN's: it keeps r = 1 where Grad-CAM keeps r(random, trained)
    fake = trained.clone().requires_grad_(True)
    term = sanity_term(fake, random_target, trained, paired)
    expected = (1 - pearson_rows(random_target, trained))[:3].clamp_min(0).mean()
    assert torch.allclose(term, expected, atol=1e-6)
    term.backward()
    assert fake.grad is not None and fake.grad[:3].abs().sum() > 0 and fake.grad[3].abs().sum() == 0  # unpaired
    assert float(sanity_term(fake, random_target, trained, torch.zeros(4)).detach()) == 0.0  # a batch without pairs
    assert torch.allclose(pearson_rows(trained, trained), torch.ones(4), atol=1e-6)
    assert float(pearson_rows(torch.ones(1, 1, 8, 8), trained[:1])) == 0.0  # a constant map


def test_gan_stage_trains_with_the_sanity_term_and_records_it(stage_files, tmp_path, monkeypatch) -> None:
    cfg = stage_files["cfg"]
    overrides = [f"priors.out={cfg.priors.out}", "priors.size=16", "priors.n=4", "priors.randomised_stages=[fc, layer3]",
                 f"gan.train=[{stage_files['trained']}]", f"gan.val={stage_files['trained']}", "gan.variant=gsft",
                 "gan.width=8", "gan.depth=1", "gan.cond_channels=4", "gan.cond_hidden=8", "gan.disc_width=8",
                 "gan.epochs=1", "gan.batch_size=4", "gan.device=cpu", "gan.randomised_share=0.5", "name=tiny"]
    seen = []
    real_term = gan_step.sanity_term

    def spy(fake, target, reference, paired):
        seen.append((float(paired.sum()), float(reference[paired == 1].amax()) if paired.any() else 0.0))
        return real_term(fake, target, reference, paired)

    monkeypatch.setattr(gan_step, "sanity_term", spy)
    with_term = run_gan_stage(load_config(None, overrides + ["gan.sanity_weight=50", f"gan.out={tmp_path}/s"]),
                              log=lambda _m: None)
    monkeypatch.undo()
    without = run_gan_stage(load_config(None, overrides + [f"gan.out={tmp_path}/p"]), log=lambda _m: None)
    # the first call is the FLOP count's step on copies (core/budget.py: the first batch of the data, not trained)
    seen = seen[1:]
    assert len(seen) == 4  # 16 samples / batch 4: the term in every step, with the references of its pairs
    paired = read_priors(stage_files["trained"]).records["index"]
    assert sum(n for n, _ in seen) > 0
    saved = torch.load(f"{tmp_path}/s-last.pt", weights_only=True)
    assert saved["config"]["gan"]["sanity_weight"] == 50
    assert saved["priors_meta"]["randomised"]["paired"] == sum(n for n, _ in seen) <= len(paired)
    assert "paired" not in torch.load(f"{tmp_path}/p-last.pt", weights_only=True)["priors_meta"]["randomised"]
    assert with_term["history"][0]["epoch"] == without["history"][0]["epoch"] == 1
