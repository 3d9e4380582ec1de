"""Tests for the classifier stage under torchrun: two gloo CPU processes train identical weights, resume exactly
after SIGKILL, refuse a mid-epoch resume with another process count, and may change it where an epoch ended."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from cnnprior.cli import train_main
from cnnprior.cnn.model import load_cnn
from cnnprior.cnn.train import CNN_STATE_FORMAT, EpochBatches, evaluate_accuracy, train_cnn
from cnnprior.core.config import load_config
from cnnprior.core.distributed import Dist, gather_objects, main_first, rank_seed, shard
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import epoch_order, state_sha256
from cnnprior.data.splits import load_split
from tests.helpers import REPO, free_port, stage_cmd, subprocess_env

# 40 shapes: 20 train, 10 val. Batch 3 per process: each rank's shard is 10 images, 3 batches (steps) per epoch
TRAIN, PER_RANK_BATCHES = 20, 3


def _config(root: Path, **cnn: object) -> Path:
    """A tiny shapes classifier (MobileNet-V3: dropout and batch norm) for 2 epochs, writing under root/models."""
    settings = {"arch": "mobilenet_v3_small", "epochs": 2, "batch_size": 3, "lr": 0.003, "device": "cpu",
                "checkpoint": str(root / "models" / "tiny-cnn.pt")}
    settings.update(cnn)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "data": {"source": "shapes", "shapes_count": 40, "image_size": 32,
                                                             "val_fraction": 0.2, "test_fraction": 0.2},
                                    "cnn": settings}, sort_keys=False))
    return path


def _torchrun(config: Path, *extra: str, api: bool = False) -> list[str]:
    """`torchrun --nproc_per_node=2 train.py --config CONFIG --stage classifier EXTRA` (gloo on CPU); `api`: the
    stage through the Python API with the tests' callbacks instead (EXTRA: --kill-at N, --dump DIR, --resume)."""
    script = stage_cmd(config, "classifier", *extra)[1:] if api else [str(REPO / "train.py"), "--config", str(config),
                                                                        "--stage", "classifier", *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", *script]


def _last(root: Path) -> dict:
    return torch.load(root / "models" / "tiny-cnn-last.pt", weights_only=True)


def _dumps(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def _equal(a: object, b: object) -> bool:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# ----------------------------------------------------------------------------------------- pieces
def test_epoch_batches_take_their_rank_s_shard_of_the_epoch_order() -> None:
    order = epoch_order(3, 1, 10)
    ranks = [EpochBatches(10, 2, seed=3, rank=r, world=3) for r in range(3)]
    for r, sampler in enumerate(ranks):
        sampler.set_epoch(1)
        mine = shard(order, r, 3).tolist()  # 10 padded to 12: 4 each, 2 full batches
        assert sampler.batches == len(sampler) == 2 and list(sampler) == [mine[:2], mine[2:4]]
    assert sorted(i for s in ranks for b in s for i in b) == sorted(order.tolist() + order[:2].tolist())
    one = EpochBatches(10, 2, seed=3)  # one process: the whole order, as before
    one.set_epoch(1)
    assert one.batches == 5 and [i for b in one for i in b] == order.tolist()
    ranks[1].set_epoch(1, start=1)  # a mid-epoch resume skips the rank's first batches
    assert list(ranks[1]) == [shard(order, 1, 3).tolist()[2:4]]


def test_one_process_helpers_are_plain_calls() -> None:
    alone = Dist()
    assert main_first(alone, lambda: 7) == 7 and gather_objects(alone, {"a": 1}) == [{"a": 1}]
    assert rank_seed(5, 0) == 5  # rank 0 draws what a one-process run draws
    assert len({rank_seed(5, r) for r in range(4)}) == 4 and rank_seed(5, 1) == rank_seed(5, 1)


# ----------------------------------------------------------------------------------------- two processes
def test_two_processes_train_identical_weights_and_resume_bit_identically(tmp_path: Path, capsys) -> None:
    """Straight and SIGKILLed 2-process runs side by side; one process may not resume mid-epoch; two may."""
    straight = _config(tmp_path / "a", checkpoint_every=1)
    killed = _config(tmp_path / "b", checkpoint_every=1)
    kw = dict(cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # 3 steps per epoch: step 5 is epoch 2, batch 2; every rank is killed after training it, `last` holds step 4
    procs = [subprocess.Popen(_torchrun(straight, "--dump", str(tmp_path / "dump-a"), api=True), env=subprocess_env(),
                              **kw),
             subprocess.Popen(_torchrun(killed, "--kill-at", "5", api=True), env=subprocess_env(), **kw)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert procs[0].returncode == 0, outs[0][1][-3000:]
    assert procs[1].returncode != 0, outs[1][1][-3000:]

    # the finished run: both ranks end with the same weights and optimiser; rank 0 alone logged and wrote
    ranks = _dumps(tmp_path / "dump-a")
    assert ranks[0] == ranks[1] and ranks[0]["world_size"] == 2 and ranks[0]["step"] == 2 * PER_RANK_BATCHES
    assert "x 2 processes (batch 3 each)" in outs[0][0] and outs[0][0].count("epoch 2: val accuracy") == 1
    assert sorted(p.name for p in (tmp_path / "a" / "models").iterdir()) == ["tiny-cnn-last.pt", "tiny-cnn.pt",
                                                                              "tiny-cnn.yaml"]
    a = _last(tmp_path / "a")
    assert a["format"] == CNN_STATE_FORMAT and a["world_size"] == 2 and a["train_count"] == TRAIN
    assert not any(k.startswith("module.") for k in a["model"]) and state_sha256(a["model"]) == ranks[0]["model"]
    (other,) = a["ranks"]  # rank 1's own RNG streams (dropout, augmentation), not rank 0's
    assert not torch.equal(other["rng"]["torch"], a["rng"]["torch"])
    assert not torch.equal(other["augment_rng"], a["augment_rng"])
    # validation is split over the ranks and summed: the recorded accuracy is the whole val split's
    model, meta = load_cnn(tmp_path / "a" / "models" / "tiny-cnn.pt")
    cfg = load_config(straight)
    assert meta["val_accuracy"] == evaluate_accuracy(model, DataLoader(load_split(cfg.data, "val"), batch_size=4),
                                                     torch.device("cpu"))

    mid = _last(tmp_path / "b")
    assert (mid["progress"]["epoch"], mid["progress"]["batch"], mid["progress"]["step"]) == (1, 1, 4)
    assert mid["world_size"] == 2 and mid["scheduler"]["last_epoch"] == 4
    # one process may not continue an epoch two began: one line, exit 2, nothing changed
    before = (tmp_path / "b" / "models" / "tiny-cnn-last.pt").read_bytes()
    with pytest.raises(UserError) as info:
        train_cnn(load_config(killed), resume=True, log=lambda _m: None)
    msg = str(info.value)
    assert "\n" not in msg and msg.endswith("tiny-cnn-last.pt: saved mid-epoch by 2 process(es), now 1; resume with "
                                            "2 (the process count may change only where an epoch ended)")
    capsys.readouterr()
    assert train_main(["--config", str(killed), "--stage", "classifier", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saved mid-epoch by 2 process(es), now 1" in err[0]
    assert (tmp_path / "b" / "models" / "tiny-cnn-last.pt").read_bytes() == before

    res = subprocess.run(_torchrun(killed, "--resume", "--dump", str(tmp_path / "dump-b"), api=True),
                         env=subprocess_env(), timeout=600, **kw)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming at epoch 2, batch 1, step 4" in res.stdout
    assert _dumps(tmp_path / "dump-b") == ranks
    b = _last(tmp_path / "b")
    for key in ("model", "optimizer", "scheduler", "rng", "augment_rng", "ranks"):
        assert _equal(a[key], b[key]), key
    assert [h["val_accuracy"] for h in a["progress"]["history"]] == [h["val_accuracy"] for h in
                                                                     b["progress"]["history"]]
    assert [h["train_loss"] for h in a["progress"]["history"]] == [h["train_loss"] for h in b["progress"]["history"]]


def test_process_count_may_change_where_an_epoch_ended(tmp_path: Path) -> None:
    """Two processes for epoch 1, one for epoch 2: the schedule follows the epochs and ends where it should."""
    config = _config(tmp_path)
    # killed at step 4 (epoch 2's first); without checkpoint_every, `last` holds the end of epoch 1
    res = subprocess.run(_torchrun(config, "--kill-at", "4", api=True), cwd=tmp_path, env=subprocess_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0, res.stderr[-3000:]
    first = _last(tmp_path)
    assert (first["progress"]["epoch"], first["progress"]["batch"], first["progress"]["step"]) == (1, 0, 3)
    lines: list[str] = []
    result = train_cnn(load_config(config), resume=True, log=lines.append)
    assert "resuming at epoch 2, batch 0, step 3" in lines[0] and " processes " not in lines[0]
    done = _last(tmp_path)
    # one process: 20 images / batch 3 = 6 steps per epoch; the schedule resumed at 1 x 6 and ended at 2 x 6
    assert done["world_size"] == 1 and done["ranks"] == [] and done["progress"]["step"] == 3 + 6
    assert done["scheduler"]["last_epoch"] == 12 and done["optimizer"]["param_groups"][0]["lr"] == 0.0
    assert [h["epoch"] for h in result["history"]] == [1, 2]
