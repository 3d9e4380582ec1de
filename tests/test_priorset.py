"""Prior sets (cnnprior.priors.priorset): shards plus a manifest read as one prior file; the priors stage on torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnprior.cnn.model import build_cnn, save_cnn
from cnnprior.core.config import Config, load_config, save_config
from cnnprior.core.distributed import Dist
from cnnprior.core.errors import UserError
from cnnprior.gan.data import MapData, load_gan_data
from cnnprior.priors.cli import main
from cnnprior.priors.priorfile import PriorFile, PriorWriter, content_hash, record_dtype
from cnnprior.priors.priorset import (
    PRIORSET_FORMAT,
    PriorSet,
    manifest_path,
    shard_bounds,
    shard_files,
    shard_path,
    write_manifest,
)
from cnnprior.priors.random_priors import random_prior_path, run_random_priors_stage
from cnnprior.priors.read import read_priors, zero_map_fractions
from cnnprior.priors.spec import PriorSpec
from cnnprior.priors.stage import check_outputs, finished, run_priors_stage, write_shard
from tests.helpers import REPO, blob_maps, free_port, gan_config, sidecar_meta, subprocess_env

SIZE, N = 8, 2


def _records(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rec = np.zeros(count, dtype=record_dtype(SIZE, N, with_mask=False))
    rec["image"] = rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)
    rec["priors"] = np.rint(blob_maps(rng, count, N, SIZE) * 255).astype(np.uint8)
    rec["target"] = rec["priors"].mean(1).astype(np.uint8)
    rec["label"] = rec["pred"] = rec["explained"] = rng.integers(0, 2, count)
    rec["prob"], rec["index"] = 0.5, np.arange(count)
    return rec


def _shard_meta(index: int, world: int, start: int) -> dict:
    return sidecar_meta(SIZE, N, shard={"index": index, "of": world, "start": start, "batch_size": 2})


def _write_set(folder: Path, rec: np.ndarray, counts: list[int]) -> Path:
    """A set `folder/s-train` whose shards hold `counts` records of `rec` in order; returns the manifest."""
    name, shards, start = folder / "s-train.npy", [], 0
    for i, c in enumerate(counts):
        w = PriorWriter(shard_path(name, i, len(counts)), c, _shard_meta(i, len(counts), start))
        w.write(rec[start:start + c])
        shards.append(w.close())
        start += c
    return write_manifest(manifest_path(name), shards, batch_size=2)


@pytest.fixture
def prior_set(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rec = _records(10)
    return _write_set(tmp_path, rec, [4, 0, 6]), rec


# ----------------------------------------------------------------------------------------- format
def test_names_and_shards_of_whole_batches() -> None:
    assert manifest_path("npys/x-train.npy") == Path("npys/x-train.priorset.json")
    assert shard_path("npys/x-train.npy", 1, 2) == Path("npys/x-train-shard00001-of00002.npy")
    assert shard_path("npys/x-train.priorset.json", 0, 3) == Path("npys/x-train-shard00000-of00003.npy")
    for count, bs, world in [(10, 4, 2), (1000, 32, 3), (5, 8, 4), (64, 8, 8), (0, 4, 2)]:
        bounds = [shard_bounds(count, bs, r, world) for r in range(world)]
        assert [i for a, b in bounds for i in range(a, b)] == list(range(count))  # in order, each once
        assert all(a % bs == 0 for a, _ in bounds)  # every shard starts at a batch of the single-process order
        sizes = [-(-(b - a) // bs) for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1  # whole batches, balanced
    assert [shard_bounds(10, 4, r, 2) for r in range(2)] == [(0, 4), (4, 10)]


def test_set_reads_like_one_prior_file(prior_set, tmp_path: Path, capsys) -> None:
    manifest, rec = prior_set
    single = PriorWriter(tmp_path / "one.npy", 10, sidecar_meta(SIZE, N))
    single.write(rec)
    one = read_priors(single.close())
    m = json.loads(manifest.read_text())
    assert m["format"] == PRIORSET_FORMAT and m["count"] == 10 and m["batch_size"] == 2
    assert [(s["file"], s["start"], s["count"]) for s in m["shards"]] == [
        ("s-train-shard00000-of00003.npy", 0, 4), ("s-train-shard00001-of00003.npy", 4, 0),
        ("s-train-shard00002-of00003.npy", 4, 6)]
    # the set's hash is the hash of all records in order: the same as one file holding them
    assert m["content_sha256"] == content_hash(rec) == one.meta["content_sha256"]
    assert "shard" not in m["meta"] and m["meta"]["size"] == SIZE and m["meta"]["split"] == "train"
    for name in (manifest, tmp_path / "s-train.npy"):  # the manifest, or the .npy name the set stands in for
        ps = read_priors(name)
        assert isinstance(ps, PriorSet) and ps.path == manifest
        assert len(ps) == 10 and (ps.size, ps.n) == (SIZE, N) and [len(p) for p in ps.parts] == [4, 0, 6]
        assert isinstance(ps.parts[0], np.memmap) and np.array_equal(ps.records, rec)
        assert ps.meta["count"] == 10 and ps.meta["content_sha256"] == one.meta["content_sha256"]
        assert ps.meta["class_names"] == one.meta["class_names"]
    assert one.parts == [one.records] and isinstance(one, PriorFile)
    for idx in (None, slice(2, 7), slice(4, 10), slice(0, 10, 3), [9, 0, 5, 4], torch.tensor([3, 4]), np.array([-1])):
        got, want = ps.tensors(idx), one.tensors(idx)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), idx
    assert np.array_equal(ps.select(slice(3, 5)), rec[3:5]) and len(ps.select(slice(4, 4))) == 0
    with pytest.raises(IndexError):
        ps.select([10])
    assert zero_map_fractions(ps) == zero_map_fractions(one)
    read_priors(manifest, verify=True)  # every shard hashed: passes
    assert main(["info", str(tmp_path / "s-train.npy")]) == 0
    out = capsys.readouterr().out
    assert "prior set of 3 shards, 10 samples, S=8, n=2" in out and "s-train-shard00002-of00003.npy: records 4-9 (6)" \
        in out and f"content sha256 {content_hash(rec)}: not verified" in out
    assert main(["info", str(manifest), "--verify"]) == 0
    assert f"{content_hash(rec)}: verified" in capsys.readouterr().out


def test_manifest_command_gathers_shards_and_refuses_mixed_runs(prior_set, tmp_path: Path, capsys) -> None:
    manifest, rec = prior_set
    shards = [tmp_path / s["file"] for s in json.loads(manifest.read_text())["shards"]]
    out = tmp_path / "copy" / "s-train.priorset.json"  # shard names are kept relative to the manifest
    assert main(["manifest", str(out), *map(str, shards)]) == 0
    assert "prior set of 3 shards, 10 samples" in capsys.readouterr().out
    assert json.loads(out.read_text())["shards"][0]["file"] == "../s-train-shard00000-of00003.npy"
    assert np.array_equal(read_priors(out, verify=True).records, rec)
    assert main(["manifest", str(out), *map(str, shards)]) == 2  # exists: refuses without --overwrite
    assert "prior set exists; use --overwrite" in capsys.readouterr().err
    other = PriorWriter(tmp_path / "other.npy", 2, sidecar_meta(SIZE, N, split="val"))
    other.write(rec[:2])
    with pytest.raises(UserError, match=r"other\.npy: sidecar key 'split' differs .* must come from one run"):
        write_manifest(tmp_path / "mixed.priorset.json", [shards[0], other.close()])
    with pytest.raises(UserError, match=r"name ends with \.priorset\.json"):
        write_manifest(tmp_path / "mixed.json", shards)


def _flip_byte(path: Path, offset: int = -7) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(offset, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_bad_sets_are_one_line_errors(prior_set, tmp_path: Path, run_py, one_line_error) -> None:
    manifest, _ = prior_set
    good = manifest.read_text()
    shard2 = tmp_path / "s-train-shard00002-of00003.npy"
    _flip_byte(shard2)  # inside a record of the last shard
    assert len(read_priors(manifest)) == 10  # opening hashes nothing ...
    with pytest.raises(UserError, match=r"shard00002-of00003\.npy: content hash differs from the manifest"):
        read_priors(manifest, verify=True)  # ... verify does
    line = one_line_error(run_py("-m", "cnnprior.priors", "info", manifest, "--verify", cwd=tmp_path))
    assert "content hash differs from the manifest s-train.priorset.json" in line
    _flip_byte(shard2)
    cases = [
        (lambda m: m["shards"][0].update(count=5), r"holds 4 records but the manifest s-train\.priorset\.json says 5"),
        (lambda m: m.update(count=11), r"shards hold 10 records but the manifest says 11"),
        (lambda m: m["shards"][2].update(content_sha256="0" * 64), r"sidecar's content hash differs from the manifest"),
        (lambda m: m["meta"].update(n=3), r"sidecar key 'n' differs from the manifest"),
        (lambda m: m.update(format="cnnprior-priorset/9"), r"prior-set manifest of format 'cnnprior-priorset/9', from "
                                                           r"another version of cnnprior \(this version reads "
                                                           r"'cnnprior-priorset/1'\)"),
        (lambda m: m.update(format="other"), r"not a cnnprior prior-set manifest \(format 'other'"),
        (lambda m: m.pop("shards"), r"manifest lacks count, content_sha256, meta or a list of shards"),
        (lambda m: m.update(content_sha256="0" * 64), None),  # only verify sees a wrong total hash
    ]
    for edit, error in cases:
        manifest.write_text(good)
        _edit_json(manifest, edit)
        if error is None:
            with pytest.raises(UserError, match=r"content hash of all records differs from the manifest"):
                read_priors(manifest).verify()
            continue
        with pytest.raises(UserError, match=error) as info:
            read_priors(manifest)
        assert "\n" not in str(info.value)
    manifest.write_text("{not json")
    with pytest.raises(UserError, match=r"prior-set manifest is not valid JSON"):
        read_priors(manifest)
    manifest.write_text(good)
    (tmp_path / "s-train-shard00000-of00003.npy").unlink()
    with pytest.raises(UserError, match=r"shard s-train-shard00000-of00003\.npy missing \(1 of 3"):
        read_priors(tmp_path / "s-train.npy")
    manifest.unlink()
    with pytest.raises(UserError, match=r"s-train\.npy: prior file not found"):
        read_priors(tmp_path / "s-train.npy")


# ----------------------------------------------------------------------------------------- writing shards
class _Extractor:
    """Stands in for a PriorExtractor: maps made from the images (fast, deterministic)."""

    spec = PriorSpec(size=SIZE, n=N)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        gray = images.mean(1)
        return {"priors": torch.stack([gray, 1 - gray], 1), "target": gray.sqrt(), "explained": labels,
                "prob": torch.full((len(images),), 0.5), "pred": labels}


class _Images(torch.utils.data.Dataset):
    """Random images; item `fail_at` raises (an interrupted run)."""

    def __init__(self, count: int, fail_at: int = -1):
        self.images = torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        self.fail_at = fail_at

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        if i == self.fail_at:
            raise RuntimeError("interrupted")
        return {"image": self.images[i], "label": i % 2, "mask": torch.zeros(SIZE, SIZE), "index": i}


def test_shard_resume_continues_and_other_world_sizes_are_refused(tmp_path: Path) -> None:
    meta, ex, ctx = sidecar_meta(SIZE, N), _Extractor(), Dist(rank=1, world=2)
    straight = write_shard(ex, _Images(11), tmp_path / "a" / "x-train.npy", meta, 2, ctx, False, False)
    path = tmp_path / "b" / "x-train.npy"
    with pytest.raises(RuntimeError, match="interrupted"):  # rank 1 holds records 6..10: dies in its 2nd batch
        write_shard(ex, _Images(11, fail_at=9), path, meta, 2, ctx, False, False)
    assert (path.parent / "x-train-shard00001-of00002.npy.partial").exists() and not shard_path(path, 1, 2).exists()
    assert json.loads((path.parent / "x-train-shard00001-of00002.npy.progress.json").read_text())["done"] == 2
    with pytest.raises(UserError, match=r"--resume found the shards of a 2-process run; resume with 2 processes"):
        check_outputs(path, 3, resume=True, overwrite=False)
    with pytest.raises(UserError, match=r"shards of a 2-process run"):
        check_outputs(path, 1, resume=True, overwrite=False)
    check_outputs(path, 2, resume=True, overwrite=False)
    resumed = write_shard(ex, _Images(11), path, meta, 2, ctx, True, False)
    assert resumed.read_bytes() == straight.read_bytes()
    assert read_priors(resumed).meta["shard"] == {"index": 1, "of": 2, "start": 6, "batch_size": 2}
    assert list(shard_files(path)) == [2]
    before = resumed.stat().st_mtime_ns
    assert write_shard(ex, _Images(11), path, meta, 2, ctx, True, False) == resumed  # finished: kept
    assert resumed.stat().st_mtime_ns == before
    with pytest.raises(UserError, match=r"shard exists; use --resume to keep it or --overwrite"):
        write_shard(ex, _Images(11), path, meta, 2, ctx, False, False)
    with pytest.raises(UserError, match=r"shard was written with other settings"):
        write_shard(ex, _Images(11), path, dict(meta, split="val"), 2, ctx, True, False)
    single = tmp_path / "c" / "y-val.npy"
    single.parent.mkdir()
    single.with_name("y-val.npy.partial").write_bytes(b"")
    with pytest.raises(UserError, match=r"single-process run's partial file; resume it with one process"):
        check_outputs(single, 2, resume=True, overwrite=False)


# ----------------------------------------------------------------------------------------- the stage on torchrun
CLASSES = ["circle", "square", "triangle", "cross", "star"]


def _stage_config(root: Path, out: str, *extra: str) -> Config:
    overrides = ["name=tiny", "data.source=shapes", "data.shapes_count=40", "data.image_size=32",
                 "data.val_fraction=0.2", "data.test_fraction=0.2", "cnn.arch=resnet18", "cnn.device=cpu",
                 f"cnn.checkpoint={root / 'models' / 'tiny-cnn.pt'}", "priors.device=cpu", "priors.size=16",
                 "priors.n=4", "priors.batch_size=4", "priors.splits=[train, val]", "priors.train_limit=10",
                 "priors.test_limit=4", "priors.randomised_stages=[fc, layer3]", "priors.randomised_limit=4",
                 f"priors.out={root / out / 'tiny'}", *extra]
    return load_config(None, overrides)


def test_two_process_priors_stage_writes_the_records_of_one_process(tmp_path: Path) -> None:
    one = _stage_config(tmp_path, "one")
    torch.manual_seed(0)
    save_cnn(build_cnn("resnet18", CLASSES, 32), one.cnn_checkpoint, val_accuracy=0.2, epoch=0, config={},
             dataset="shapes")
    config = save_config(_stage_config(tmp_path, "two"), tmp_path / "two.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPO / "train.py"), "--config",
           str(config), "--stage", "priors"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # meanwhile, the same stage in one process (this one)
    singles = run_priors_stage(one, log=lambda _m: None) + run_random_priors_stage(one, log=lambda _m: None)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    two = tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(
        ["tiny.yaml", "tiny-train.priorset.json", "tiny-val.priorset.json"]
        + [f"tiny-{s}-shard0000{r}-of00002.{x}" for s in ("train", "val") for r in (0, 1) for x in ("npy", "json")]
        + [f"tiny-train-random-{st}-s0.{x}" for st in ("fc", "layer3") for x in ("npy", "json")])
    assert stdout.count("priors: wrote") == 2 and "(2 shards" in stdout  # rank 0 logs the stage
    copy = "priors: randomised copy (top_down, init default) at"
    assert f"[rank 0] {copy} fc" in stdout and f"[rank 1] {copy} layer3" in stdout  # one randomised-copy file per rank
    for split, counts in (("train", [4, 6]), ("val", [0, 4])):  # blocks of whole batches of 4
        single, ps = read_priors(one.priors_prefix + f"-{split}.npy"), read_priors(two / f"tiny-{split}.npy")
        assert isinstance(ps, PriorSet) and [len(p) for p in ps.parts] == counts
        # every rank computed exactly the single process's batches: identical uint8 records, identical hash
        assert ps.meta["content_sha256"] == single.meta["content_sha256"] == content_hash(single.records)
        assert np.array_equal(ps.records, single.records)
        read_priors(ps.path, verify=True)
    for path in singles[2:]:
        other = two / path.name
        assert read_priors(other).meta["content_sha256"] == read_priors(path).meta["content_sha256"]
    assert singles[2:] == [random_prior_path(one.priors_prefix, s, 0) for s in ("fc", "layer3")]
    # the GAN stage's data loads from the set (by its .npy name) as from the file
    cfg = load_config(gan_config(tmp_path / "gan", two / "tiny-train.npy", two / "tiny-val.priorset.json"))
    train, val, meta = load_gan_data(cfg)
    ref = MapData.from_files([read_priors(singles[0])])
    assert len(train) == 10 and len(val) == 4 and torch.equal(train.image, ref.image)
    assert torch.equal(train.priors, ref.priors) and meta["size"] == 16 and meta["n"] == 4
    # a second run refuses to replace the sets; one process refuses too (the set's name is taken)
    with pytest.raises(UserError, match=r"tiny-train\.priorset\.json: a prior set of this name exists; use "
                                        r"--overwrite"):
        run_priors_stage(_stage_config(tmp_path, "two"), log=lambda _m: None)
    # --overwrite with one process: one file per split again, the set's files gone
    redo = run_priors_stage(_stage_config(tmp_path, "two", "priors.splits=[val]"), overwrite=True, log=lambda _m: None)
    assert redo == [two / "tiny-val.npy"] and not list(two.glob("tiny-val-shard*")) and not (
        two / "tiny-val.priorset.json").exists()
    assert read_priors(redo[0]).meta["content_sha256"] == read_priors(singles[1]).meta["content_sha256"]


def test_resume_keeps_finished_split_files_and_refuses_other_settings(tmp_path: Path, prior_set) -> None:
    # a priors stage stopped in its randomised-copy files is resumed: the finished split files are kept as they are
    cfg = _stage_config(tmp_path, "r", "priors.splits=[val]", "priors.randomised_stages=[]")
    torch.manual_seed(0)
    save_cnn(build_cnn("resnet18", CLASSES, 32), cfg.cnn_checkpoint, val_accuracy=0.2, epoch=0, config={},
             dataset="shapes")
    [val] = run_priors_stage(cfg, log=lambda _m: None)
    before, lines = val.stat().st_mtime_ns, []
    assert run_priors_stage(cfg, resume=True, log=lines.append) == [val]
    assert val.stat().st_mtime_ns == before and any("exists (--resume: kept)" in line for line in lines)
    with pytest.raises(UserError, match=r"prior file exists; use --overwrite"):  # no --resume: never replaced
        run_priors_stage(cfg, log=lambda _m: None)
    more = _stage_config(tmp_path, "r", "priors.splits=[val]", "priors.randomised_stages=[]", "priors.randomised_seeds=6")
    assert run_priors_stage(more, resume=True, log=lambda _m: None) == [val]  # other randomised copies: still kept
    assert val.stat().st_mtime_ns == before
    other = _stage_config(tmp_path, "r", "priors.splits=[val]", "priors.randomised_stages=[]", "priors.n=3")
    with pytest.raises(UserError, match=r"tiny-val\.npy: a finished prior file of other settings \(n\); delete it"):
        run_priors_stage(other, resume=True, log=lambda _m: None)
    # a prior set is checked the same way, through its manifest
    manifest, _ = prior_set
    meta = read_priors(manifest, verify=False).meta
    assert finished(manifest, {k: v for k, v in meta.items() if k not in ("count", "content_sha256")}, 10)
    with pytest.raises(UserError, match=r"count \(10 != 11\)"):
        finished(manifest, {k: v for k, v in meta.items() if k not in ("count", "content_sha256")}, 11)
