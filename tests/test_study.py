"""Budgets in checkpoints (samples, steps, wall seconds, threads, precision, training FLOPs; milestone checkpoints)
and the study runner (cnnprior.study): arms x seeds trained to milestones, resumed after a kill, finished runs
skipped, other configs' runs never replaced without --overwrite, study.json, and the hierarchical bootstrap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cnnprior import cli
from cnnprior.cnn.train import train_cnn
from cnnprior.core.budget import Budget, count_flops
from cnnprior.core.config import load_config
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import load_checkpoint, state_sha256
from cnnprior.gan import train as gan_train
from cnnprior.gan.checkpoint import GeneratorMeta, load_generator
from cnnprior.gan.models import get
from cnnprior.maps.metrics import pearson
from cnnprior.priors.read import read_priors
from cnnprior.study import hierarchical_bootstrap, load_study_config, run_study
from cnnprior.study.bootstrap import interpolate_scores
from cnnprior.study.runs import plan_runs
from tests.helpers import REPO, SIZE, N, gan_config, write_priors

QUIET = {"log": lambda _m: None}


class Killed(Exception):
    """Stands for a SIGKILL: raised by a run's on_step, it leaves the run's files as they are."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study")
    return {"root": root, "train": write_priors(root / "npys" / "t-train.npy", 32, seed=1),
            "val": write_priors(root / "npys" / "t-val.npy", 12, seed=2, split="val"),
            "test": write_priors(root / "npys" / "t-test.npy", 10, seed=3, split="test")}


def _study(data: dict, folder: Path, arms: list[dict], seeds=(0, 1), milestones=(16, 48), **extra) -> Path:
    """A study YAML over tiny arm configs (tests.helpers.gan_config; batch 8, 32 train samples = 4 steps/epoch)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"name": "tiny", "val": str(data["val"]), "test": str(data["test"]), "seeds": list(seeds),
            "milestones": list(milestones), "runs": str(folder / "runs"), "out": str(folder / "report"),
            "resamples": 200, "batch_size": 8, "arms": arms, **extra}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _arm_config(data: dict, variant: str, **gan) -> str:
    return str(gan_config(data["root"] / "arms" / variant, data["train"], data["val"], variant=variant,
                          checkpoint_every=1, **gan))


# ----------------------------------------------------------------------------------------- budgets
def test_checkpoints_carry_the_budget_and_milestones(data, tmp_path):
    cfg = load_config(_arm_config(data, "linear", epochs=2),
                      [f"gan.out={tmp_path / 'g'}", "gan.milestones=[16, 40]"])
    run = gan_train.run_gan_stage(cfg, **QUIET)
    last = load_checkpoint(run["last"], "GAN")
    b = Budget.from_dict(last["budget"])
    step_flops = 4 * 8 * (N + 3) * SIZE * SIZE  # a 1x1 conv of n+3 channels: forward + weight gradient, 2 per MAC
    assert (b.samples, b.steps, b.step_flops, b.flops) == (64, 8, step_flops, 8 * step_flops)
    assert last["budget"]["flops"] == b.steps * b.step_flops > 0
    assert b.threads == torch.get_num_threads() and b.precision == "fp32" and b.processes == 1 and b.wall_s > 0
    for m, samples, steps in ((16, 16, 2), (40, 40, 5)):
        model, meta = load_generator(tmp_path / f"g-s{m}.pt")
        assert (meta.budget.samples, meta.budget.steps, meta.budget.flops) == (samples, steps, steps * step_flops)
        assert meta["milestone"] == m and meta.budget.wall_s <= b.wall_s
    _, exported = load_generator(tmp_path / "g.pt")  # the best epoch's generator keeps its budget
    assert exported.budget.samples in (32, 64)
    old = {k: v for k, v in last.items() if k != "budget"}  # a checkpoint of an earlier version
    assert GeneratorMeta.parse(old, "old.pt").budget is None


def test_resumed_run_keeps_accumulating_its_budget(data, tmp_path):
    config = _arm_config(data, "lsft", epochs=2)
    cfg = load_config(config, [f"gan.out={tmp_path / 'g'}"])

    def stop(step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        gan_train.run_gan_stage(cfg, on_step=stop, **QUIET)
    saved = Budget.from_dict(load_checkpoint(tmp_path / "g-last.pt", "GAN")["budget"])
    assert (saved.samples, saved.steps) == (16, 2)  # checkpoint_every 1: step 3 was killed before its checkpoint
    gan_train.run_gan_stage(cfg, resume=True, **QUIET)
    b = Budget.from_dict(load_checkpoint(tmp_path / "g-last.pt", "GAN")["budget"])
    assert (b.samples, b.steps, b.step_flops) == (64, 8, saved.step_flops) and b.wall_s > saved.wall_s


def test_counting_flops_changes_no_trained_number(data, tmp_path, monkeypatch):
    """The FLOPs are counted on copies: the run's weights are bit-identical to a run that counts none."""
    def train(folder: Path) -> dict:
        out = {}
        cfg = load_config(_arm_config(data, "lsft", epochs=1, image_dropout=0.5), [f"gan.out={folder / 'g'}"])
        gan_train.run_gan_stage(cfg, on_finish=lambda _rank, s: out.update(s), **QUIET)
        return out

    counted = train(tmp_path / "counted")
    monkeypatch.setattr(gan_train, "count_flops", lambda step, device=None: 0)
    assert counted == train(tmp_path / "plain")


