"""The zoo stage (cnnprior.zoo): drawing members, the four families under the one prior rule, training on tiny
Fashion-MNIST files in the real format, the quality floor, resume / refuse-overwrite, zoo.json, the prior files and
their descriptor; and the prior rule's dense-block case (DenseNet-121: all of denseblock4 left out)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from cnnprior.cli import train_main
from cnnprior.cnn.layers import conv_layers, dense_block, final_layer, last_block, trace_calls, within
from cnnprior.cnn.model import build_cnn
from cnnprior.cnn.randomise import model_stages, randomise
from cnnprior.core.config import Config, load_config
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import file_sha256, state_sha256
from cnnprior.priors.extract import extractor_from
from cnnprior.priors.read import read_priors
from cnnprior.priors.spec import PriorSpec, spec_from_sidecar
from cnnprior.zoo import FAMILIES, build_member, build_zoo, load_member, sample_members, train_member
from cnnprior.zoo.train import accuracy, split_tensors
from tests.helpers import REPO
from tests.test_data import make_fashion

CLASSES = [str(i) for i in range(10)]
SHIPPED = REPO / "configs" / "zoo_fashion.yaml"


def _zoo_cfg(tmp_path: Path, *overrides: str, members: int = 4) -> Config:
    """A tiny zoo: 64 train / 16 val / 30 test fake Fashion-MNIST images at 32 px, 1 epoch, n = 4 priors of 16 px."""
    root = tmp_path / "fm"
    if not root.exists():
        make_fashion(root, n_train=80, n_test=30, seed=3)
    base = ["name=tinyzoo", "data.source=fashion_mnist", f"data.root={root}", "data.image_size=32",
            "data.val_fraction=0.2", "data.test_fraction=0.1", "priors.size=16", "priors.n=4",
            "priors.test_limit=6", "priors.train_limit=6", "priors.batch_size=8", "priors.randomised_stages=[all]",
            "priors.randomised_limit=3", f"zoo.members={members}", "zoo.depth=[1, 2]", "zoo.width=[8]",
            "zoo.growth=[4]", "zoo.epochs=1", "zoo.batch_size=16", "zoo.floor=0.0", f"zoo.out={tmp_path / 'zoo'}",
            f"zoo.report={tmp_path / 'report'}"]
    return load_config(None, base + list(overrides))


def _quiet(_msg: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------ sampling
def test_sampling_is_deterministic_per_member_and_families_take_turns(tmp_path: Path) -> None:
    cfg = load_config(SHIPPED)
    a = sample_members(cfg.zoo, cfg.priors.n, cfg.data.image_size)
    assert len(a) == cfg.zoo.members >= 100
    assert a == sample_members(copy.deepcopy(cfg.zoo), cfg.priors.n, cfg.data.image_size)
    assert [d["family"] for d in a[:8]] == list(FAMILIES) * 2
    fewer = copy.deepcopy(cfg.zoo)
    fewer.members = 5
    assert sample_members(fewer, cfg.priors.n, cfg.data.image_size) == a[:5]  # member i depends on i alone
    fewer.seed = 1
    assert [d["seed"] for d in sample_members(fewer, cfg.priors.n, cfg.data.image_size)] != [d["seed"] for d in a[:5]]
    # every sampled setting varies across the zoo and stays inside the config's lists and ranges
    for key, allowed in (("norm", cfg.zoo.norms), ("activation", cfg.zoo.activations), ("init", cfg.zoo.inits),
                         ("optimizer", cfg.zoo.optimizers), ("kernel", cfg.zoo.kernel)):
        assert {d[key] for d in a} == set(allowed), key
    assert len({tuple(d["depth"]) for d in a}) > 5 and len({d["seed"] for d in a}) == len(a)
    for d in a:
        lo, hi = cfg.zoo.lr_sgd if d["optimizer"] == "sgd" else cfg.zoo.lr_adam
        assert lo <= d["lr"] <= hi and cfg.zoo.weight_decay[0] <= d["weight_decay"] <= cfg.zoo.weight_decay[1]
        assert d["width"] in (cfg.zoo.growth if d["family"] == "dense" else cfg.zoo.width)


def test_zoo_config_checks_its_lists(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="zoo.families"):
        load_config(None, ["zoo.families=[plain, vgg]"])
    with pytest.raises(UserError, match="zoo.depth"):
        load_config(None, ["zoo.depth=[3, 1]"])
    with pytest.raises(UserError, match="zoo.kernel"):
        load_config(None, ["zoo.kernel=[3, 4]"])
    with pytest.raises(UserError, match="zoo.lr_adam"):
        load_config(None, ["zoo.lr_adam=fast"])


# ----------------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_and_fits_the_prior_rule_and_randomisation(family: str, norm: str) -> None:
    cfg = load_config(SHIPPED)
    desc = next(d for d in sample_members(cfg.zoo, cfg.priors.n, cfg.data.image_size) if d["family"] == family)
    desc = dict(desc, norm=norm)
    model = build_member(desc, CLASSES, cfg.data.image_size).eval()
    assert model.arch == f"zoo_{family}"
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert model(x).shape == (2, 10)
    # the target is the final feature map (what global pooling reads), at least 4x4
    name, module = final_layer(model)
    assert name == "net.final"
    fmap = [c.output for c in trace_calls(model, 32, leaves_only=False) if c.module is module][0]
    assert min(fmap.shape[-2:]) >= 4
    ex = extractor_from(model, PriorSpec(size=16, n=cfg.priors.n))
    d = ex.describe()
    assert len(d["average_order"]) >= cfg.priors.n + 1 and len(set(d["positions"])) == cfg.priors.n
    convs = [n for n, _ in conv_layers(model)]
    out = [c for c in convs if any(within(c, b) for b in d["left_out_blocks"])]
    assert out and out == convs[-len(out):]  # the last convs, nothing else
    if family == "dense":  # the whole last dense block, not its last layer
        assert d["left_out_blocks"] == ["net.stage3.1"] and len(out) == 2 * desc["depth"][2]
    # randomised copies: the top-level children with parameters, head first
    stages = [n for n, _ in model_stages(model)]
    assert stages == ["classifier"] + (["final"] if norm != "none" else []) + ["stage3", "stage2", "stage1", "stem"]
    copy_ = randomise(model, "top_down", 1, seed=0)
    assert not torch.equal(copy_.net.classifier[2].weight, model.net.classifier[2].weight)
    assert torch.equal(copy_.net.stem.weight if isinstance(copy_.net.stem, nn.Conv2d) else copy_.net.stem[0].weight,
                       model.net.stem.weight if isinstance(model.net.stem, nn.Conv2d) else model.net.stem[0].weight)
    out_maps = ex(x)
    assert out_maps["priors"].shape == (2, cfg.priors.n, 16, 16) and torch.isfinite(out_maps["priors"]).all()


def test_a_member_trains_bit_for_bit_again(tmp_path: Path) -> None:
    cfg = _zoo_cfg(tmp_path)
    desc = sample_members(cfg.zoo, cfg.priors.n, 32)[1]
    m1, s1 = train_member(desc, cfg.data, _quiet)
    m2, s2 = train_member(desc, cfg.data, _quiet)
    assert state_sha256(m1.net.state_dict()) == state_sha256(m2.net.state_dict())
    assert s1["history"][0]["train_loss"] == s2["history"][0]["train_loss"]
    other = dict(desc, seed=desc["seed"] + 1)
    m3, _ = train_member(other, cfg.data, _quiet)
    assert state_sha256(m3.net.state_dict()) != state_sha256(m1.net.state_dict())


# -------------------------------------------------------------------------------------------------- stage
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict]:
    tmp = tmp_path_factory.mktemp("zoo")
    cfg = _zoo_cfg(tmp)
    return cfg, build_zoo(cfg, log=_quiet)


def test_zoo_json_lists_every_member_with_its_descriptor(built: tuple[Config, dict]) -> None:
    cfg, data = built
    on_disk = json.loads((Path(cfg.zoo.report) / "zoo.json").read_text())
    assert on_disk == json.loads(json.dumps(data))
    assert on_disk["format"] == "cnnprior-zoo/1" and on_disk["floor"] == 0.0
    members = on_disk["members"]
    assert [m["id"] for m in members] == ["m000", "m001", "m002", "m003"]
    assert [m["descriptor"]["family"] for m in members] == list(FAMILIES)
    for m in members:
        assert m["done"] and m["kept"] and 0.0 <= m["val_accuracy"] <= 1.0 and m["family"] == m["descriptor"]["family"]
        assert m["seconds"]["total"] > 0 and m["checkpoint_sha256"] == file_sha256(m["checkpoint"])
    s = on_disk["summary"]
    assert s["members"] == s["done"] == s["kept"] == 4
    assert set(s["families"]) == set(FAMILIES) and all(f["kept"] == 1 for f in s["families"].values())


def test_kept_members_have_priors_with_the_descriptor(built: tuple[Config, dict]) -> None:
    cfg, data = built
    for m in data["members"]:
        model, meta = load_member(m["checkpoint"])
        assert meta["zoo"] == m["descriptor"]
        vx, vy, _ = split_tensors(cfg.data, "val")
        assert accuracy(model, vx, vy) == pytest.approx(m["val_accuracy"])  # the checkpoint is the recorded one
        n_stages = len(model_stages(model))
        assert set(m["priors"]) == {"test", "val", "train", "random"} and len(m["priors"]["random"]) == n_stages
        for split in ("test", "val", "train"):
            pf = read_priors(m["priors"][split], verify=True)
            assert pf.meta["split"] == split and len(pf) == 6
            assert pf.meta["zoo"]["descriptor"] == m["descriptor"] and pf.meta["zoo"]["member"] == m["id"]
            assert pf.meta["cnn"]["arch"] == f"zoo_{m['family']}"
            assert pf.meta["cnn"]["checkpoint_sha256"] == m["checkpoint_sha256"]
            assert pf.tensors()["priors"].shape == (6, 4, 16, 16)
            # the sidecar's layer bookkeeping is the one the extractor gives the loaded member
            d = extractor_from(model, spec_from_sidecar(pf.meta)).describe()
            assert pf.meta["prior_layers"] == d["prior_layers"] and pf.meta["target_layer"] == "net.final"
        for path in m["priors"]["random"]:
            pf = read_priors(path)
            assert pf.meta["randomised"]["seed"] == 0 and len(pf) == 3 and pf.meta["zoo"]["member"] == m["id"]


def test_jobs_and_ranks_give_the_same_members(built: tuple[Config, dict], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, data = built
    two = copy.deepcopy(cfg)
    two.zoo.out, two.zoo.report = str(tmp_path / "zoo2"), str(tmp_path / "report2")
    two.zoo.members = 2
    got = build_zoo(two, jobs=2, log=_quiet)  # two spawned workers, one member each
    assert [m["checkpoint_sha256"] for m in got["members"]] == [m["checkpoint_sha256"] for m in data["members"][:2]]
    # rank 1 of 2 (torchrun's env): members 1 and 3 only
    ranked = copy.deepcopy(cfg)
    ranked.zoo.out, ranked.zoo.report = str(tmp_path / "zoo3"), str(tmp_path / "report3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    got = build_zoo(ranked, log=_quiet)
    assert [m["done"] for m in got["members"]] == [False, True, False, True]
    assert got["members"][3]["checkpoint_sha256"] == data["members"][3]["checkpoint_sha256"]
    assert not (tmp_path / "zoo3" / "m000").exists()


def test_a_member_below_the_floor_is_recorded_and_gets_no_priors(tmp_path: Path) -> None:
    cfg = _zoo_cfg(tmp_path, "zoo.floor=1.0", members=1)  # 16 val images of noise: never all right
    data = build_zoo(cfg, log=_quiet)
    (m,) = data["members"]
    assert m["done"] and not m["kept"] and m["val_accuracy"] < 1.0 and m["priors"] == {}
    assert Path(m["checkpoint"]).is_file() and not list((tmp_path / "zoo" / "m000").glob("*.npy"))
    assert data["summary"]["kept"] == 0 and data["summary"]["families"]["plain"]["val_accuracy"] is None


def test_resume_skips_finished_members_and_overwrite_is_refused(tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = _zoo_cfg(tmp_path, members=1)
    first = build_zoo(cfg, log=_quiet)
    ckpt = Path(first["members"][0]["checkpoint"])
    stamp = ckpt.stat().st_mtime_ns
    more = _zoo_cfg(tmp_path, members=2)  # one more member: the finished one is kept as it is
    data = build_zoo(more, log=lines.append)
    assert "1 of this process's 2 finished, 1 to do" in lines[0]
    assert ckpt.stat().st_mtime_ns == stamp and [m["done"] for m in data["members"]] == [True, True]
    assert data["members"][0] == first["members"][0]
    # other settings for a finished member: refused in one line, nothing touched
    with pytest.raises(UserError, match=r"m000.*other descriptor \(epochs.*--overwrite"):
        build_zoo(_zoo_cfg(tmp_path, "zoo.epochs=2", members=2), log=_quiet)
    with pytest.raises(UserError, match=r"other settings \(priors: .*--overwrite"):
        build_zoo(_zoo_cfg(tmp_path, "priors.test_limit=5", members=2), log=_quiet)
    assert ckpt.stat().st_mtime_ns == stamp
    # a half-written member (no record): refused without --resume, redone with it
    (tmp_path / "zoo" / "m001" / "m001.json").unlink()
    with pytest.raises(UserError, match="m001 unfinished; --resume"):
        build_zoo(more, log=_quiet)
    data = build_zoo(more, resume=True, log=_quiet)
    assert data["members"][1]["done"] and ckpt.stat().st_mtime_ns == stamp
    # --overwrite redoes every member (the same numbers: the same descriptors)
    again = build_zoo(more, overwrite=True, log=_quiet)
    assert ckpt.stat().st_mtime_ns != stamp
    assert again["members"][0]["checkpoint_sha256"] == first["members"][0]["checkpoint_sha256"]


def test_train_py_stage_zoo(tmp_path: Path) -> None:
    cfg = _zoo_cfg(tmp_path, members=1)
    raw = {"name": "tinyzoo", "data": vars(cfg.data), "priors": vars(cfg.priors), "zoo": vars(cfg.zoo)}
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert train_main(["--config", str(path), "--stage", "zoo", "--jobs", "1"]) == 0
    data = json.loads((tmp_path / "report" / "zoo.json").read_text())
    assert data["config_file"] == str(path) and data["summary"]["done"] == 1
    with pytest.raises(SystemExit):  # --jobs takes a number
        train_main(["--config", str(path), "--stage", "zoo", "--jobs", "many"])


# ------------------------------------------------------------------------------------- the dense-block rule
def test_densenet121_leaves_its_whole_last_dense_block_out() -> None:
    torch.manual_seed(0)
    model = build_cnn("densenet121", ["a", "b", "c"], 64).eval()
    name, _ = final_layer(model)
    assert last_block(model, name) == ["net.features.denseblock4"]
    d = extractor_from(model, PriorSpec(size=16, n=8)).describe()
    kept = {n for prior in d["prior_layers"] for n in prior}
    assert not any(within(n, "net.features.denseblock4") for n in kept)
    assert any(within(n, "net.features.transition3") for n in kept)  # the transition before it stays
    assert len(d["excluded_layers"]) == 32
    calls = trace_calls(model, 64, leaves_only=False)
    modules = dict(model.named_modules())
    assert dense_block(calls, modules["net.features.denseblock4"])
    assert not dense_block(calls, modules["net.features.denseblock4.denselayer16"])
    assert not dense_block(calls, modules["net.features"])


def test_resnet18_prior_layers_are_the_shipped_files() -> None:
    """The shipped ResNet-18 test priors' layer bookkeeping is what the rule gives today (nothing moved)."""
    meta = json.loads((REPO / "npys" / "fashion_resnet18-test.json").read_text())
    torch.manual_seed(0)
    model = build_cnn("resnet18", meta["class_names"], meta["cnn"]["image_size"]).eval()
    d = extractor_from(model, spec_from_sidecar(meta)).describe()
    for key in ("layers", "target_layer", "excluded_layers", "average_order", "positions", "prior_layers"):
        assert d[key] == meta[key], key
    assert d["left_out_blocks"] == ["net.layer4.1"]


def test_the_target_of_a_custom_cnn_is_read_by_the_last_pooling() -> None:
    """Average pooling inside the trunk (a transition) is not the global pooling the target rule looks for."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
            self.down = nn.AvgPool2d(2)
            self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.b(self.down(self.a(x))))

    assert final_layer(Net(), 16)[0] == "b"
