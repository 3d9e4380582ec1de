"""Prior files from re-initialised copies of the target CNN, and mixing them into GAN training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cnnprior.cnn.model import build_cnn, load_cnn, save_cnn
from cnnprior.core.config import load_config
from cnnprior.core.errors import UserError
from cnnprior.gan.data import MapData, randomised_files, with_randomised
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