def test_count_flops_restores_the_rng():
    torch.manual_seed(5)
    torch.nn.Linear(4, 3)
    torch.rand(2, 4)
    expected = torch.rand(3)
    torch.manual_seed(5)
    lin = torch.nn.Linear(4, 3)
    x = torch.rand(2, 4)
    flops = count_flops(lambda: torch.nn.functional.dropout(lin(x), 0.5).sum().backward())
    assert flops == 2 * 2 * 4 * 3 * 2 and torch.equal(torch.rand(3), expected)  # forward + weight gradient


def test_classifier_checkpoints_carry_the_budget(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "data": {"source": "shapes", "shapes_count": 40, "image_size": 32,
                                                               "val_fraction": 0.2, "test_fraction": 0.2},
                                      "cnn": {"arch": "mobilenet_v3_small", "epochs": 1, "batch_size": 4,
                                              "device": "cpu", "checkpoint": str(tmp_path / "cnn.pt")}}))
    out = train_cnn(load_config(config), **QUIET)
    best, last = load_checkpoint(tmp_path / "cnn.pt", "CNN"), load_checkpoint(tmp_path / "cnn-last.pt", "state")
    for b in (Budget.from_dict(best["budget"]), Budget.from_dict(last["budget"]), Budget.from_dict(out["budget"])):
        assert (b.steps, b.samples, b.precision, b.estimated) == (5, 20, "fp32", False)  # 20 train images, batch 4
        assert b.step_flops > 0 and b.flops == 5 * b.step_flops and b.wall_s > 0


# ----------------------------------------------------------------------------------------- the runner
@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> dict:
    """A finished three-arm study (an adversarial LSFT, the linear baseline and one with a higher lr; 2 seeds)."""
    folder = tmp_path_factory.mktemp("finished")
    linear = {"config": _arm_config(data, "linear"), "milestones": [16, 32, 48]}
    arms = [{"name": "lsft", "config": _arm_config(data, "lsft")}, {"name": "linear", **linear},
            {"name": "linear_fast", **linear, "set": ["gan.lr=0.01"]}]
    path = _study(data, folder, arms, compare=[["lsft", "linear"], ["linear_fast", "linear"]])
    lines: list[str] = []
    report = run_study(path, log=lines.append)
    return {"path": path, "report": report, "lines": lines, "json": json.loads((report / "study.json").read_text())}


