"""Tests for cnnprior.gan.train: checkpoints, exact resume after SIGKILL, DDP on CPU, one-line errors, learning."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnprior.cli import train_main
from cnnprior.core.config import load_config
from cnnprior.core.distributed import shard
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import epoch_order, rng_state, seed_everything, set_rng_state, state_sha256
from cnnprior.gan.checkpoint import GAN_FORMAT, load_generator
from cnnprior.gan.data import MapData
from cnnprior.gan.models import build_generator
from cnnprior.gan.train import run_gan_stage
from cnnprior.maps.metrics import fidelity
from cnnprior.priors.read import read_priors
from tests.helpers import SIZE, N, free_port, gan_config, stage_cmd, subprocess_env, tiny_data, train_cmd, write_priors

SCHEMA = {"format", "variant", "generator_config", "generator", "discriminator_config", "discriminator", "optim_g",
          "optim_d", "epoch", "step", "batch_in_epoch", "rng", "data_order", "config", "priors_meta", "metrics",
          "history"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("gan")
    train, val = tiny_data(root)
    return root, train, val


@pytest.fixture(scope="module")
def one_epoch(data) -> tuple[Path, dict, list[str]]:
    """A finished one-epoch run: (config path, run_gan_stage's result, its log lines)."""
    root, train, val = data
    config = gan_config(root, train, val, epochs=1)
    lines: list[str] = []
    return config, run_gan_stage(load_config(config), log=lines.append), lines


def _tensors_equal(a: object, b: object) -> bool:
    """Exact equality of nested dicts/lists of tensors and primitives."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# ----------------------------------------------------------------------------------------- pieces
def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    a = epoch_order(0, 3, 50)
    assert torch.equal(a, epoch_order(0, 3, 50))
    assert sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, epoch_order(0, 4, 50)) and not torch.equal(a, epoch_order(1, 3, 50))


def test_shard_pads_like_distributed_sampler() -> None:
    order = torch.tensor([4, 0, 3, 1, 2])
    parts = [shard(order, r, 2) for r in range(2)]
    # padded to 6 by wrapping: [4, 0, 3, 1, 2, 4]; rank r takes every 2nd from r
    assert parts[0].tolist() == [4, 3, 2] and parts[1].tolist() == [0, 1, 4]
    assert torch.equal(shard(order, 0, 1), order)
    assert [shard(torch.tensor([7]), r, 3).tolist() for r in range(3)] == [[7], [7], [7]]


def test_rng_state_round_trips_through_weights_only_load(tmp_path) -> None:
    import random

    import numpy as np

    seed_everything(5)
    random.gauss(0, 1), np.random.normal()  # leave a cached gaussian in both
    state = rng_state(torch.device("cpu"))
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.normal(size=3), random.random(), random.gauss(0, 1))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    got = (torch.rand(3), np.random.normal(size=3), random.random(), random.gauss(0, 1))
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2:] == got[2:]


def test_map_data_matches_prior_file_tensors(data) -> None:
    _, train, val = data
    pf_train, pf_val = read_priors(train), read_priors(val)
    md = MapData.from_files([pf_train, pf_val], limit=40)
    assert len(md) == 40  # 32 train + the first 8 val
    image, priors, target = md.batch(torch.tensor([1, 35]), torch.device("cpu"))
    ref_a, ref_b = pf_train.tensors([1]), pf_val.tensors([3])
    assert torch.equal(image, torch.cat([ref_a["image"], ref_b["image"]]))
    assert torch.equal(priors, torch.cat([ref_a["priors"], ref_b["priors"]]))
    assert torch.equal(target, torch.cat([ref_a["target"], ref_b["target"]]))


# ----------------------------------------------------------------------------------------- one epoch
def test_one_epoch_writes_checkpoints_that_load_safely(one_epoch, data) -> None:
    config, result, lines = one_epoch
    _, _, val = data
    cfg = load_config(config)
    prefix = Path(cfg.gan_prefix)
    best, last = Path(f"{prefix}-best.pt"), Path(f"{prefix}-last.pt")
    assert best.is_file() and last.is_file() and Path(f"{prefix}.yaml").is_file()
    assert load_config(f"{prefix}.yaml").gan == cfg.gan  # resolved config beside the checkpoints
    ck = torch.load(last, weights_only=True)
    assert SCHEMA <= ck.keys() and ck["format"] == GAN_FORMAT and ck["variant"] == "lsft"
    # 32 samples / batch 8 = 4 steps; epoch-end checkpoint holds the NEXT epoch's order
    assert (ck["epoch"], ck["step"], ck["batch_in_epoch"]) == (1, 4, 0)
    assert torch.equal(ck["data_order"], epoch_order(0, 1, 32))
    assert ck["generator_config"] == {"width": 8, "n_priors": N, "n_plain": 1, "cond_channels": 8,
                                      "cond_hidden": 8}
    assert ck["discriminator_config"] == {"width": 8, "n_layers": 2}
    assert {"torch", "numpy", "python"} <= ck["rng"].keys()
    pm = ck["priors_meta"]
    assert (pm["size"], pm["n"], pm["order"], pm["target"], pm["method"], pm["cnn_arch"]) == \
        (SIZE, N, "output_to_input", "last", "gradcam", "resnet18")
    assert pm["positions"] == [0, 1, 2, 3] and len(pm["prior_layers"]) == N and pm["prior_layers"][2] == \
        ["layer4.conv", "layer3.conv", "layer2.conv"]
    assert ck["config"]["gan"]["width"] == 8 and len(ck["history"]) == 1
    ckb = torch.load(best, weights_only=True)
    assert ckb["epoch"] == 1 and torch.equal(ckb["generator"]["head.weight"], ck["generator"]["head.weight"])

    model, meta = load_generator(best, expect_variant="lsft")
    assert not model.training and model.variant == "lsft" and "generator" not in meta and meta["epoch"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckb["generator"][k])
    # the stored validation metrics are what the rebuilt generator scores on the validation file
    t = read_priors(val).tensors()
    with torch.no_grad():
        pred = model(t["image"], t["priors"])
    assert pred.shape == (16, 1, SIZE, SIZE) and 0 <= pred.min() and pred.max() <= 1
    f = fidelity(pred, t["target"])
    assert ckb["metrics"]["l1"] == pytest.approx(f["l1"].mean().item(), abs=1e-6)
    assert ckb["metrics"]["r"] == pytest.approx(f["r"].mean().item(), abs=1e-6)
    assert ckb["metrics"]["ssim"] == pytest.approx(f["ssim"].mean().item(), abs=1e-6)
    # the log: one line per epoch in the documented shape, then the best epoch
    assert lines[1].startswith("epoch 1/1: L1 ") and "| D(real) " in lines[1] and " D(fake) " in lines[1]
    assert "| val L1 " in lines[1] and " r " in lines[1] and " ssim " in lines[1]
    assert lines[-1].startswith("gan: best epoch 1 ")
    assert result["best_epoch"] == 1 and result["step"] == 4
    assert 0 < result["history"][0]["d_real"] < 1 and 0 < result["history"][0]["d_fake"] < 1


def test_resume_at_epoch_boundary_equals_uninterrupted_run(one_epoch, data) -> None:
    root, train, val = data
    config, _, _ = one_epoch
    continued = run_gan_stage(load_config(config, ["gan.epochs=2"]), resume=True, log=lambda _m: None)
    straight = run_gan_stage(load_config(gan_config(root, train, val, epochs=2, out=str(root / "straight"))),
                             log=lambda _m: None)
    a = torch.load(f"{load_config(config).gan_prefix}-last.pt", weights_only=True)
    b = torch.load(root / "straight-last.pt", weights_only=True)
    for key in ("generator", "discriminator", "optim_g", "optim_d"):
        assert _tensors_equal(a[key], b[key]), key
    assert continued["history"][1]["val_r"] == straight["history"][1]["val_r"]
    assert [h["epoch"] for h in continued["history"]] == [1, 2]


# ----------------------------------------------------------------------------------------- SIGKILL
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, data) -> None:
    _, train, val = data
    common = dict(epochs=3, checkpoint_every=1)
    straight = gan_config(tmp_path / "a", train, val, out=str(tmp_path / "a" / "run"), **common)
    killed = gan_config(tmp_path / "b", train, val, out=str(tmp_path / "b" / "run"), **common)
    kw = dict(cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # 4 steps per epoch: step 6 is epoch 2, batch 2; killed after training it, before its checkpoint
    procs = [subprocess.Popen(train_cmd(straight), env=subprocess_env(), **kw),
             subprocess.Popen(stage_cmd(killed, "gan", "--kill-at", "6"), env=subprocess_env(), **kw)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert procs[0].returncode == 0, outs[0][1][-2000:]
    assert procs[1].returncode == -signal.SIGKILL, outs[1][1][-2000:]
    mid = torch.load(tmp_path / "b" / "run-last.pt", weights_only=True)
    assert (mid["epoch"], mid["step"], mid["batch_in_epoch"]) == (1, 5, 1)
    assert torch.equal(mid["data_order"], epoch_order(0, 1, 32)) and len(mid["history"]) == 1

    res = subprocess.run(train_cmd(killed, "--resume"), env=subprocess_env(), timeout=300, **kw)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming at epoch 2, batch 1, step 5" in res.stdout
    a = torch.load(tmp_path / "a" / "run-last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run-last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12 and a["epoch"] == b["epoch"] == 3
    for key in ("generator", "discriminator", "optim_g", "optim_d"):
        assert _tensors_equal(a[key], b[key]), key
    assert state_sha256(a["generator"]) == state_sha256(b["generator"])
    # epoch 2's logged means survive the kill (partial sums are in the checkpoint)
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["val_l1"] == hb["val_l1"] and ha["l1"] == pytest.approx(hb["l1"], rel=1e-12)


def test_callbacks_see_every_step_before_its_checkpoint_and_the_final_weights(tmp_path, data) -> None:
    """on_step(step) runs once per trained step, in order, before that step's checkpoint; on_finish(rank, summary)
    gets the final weights' hashes; an exception from on_step stops the run (how the resume tests inject faults)."""
    _, train, val = data
    config = gan_config(tmp_path, train, val, epochs=2, checkpoint_every=3, out=str(tmp_path / "cb"))
    last, seen, finished = tmp_path / "cb-last.pt", [], []

    def on_step(step: int) -> None:
        seen.append((step, torch.load(last, weights_only=True)["step"] if last.exists() else 0))

    run_gan_stage(load_config(config), log=lambda _m: None, on_step=on_step,
                  on_finish=lambda rank, summary: finished.append((rank, summary)))
    # 4 steps per epoch: `last` is saved at steps 3 and 6 (checkpoint_every) and at the epochs' ends, 4 and 8
    assert seen == [(1, 0), (2, 0), (3, 0), (4, 3), (5, 4), (6, 4), (7, 6), (8, 6)]
    ck = torch.load(last, weights_only=True)
    assert finished == [(0, {"generator": state_sha256(ck["generator"]),
                             "discriminator": state_sha256(ck["discriminator"]), "step": 8, "world_size": 1})]

    class Stop(Exception):
        pass

    def stop(step: int) -> None:
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        run_gan_stage(load_config(config), overwrite=True, log=lambda _m: None, on_step=stop)
    assert torch.load(last, weights_only=True)["step"] == 4  # stopped after training step 6, before its checkpoint


# ----------------------------------------------------------------------------------------- DDP
def test_two_process_ddp_on_cpu(tmp_path, data) -> None:
    _, train, val = data
    config = gan_config(tmp_path, train, val, epochs=2, out=str(tmp_path / "ddp"))
    dump = tmp_path / "dump"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           *stage_cmd(config, "gan", "--dump", str(dump))[1:]]
    res = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["world_size"] == 2
    assert ranks[0]["step"] == 4  # 32 samples / 2 ranks / batch 8 = 2 steps per epoch
    assert res.stdout.count("epoch 2/2: L1") == 1  # only rank 0 logs
    ck = torch.load(tmp_path / "ddp-last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ck["generator"]) and ck["world_size"] == 2
    assert state_sha256(ck["generator"]) == ranks[0]["generator"]
    model, meta = load_generator(tmp_path / "ddp-last.pt")
    assert meta["step"] == 4 and model(torch.rand(2, 3, SIZE, SIZE), torch.rand(2, N, SIZE, SIZE)).shape == \
        (2, 1, SIZE, SIZE)


# ----------------------------------------------------------------------------------------- errors
def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_load_generator_errors_are_one_line(one_epoch, tmp_path) -> None:
    config, _, _ = one_epoch
    best = Path(f"{load_config(config).gan_prefix}-best.pt")
    with pytest.raises(UserError) as exc:
        load_generator(best, expect_variant="gsft")
    assert _one_line(exc) == f"{best} is a lsft checkpoint; use lsft_inference.py"
    with pytest.raises(UserError) as exc:
        load_generator(tmp_path / "nope.pt")
    assert "not found" in _one_line(exc)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as exc:
        load_generator(tmp_path / "junk.pt")
    assert "not a readable GAN checkpoint" in _one_line(exc)
    torch.save({"format": "cnnprior-cnn/1", "state_dict": {}}, tmp_path / "cnn.pt")
    with pytest.raises(UserError) as exc:
        load_generator(tmp_path / "cnn.pt")
    assert "not a GAN checkpoint" in _one_line(exc)
    ck = torch.load(best, weights_only=True)
    ck["generator_config"]["width"] = 16
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(UserError) as exc:
        load_generator(tmp_path / "bad.pt")
    assert "do not fit the lsft model" in _one_line(exc)


def test_existing_outputs_need_resume_or_overwrite(one_epoch, data, capsys) -> None:
    config, _, _ = one_epoch
    with pytest.raises(UserError) as exc:
        run_gan_stage(load_config(config))
    assert "--resume" in _one_line(exc) and "--overwrite" in str(exc.value)
    assert train_main(["--config", str(config), "--stage", "gan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "GAN outputs exist" in err and "\n" not in err
    with pytest.raises(UserError) as exc:  # a changed architecture cannot resume
        run_gan_stage(load_config(config, ["gan.width=16"]), resume=True)
    assert "gan.width" in _one_line(exc)


def test_resume_without_checkpoint(tmp_path, data) -> None:
    _, train, val = data
    with pytest.raises(UserError) as exc:
        run_gan_stage(load_config(gan_config(tmp_path, train, val)), resume=True)
    assert "no GAN checkpoint to resume from" in _one_line(exc)


def test_prior_files_that_disagree_are_refused(tmp_path, data) -> None:
    _, train, val = data
    other_n = write_priors(tmp_path / "n3.npy", 8, seed=3, n=3)
    with pytest.raises(UserError) as exc:
        run_gan_stage(load_config(gan_config(tmp_path, [train, other_n], val)))
    msg = _one_line(exc)
    assert msg.startswith(str(other_n)) and "priors n is 3" in msg and "has 4" in msg
    other_method = write_priors(tmp_path / "cam.npy", 8, seed=4, method="layercam")
    with pytest.raises(UserError) as exc:
        run_gan_stage(load_config(gan_config(tmp_path, train, other_method)))
    assert _one_line(exc).startswith(str(other_method)) and "method" in str(exc.value)
    assert not list(tmp_path.glob("models/*.pt"))


# ----------------------------------------------------------------------------------------- learning
def test_training_lowers_validation_l1_on_a_learnable_task(tmp_path) -> None:
    train = write_priors(tmp_path / "learn-train.npy", 64, seed=11)
    val = write_priors(tmp_path / "learn-test.npy", 32, seed=12)
    cfg = load_config(gan_config(tmp_path, train, val, epochs=6, lr=2e-3))
    seed_everything(0)  # the generator's initial weights, as the run builds them
    untrained = build_generator("lsft", N, 8, 1, 8, 8).eval()
    t = read_priors(val).tensors()
    with torch.no_grad():
        l1_before = fidelity(untrained(t["image"], t["priors"]), t["target"])["l1"].mean().item()
    history = run_gan_stage(cfg, log=lambda _m: None)["history"]
    assert len(history) == 6 and not any(math.isnan(h["val_l1"]) for h in history)
    assert history[-1]["val_l1"] < 0.5 * l1_before
    assert history[-1]["val_l1"] < history[0]["val_l1"]
    assert max(h["val_r"] for h in history) > history[0]["val_r"]
