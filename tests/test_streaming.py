"""GAN training data streamed from memmapped prior files: the same batches as the old in-RAM copy, and memory that
does not grow with the data set."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cnnprior.core.config import load_config
from cnnprior.gan.data import MapData, with_randomised
from cnnprior.priors.priorfile import PriorWriter, record_dtype
from cnnprior.priors.read import read_priors
from tests.helpers import gan_config, sidecar_meta, subprocess_env, write_priors

CPU = torch.device("cpu")


def in_ram(records: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the old MapData held: every record concatenated into uint8 tensors (N,3,S,S), (N,n,S,S), (N,1,S,S)."""
    rec = np.concatenate(records)
    return (torch.from_numpy(rec["image"].transpose(0, 3, 1, 2).copy()), torch.from_numpy(rec["priors"].copy()),
            torch.from_numpy(rec["target"][:, None].copy()))


def assert_batches_equal(data: MapData, expected: tuple[torch.Tensor, ...], idx: torch.Tensor) -> None:
    got = data.batch(idx, CPU)
    for g, e in zip(got, expected, strict=True):
        want = e[idx].float() / 255.0
        assert g.dtype == torch.float32 and g.is_contiguous() and g.shape == want.shape
        assert torch.equal(g, want)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    return {"a": write_priors(root / "a-train.npy", 20, seed=1), "b": write_priors(root / "b-train.npy", 13, seed=2),
            "r1": write_priors(root / "r1.npy", 30, seed=3), "r2": write_priors(root / "r2.npy", 25, seed=4),
            "root": root}


def test_streamed_batches_equal_the_in_ram_concatenation(files) -> None:
    a, b = read_priors(files["a"]), read_priors(files["b"])
    prior_set = SimpleNamespace(parts=[b.records[:6], b.records[6:]])  # a sharded file, as a PriorSet gives it
    data = MapData.from_files([a, prior_set])
    assert len(data) == 33 and data.rows is None and all(isinstance(p, np.memmap) for p in data.parts)
    expected = in_ram([a.records, b.records])
    g = torch.Generator().manual_seed(0)
    assert_batches_equal(data, expected, torch.randperm(33, generator=g)[:11])  # across all three parts
    assert_batches_equal(data, expected, torch.tensor([32, 0, 32, 5, 19, 20, 26, 25, 0]))  # repeats, unsorted
    assert_batches_equal(data, expected, torch.arange(33)[1::2])  # a strided slice (validation's rank share)
    assert_batches_equal(data, expected, torch.tensor([], dtype=torch.int64))

    capped = MapData.from_files([a, prior_set], limit=23)  # 20 of a, 3 of the set's first shard
    assert len(capped) == 23
    assert_batches_equal(capped, expected, torch.arange(23).flip(0))

    blind = replace(data, use_priors=False)  # gan.priors: none
    image, priors, target = blind.batch(torch.tensor([3, 30]), CPU)
    assert int(priors.abs().max()) == 0 and priors.shape == (2, 4, 16, 16)
    assert torch.equal(image, expected[0][[3, 30]].float() / 255) and torch.equal(target, expected[2][[3, 30]].float() / 255)
    image, priors, _ = replace(data, use_image=False).batch(torch.tensor([3, 30]), CPU)  # gan.image: none
    assert int(image.abs().max()) == 0 and torch.equal(priors, expected[1][[3, 30]].float() / 255)

    with pytest.raises(IndexError):
        data.batch(torch.tensor([33]), CPU)
    with pytest.raises(IndexError):
        data.batch(torch.tensor([-1]), CPU)


def test_randomised_records_are_picked_by_index_like_the_old_copy(files) -> None:
    a, b = read_priors(files["a"]), read_priors(files["b"])
    train = MapData.from_files([a, b])
    names = [str(files["r1"]), str(files["r2"])]
    cfg = load_config(None, ["gan.randomised_share=0.5", "gan.seed=3", f"gan.randomised=[{', '.join(names)}]"])
    mixed, info = with_randomised(cfg, train, a)
    assert info == {"share": 0.5, "files": names, "count": 33} and len(mixed) == 66
    assert len(mixed.parts) == 4 and all(isinstance(p, np.memmap) for p in mixed.parts)  # no copy of the pool
    # the old code: the pool concatenated in RAM, then randperm(len(pool), seed gan.seed)[:count] of it appended
    pool = in_ram([read_priors(n).records for n in names])
    pick = torch.randperm(55, generator=torch.Generator().manual_seed(3))[:33]
    expected = tuple(torch.cat([t, p[pick]]) for t, p in zip(in_ram([a.records, b.records]), pool, strict=True))
    assert_batches_equal(mixed, expected, torch.arange(66))
    assert_batches_equal(mixed, expected, torch.randperm(66, generator=torch.Generator().manual_seed(1))[:20])