def test_study_end_to_end(finished):
    s, report = finished["json"], finished["report"]
    assert set(s["arms"]) == {"lsft", "linear", "linear_fast"}
    for name, ms in (("lsft", [16, 48]), ("linear", [16, 32, 48])):
        arm = s["arms"][name]
        assert arm["seeds"] == [0, 1] and [m["samples"] for m in arm["milestones"]] == ms
        for m in arm["milestones"]:
            assert set(m["val_r"]) == {"0", "1"} and m["train_flops"] > 0 and m["wall_s"] > 0
            assert m["samples_seen"] == m["samples"]
        flops = [m["train_flops"] for m in arm["milestones"]]
        assert flops == sorted(flops) and flops[-1] / flops[0] == pytest.approx(ms[-1] / ms[0])
        for seed, t in arm["test"].items():  # the val-chosen milestone of each run is the one scored on test
            vals = [m["val_r"][seed] for m in arm["milestones"]]
            assert t["samples"] == ms[int(np.argmax(vals))] and -1 <= t["r"] <= 1
    for f in ("report.md", "report.html", "curve-samples.png", "curve-flops.png", "scores.npz"):
        assert (report / f).is_file(), f
    scores = np.load(report / "scores.npz")
    assert scores["val/linear/0"].shape == (3, 12) and scores["test/lsft/1"].shape == (10,)
    gan, lr = s["margins"]
    assert (gan["a"], gan["b"]) == ("lsft", "linear") and [r["samples"] for r in gan["equal_samples"]] == [16, 48]
    assert gan["equal_flops"] == []  # the linear mix's whole curve costs less than LSFT's first milestone
    # equal per-step FLOPs: the equal-FLOPs margins are the equal-samples ones, at the milestones' FLOPs
    assert [r["flops"] for r in lr["equal_flops"]] == [m["train_flops"] for m in s["arms"]["linear"]["milestones"]]
    for at_flops, at_samples in zip(lr["equal_flops"], lr["equal_samples"], strict=True):
        assert at_flops["mean"] == pytest.approx(at_samples["mean"]) and at_flops["lo"] <= at_flops["mean"] <= at_flops["hi"]
    assert lr["test_chosen"]["seeds_a"] == 2 and lr["test_chosen"]["images"] == 10
    text = (report / "report.md").read_text()
    assert "At equal training FLOPs" in text and "linear_fast − linear" in text and "No common budget" not in text


def test_study_scores_match_an_independent_scoring(finished, data):
    """The test r of a run's chosen milestone, recomputed from its checkpoint with the project's metric."""
    s = finished["json"]["arms"]["linear"]["test"]["1"]
    cfg = load_study_config(finished["path"])
    ckpt = cfg.runs_dir / "linear" / "seed1" / f"g-s{s['samples']}.pt"
    model, _ = load_generator(ckpt)
    t = read_priors(data["test"]).tensors()
    with torch.no_grad():
        r = pearson(model(t["image"], t["priors"]), t["target"]).double().mean().item()
    assert s["r"] == pytest.approx(r, abs=1e-6)


def test_finished_runs_are_skipped_and_the_report_is_not_replaced_without_overwrite(finished):
    with pytest.raises(UserError, match="a study report exists; use --overwrite"):
        run_study(finished["path"], **QUIET)
    cfg = load_study_config(finished["path"])
    files = sorted(cfg.runs_dir.rglob("*.pt"))
    stamps = [p.stat().st_mtime_ns for p in files]
    lines: list[str] = []
    report = run_study(cfg, overwrite=True, log=lines.append)
    assert "6 runs (6 finished earlier, 0 resumed, 0 new)" in "\n".join(lines)
    assert [p.stat().st_mtime_ns for p in files] == stamps  # nothing retrained
    assert json.loads((report / "study.json").read_text())["arms"] == finished["json"]["arms"]


def test_a_killed_run_resumes_exactly(data, tmp_path):
    arms = [{"name": "lsft", "config": _arm_config(data, "lsft")}]

    def stopper(run):
        def on_step(step):
            if run.seed == 0 and step == 3:
                raise Killed
        return on_step

    killed = _study(data, tmp_path / "killed", arms, seeds=[0])
    with pytest.raises(Killed):
        run_study(killed, on_step=stopper, train_only=True, **QUIET)
    run = plan_runs(load_study_config(killed))[0]
    assert run.state() == "resume" and run.milestone_path(16).is_file() and not run.done_file.exists()
    lines: list[str] = []
    run_study(killed, log=lines.append)
    assert "(0 finished earlier, 1 resumed, 0 new)" in "\n".join(lines)
    straight = _study(data, tmp_path / "straight", arms, seeds=[0])
    run_study(straight, **QUIET)
    other = plan_runs(load_study_config(straight))[0]
    for m in (16, 48):
        a, b = (load_checkpoint(r.milestone_path(m), "GAN") for r in (run, other))
        assert state_sha256(a["generator"]) == state_sha256(b["generator"])
        assert (a["budget"]["samples"], a["budget"]["flops"]) == (b["budget"]["samples"], b["budget"]["flops"])


def test_runs_of_another_config_are_refused_without_overwrite(data, tmp_path):
    arms = [{"name": "linear", "config": _arm_config(data, "linear")}]
    path = _study(data, tmp_path, arms, seeds=[0])
    run_study(path, train_only=True, **QUIET)
    changed = _study(data, tmp_path, [{**arms[0], "set": ["gan.lr=0.01"]}], seeds=[0])
    with pytest.raises(UserError, match="made by another study config \\(differs in gan.lr\\); use --overwrite"):
        run_study(changed, train_only=True, **QUIET)
    lines: list[str] = []
    run_study(changed, overwrite=True, train_only=True, log=lines.append)
    assert "(0 finished earlier, 0 resumed, 1 new)" in "\n".join(lines)


def test_milestones_added_later_continue_a_finished_run_or_are_refused(data, tmp_path):
    arms = [{"name": "linear", "config": _arm_config(data, "linear")}]
    run_study(_study(data, tmp_path, arms, seeds=[0], milestones=[16]), train_only=True, **QUIET)
    lines: list[str] = []
    run_study(_study(data, tmp_path, arms, seeds=[0], milestones=[16, 64]), train_only=True, log=lines.append)
    assert "(0 finished earlier, 1 resumed, 0 new)" in "\n".join(lines)  # 1 more epoch by --resume
    run = plan_runs(load_study_config(tmp_path / "study.yaml"))[0]
    assert load_generator(run.milestone_path(64))[1].budget.samples == 64 and run.finished()
    with pytest.raises(UserError, match="milestone\\(s\\) 8 were added after the run had seen 64 samples"):
        run_study(_study(data, tmp_path, arms, seeds=[0], milestones=[8, 16, 64]), train_only=True, **QUIET)


def test_side_by_side_runs_in_child_processes(data, tmp_path):
    arms = [{"name": "linear", "config": _arm_config(data, "linear")}]
    path = _study(data, tmp_path, arms, seeds=[3, 4], milestones=[16], threads=2)
    assert cli.main(["study", "--config", str(path), "--jobs", "2"]) == 0  # two child processes, one thread each
    s = json.loads((tmp_path / "report" / "study.json").read_text())
    assert s["arms"]["linear"]["seeds"] == [3, 4] and s["arms"]["linear"]["milestones"][0]["threads"] == 1
    for seed in (3, 4):
        assert (tmp_path / "runs" / "linear" / f"seed{seed}" / "done.json").is_file()


def test_study_config_errors(data, tmp_path):
    arm = {"name": "a", "config": "x.yaml"}
    for bad, match in (({"arms": [{**arm, "set": ["gan.seed=3"]}]}, "set by the study per run"),
                       ({"arms": [arm, arm]}, "arm name 'a' repeats"),
                       ({"arms": [arm], "compare": [["a", "b"]]}, "'b' is not an arm"),
                       ({"arms": [arm], "milestones": [10, 10]}, "repeats a value"),
                       ({"arms": [{**arm, "colour": 1}]}, "unknown key 'colour'")):
        path = _study(data, tmp_path, **{"arms": [], **bad})
        with pytest.raises(UserError, match=match):
            load_study_config(path)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("study_*.yaml")), ids=lambda p: p.stem)