# ----------------------------------------------------------------------------------------- memory
RSS_SIZE, RSS_N, RSS_COUNT = 64, 4, 4096  # 32,786-byte records: 134 MB for 1x, 537 MB for 4x

# Runs in a fresh interpreter: trains the config's generator for `steps` steps and prints the peak RssAnon (kB).
# RssAnon is the process's anonymous memory (heap, tensors, numpy copies); memmapped prior-file pages are
# file-backed (RssFile) and the kernel drops them at will, so VmRSS / VmHWM would grow with the data merely read.
# /proc has no RssAnon high-water mark, so a thread samples it every 2 ms for the whole stage (file checks, data
# set-up, training), and the stage's on_step callback samples it at every training step and stops the run after
# `steps` steps.
RSS_SCRIPT = """
import json, sys, threading, time
from cnnprior.core.config import load_config
from cnnprior.gan.train import run_gan_stage

def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

class Stop(Exception):
    pass

steps, peak, done = int(sys.argv[2]), {"run": 0, "steps": 0, "trained": 0}, threading.Event()

def after_step(step):
    peak["steps"], peak["trained"] = max(peak["steps"], rss_anon()), step
    if step >= steps:
        raise Stop

def sample():
    while not done.is_set():
        peak["run"] = max(peak["run"], rss_anon())
        time.sleep(0.002)

start = rss_anon()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
try:
    run_gan_stage(load_config(sys.argv[1]), log=lambda _m: None, on_step=after_step)
except Stop:
    pass
done.set()
thread.join()
print(json.dumps({"start": start, **peak}))
"""


def write_random_priors(path: Path, count: int, seed: int, split: str = "train") -> Path:
    """A prior file of random uint8 records, written in chunks (never the whole file in memory)."""
    rng = np.random.default_rng(seed)
    writer = PriorWriter(path, count, sidecar_meta(RSS_SIZE, RSS_N, split=split))
    for start in range(0, count, 512):
        k = min(512, count - start)
        rec = np.zeros(k, dtype=record_dtype(RSS_SIZE, RSS_N, with_mask=False))
        for key in ("image", "priors", "target"):
            rec[key] = rng.integers(0, 256, rec[key].shape, dtype=np.uint8)
        rec["index"] = np.arange(start, start + k)
        writer.write(rec)
    return writer.close()


def peak_rss(config: Path, steps: int = 4) -> dict:
    res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(config), str(steps)], env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["trained"] == steps
    return out


def test_training_memory_does_not_grow_with_the_data_set(tmp_path) -> None:
    one = write_random_priors(tmp_path / "one-train.npy", RSS_COUNT, seed=1)
    three = write_random_priors(tmp_path / "three-train.npy", 3 * RSS_COUNT, seed=2)
    # the validation file grows 4x too: the baselines are chosen on all of it (streamed, chunk by chunk; the old
    # code held it whole as floats, 537 MB at 4,096 records), validation itself stops at gan.val_limit
    vals = {"1x": write_random_priors(tmp_path / "v1-val.npy", RSS_COUNT // 4, seed=3, split="val"),
            "4x": write_random_priors(tmp_path / "v4-val.npy", RSS_COUNT, seed=4, split="val")}
    runs = {}
    try:
        for name, train in (("1x", [one]), ("4x", [one, three])):
            runs[name] = peak_rss(gan_config(tmp_path / name, train, vals[name], batch_size=2,
                                             out=str(tmp_path / name / "run")))
    finally:  # pytest keeps recent tmp folders; these files are half a gigabyte
        for f in (one, three, *vals.values()):
            f.unlink()
    record = record_dtype(RSS_SIZE, RSS_N, with_mask=False).itemsize
    print(f"peak RssAnon (kB) on {RSS_COUNT:,} vs {4 * RSS_COUNT:,} records of {record:,} bytes: {json.dumps(runs)}")
    for key in ("run", "steps"):  # the whole stage, and the training steps alone
        assert runs["4x"][key] < 1.10 * runs["1x"][key], (key, runs)