def test_shipped_study_configs(path):
    """Every arm's config loads with its overrides; selection on val, scores on test; >= 3 seeds, apart from the
    sanity checks' randomisation seeds (randomised priors 0-2, MPRT 1000-1004)."""
    cfg = load_study_config(path)
    assert cfg.val.endswith("-val.npy") and cfg.test.endswith("-test.npy") and len(cfg.seeds) >= 3
    assert not set(cfg.seeds) & (set(range(3)) | set(range(1000, 1005)))
    params = {}
    for arm in cfg.arms:
        run = load_config(REPO / arm.config, [*arm.set, f"gan.milestones={cfg.milestones_of(arm)}"])
        assert run.gan_val_file() == cfg.val and not run.gan.init, arm.name  # same val file; from scratch
        params[arm.name] = sum(p.numel() for p in get(run.gan.variant).from_config(run.gan, run.priors.n).parameters())
    if path.stem == "study_fashion":
        assert cfg.milestones_of(cfg.arm("gsft"))[-1] >= 48_000 and cfg.arm("gsft_l1").set == ["gan.adv_weight=0"]
        assert abs(params["convnet_wide"] / params["gsft"] - 1) < 0.02  # the parameter-matched regressor


# ----------------------------------------------------------------------------------------- the bootstrap
def _arm(rng, seeds: int, images: np.ndarray, offset: float, seed_sd: float) -> np.ndarray:
    """(seeds, images) scores: the images' difficulty, plus a per-seed offset, plus noise."""
    return (images[None] + offset + rng.normal(0, seed_sd, (seeds, 1))
            + rng.normal(0, 0.02, (seeds, len(images))))


def test_hierarchical_bootstrap_covers_zero_for_equal_arms_and_excludes_it_for_a_large_margin():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.5, 0.9, 200)
    a, b = _arm(rng, 3, images, 0.0, 0.01), _arm(rng, 3, images, 0.0, 0.01)
    same = hierarchical_bootstrap(a, b, resamples=1000)
    assert same["lo"] < 0 < same["hi"] and same["mean"] == pytest.approx(a.mean() - b.mean())
    better = hierarchical_bootstrap(_arm(rng, 3, images, 0.1, 0.01), b, resamples=1000)
    assert 0 < better["lo"] < 0.1 < better["hi"] < 0.2
    assert (same["seeds_a"], same["seeds_b"], same["images"]) == (3, 3, 200)


def test_seed_variance_widens_the_interval_and_images_are_paired():
    rng = np.random.default_rng(1)
    images = rng.uniform(0.2, 0.9, 100)
    width = {}
    for sd in (0.001, 0.05):
        a, b = _arm(rng, 4, images, 0.0, sd), _arm(rng, 4, images, 0.0, sd)
        s = hierarchical_bootstrap(a, b, resamples=1000)
        width[sd] = s["hi"] - s["lo"]
    assert width[0.05] > 5 * width[0.001]
    # paired per image: the images' spread (0.2 wide) cancels; one arm alone keeps it
    a, b = _arm(rng, 2, images, 0.0, 0.0), _arm(rng, 2, images, 0.0, 0.0)
    paired, alone = hierarchical_bootstrap(a, b, resamples=1000), hierarchical_bootstrap(a, resamples=1000)
    assert paired["hi"] - paired["lo"] < (alone["hi"] - alone["lo"]) / 5
    with pytest.raises(ValueError, match="finite"):
        hierarchical_bootstrap(np.array([[np.nan, 1.0]]))


def test_interpolation_at_a_common_budget():
    scores = np.array([[0.2, 0.4], [0.6, 0.8]])
    assert np.allclose(interpolate_scores([10, 1000], scores, 100), [0.4, 0.6])  # halfway in log budget
    assert np.allclose(interpolate_scores([10, 1000], scores, 100, log=False), [0.2 + 0.4 * 90 / 990,
                                                                                  0.4 + 0.4 * 90 / 990])
    assert np.array_equal(interpolate_scores([10, 1000], scores, 1000), scores[1])
    with pytest.raises(ValueError, match="outside"):
        interpolate_scores([10, 1000], scores, 2000)
