"""The priors stage (`train.py --stage priors`): the conditional priors of each split written to a prior file, or on
torchrun to a prior set of one shard per rank (formats: priorfile.py, priorset.py; extraction: extract.py).
`priors.method` is checked against the CAM registry (`cams`) before anything is loaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from cnnprior.core.config import save_config, to_dict
from cnnprior.core.distributed import Dist, everywhere, from_main, joined
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import Log, file_sha256
from cnnprior.data.splits import load_split, stratified_take
from cnnprior.priors import cams
from cnnprior.priors.extract import PriorExtractor, extractor_for_checkpoint
from cnnprior.priors.priorfile import PRIORS_FORMAT, PriorWriter, make_records, read_prior_file, sidecar_path
from cnnprior.priors.priorset import (
    first_difference,
    manifest_path,
    set_outputs,
    shard_bounds,
    shard_files,
    shard_path,
    shared_meta,
    write_manifest,
)
from cnnprior.priors.read import read_priors

__all__ = [
    "check_outputs", "file_meta", "finished", "priors_stage", "remove_other_outputs", "run_priors_stage",
    "split_dataset", "write_prior_file", "write_prior_set", "write_shard"
]


def write_prior_file(extractor: PriorExtractor, dataset, path: Path, meta: dict, batch_size: int,
                     resume: bool, overwrite: bool, num_workers: int = 0, progress: bool = True) -> Path:
    """Extract priors for every item of `dataset` and write them (chunked, atomic, resumable)."""
    spec = extractor.spec
    writer = PriorWriter(path, len(dataset), meta, resume=resume, overwrite=overwrite)
    todo = Subset(dataset, range(writer.done, len(dataset)))
    loader = DataLoader(todo, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in tqdm(loader, desc=f"priors {path.name}", initial=writer.done // batch_size,
                      total=math.ceil(len(dataset) / batch_size), dynamic_ncols=True, disable=not progress):
        out = extractor(batch["image"], batch["label"])
        writer.write(make_records(out, batch["image"], batch["label"], batch["mask"], batch["index"],
                                  spec.size, spec.n, bool(meta.get("has_masks", True))))
    return writer.close()


def write_shard(extractor: PriorExtractor, dataset, path: Path, meta: dict, batch_size: int, ctx: Dist,
                resume: bool, overwrite: bool, num_workers: int = 0) -> Path:
    """This rank's shard of the prior set `path` names: its block of whole batches of the single-process order.

    With `resume` a finished shard of the same settings is kept and a partial one continued.
    """
    start, stop = shard_bounds(len(dataset), batch_size, ctx.rank, ctx.world)
    shard = shard_path(path, ctx.rank, ctx.world)
    meta = dict(meta, shard={"index": ctx.rank, "of": ctx.world, "start": start, "batch_size": batch_size})
    if shard.exists() and resume and not overwrite:
        kept = read_prior_file(shard, verify=False)
        if shared_meta(kept.meta) != shared_meta(json.loads(json.dumps(meta))) or len(kept) != stop - start:
            raise UserError(f"{shard}: shard was written with other settings; delete it or drop --resume")
        return shard
    if shard.exists() and not overwrite:
        raise UserError(f"{shard}: shard exists; use --resume to keep it or --overwrite to replace it")
    part = Subset(dataset, range(start, stop))
    return write_prior_file(extractor, part, shard, meta, batch_size, resume, overwrite, num_workers,
                            progress=ctx.main)


def write_prior_set(extractor: PriorExtractor, dataset, path: Path, meta: dict, batch_size: int, ctx: Dist,
                    resume: bool, overwrite: bool, num_workers: int = 0) -> Path:
    """Every rank writes its shard; once all are done, rank 0 writes the manifest. Returns the manifest's path."""
    everywhere(ctx, lambda: write_shard(extractor, dataset, path, meta, batch_size, ctx, resume, overwrite,
                                        num_workers))
    shards = [shard_path(path, r, ctx.world) for r in range(ctx.world)]

    def manifest() -> Path:
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise UserError(f"{missing[0]}: shard not found by rank 0; the ranks of a multi-node job need one shared "
                            f"folder for priors.out (or copy the shards together and run `python -m cnnprior.priors "
                            f"manifest {manifest_path(path)} SHARDS...`)")
        return write_manifest(manifest_path(path), shards, batch_size=batch_size, overwrite=overwrite)

    return from_main(ctx, manifest)


def finished(final: Path, meta: dict, count: int) -> bool:
    """Whether --resume can keep a split's finished prior file or set: it exists with these settings and count
    (another run's output is refused, not silently kept)."""
    if not final.is_file():
        return False
    kept = read_priors(final, verify=False)

    def essentials(m: dict) -> dict:
        # what decides the records: spec, layers, split, data, CNN; of the whole config only its data section
        # (a resume that adds randomised-copy seeds changes the config but not these files)
        out = {k: v for k, v in shared_meta(m).items() if k not in ("count", "content_sha256", "config")}
        return {**out, "config.data": (m.get("config") or {}).get("data")}

    want, got = essentials(json.loads(json.dumps(meta))), essentials(kept.meta)
    if got != want or len(kept) != count:
        key = first_difference(got, want) if got != want else f"count ({len(kept)} != {count})"
        raise UserError(f"{final}: a finished prior file of other settings ({key}); delete it, drop --resume, or "
                        f"use --overwrite")
    return True


def check_outputs(path: Path, world: int, resume: bool, overwrite: bool) -> None:
    """Refuse to replace a split's prior file or set without --overwrite, and a --resume of another world size."""
    manifest = manifest_path(path)
    if world == 1:
        if path.exists() and not overwrite:
            raise UserError(f"{path}: prior file exists; use --overwrite to replace it")
        if manifest.exists() and not overwrite:
            raise UserError(f"{manifest}: a prior set of this name exists; use --overwrite to replace it with one "
                            f"prior file")
    else:
        if manifest.exists() and not overwrite:
            raise UserError(f"{manifest}: prior set exists; use --overwrite to replace it")
        if path.exists() and not overwrite:
            raise UserError(f"{path}: prior file exists; use --overwrite to replace it with a prior set")
    if resume:
        others = sorted(w for w in shard_files(path) if w != world)
        if others:
            raise UserError(f"{path}: --resume found the shards of a {others[0]}-process run; resume with "
                            f"{others[0]} processes (torchrun, nodes x nproc_per_node) or drop --resume")
        single = path.with_name(path.name + ".partial")
        if world > 1 and single.exists():
            raise UserError(f"{single}: --resume found a single-process run's partial file; resume it with one "
                            f"process or drop --resume")


def remove_other_outputs(path: Path, world: int, log: Log) -> None:
    """After --overwrite: delete the other form of a split's output (the single file, or a set's files) and any
    shards of another world size, so that `read_priors` finds only what was just written."""
    if world == 1:
        stale = set_outputs(path)
    else:
        stale = [f for f in (path, sidecar_path(path)) if f.exists()] + set_outputs(path, keep_world=world)
    for f in stale:
        f.unlink(missing_ok=True)
    if stale:
        log(f"priors: --overwrite removed {len(stale)} older file(s) of {path.name} ({stale[0].name}, ...)")


def split_dataset(cfg, split: str):
    """The images of one split, capped by priors.train_limit / test_limit (stratified, seeded)."""

    ds = load_split(cfg.data, split)
    cap = cfg.priors.train_limit if split == "train" else cfg.priors.test_limit
    if cap and cap < len(ds):
        keep = stratified_take(ds.labels, cap, cfg.data.seed)
        class_names, has_masks = ds.class_names, ds.has_masks
        ds = Subset(ds, keep.tolist())
        ds.class_names, ds.has_masks = class_names, has_masks
    return ds


def file_meta(cfg, extractor: PriorExtractor, cnn_meta: dict, ds, split: str, **extra) -> dict:
    """The sidecar of a prior file the priors stage writes (spec, layer bookkeeping, data, CNN, config)."""
    return {"format": PRIORS_FORMAT, **extractor.spec.as_dict(), **extractor.describe(),
            "split": split, "dataset": cfg.data.source, "class_names": list(ds.class_names),
            "has_masks": bool(ds.has_masks),
            "cnn": {"arch": cnn_meta["arch"], "checkpoint": str(cfg.cnn_checkpoint),
                    "checkpoint_sha256": file_sha256(cfg.cnn_checkpoint), "image_size": cnn_meta["image_size"],
                    "val_accuracy": cnn_meta.get("val_accuracy")},
            "config": to_dict(cfg), **extra}


def run_priors_stage(cfg, resume: bool = False, overwrite: bool = False, log: Log = print) -> list[Path]:
    """`train.py --stage priors`: write <priors.out>-<split>.npy + .json for each configured split.

    Under torchrun each split becomes a prior set (priorset.py): every rank writes one shard, a contiguous block
    of whole batches of the single-process order (so the records are the ones one process writes), and rank 0
    the manifest. `--resume` continues each rank's shard; it needs the world size of the interrupted run.
    """
    cams.get(cfg.priors.method, "priors.method", one_pass=True)  # a bad method: one line, before any work
    with joined(cfg.priors.device) as (ctx, device):
        return priors_stage(cfg, ctx, device, resume, overwrite, log if ctx.main else (lambda _msg: None))


def priors_stage(cfg, ctx: Dist, device: torch.device, resume: bool, overwrite: bool, log: Log) -> list[Path]:
    """The priors stage on one rank (`run_priors_stage` joins the job first)."""
    extractor, model, cnn_meta = everywhere(ctx, lambda: extractor_for_checkpoint(cfg, device))
    if cnn_meta["image_size"] != cfg.data.image_size:
        raise UserError(f"{cfg.cnn_checkpoint}: CNN input size {cnn_meta['image_size']} != data.image_size "
                        f"{cfg.data.image_size}")
    written = []
    for split in cfg.priors.splits:
        path = Path(f"{cfg.priors_prefix}-{split}.npy")
        ds = split_dataset(cfg, split)
        meta = file_meta(cfg, extractor, cnn_meta, ds, split)
        final, count = (path if ctx.world == 1 else manifest_path(path)), len(ds)
        if resume and not overwrite and from_main(ctx, lambda f=final, m=meta, k=count: finished(f, m, k)):
            log(f"priors: {final} exists (--resume: kept)")  # e.g. a run stopped in the randomised-copy files
            written.append(final)
            continue
        from_main(ctx, lambda path=path: check_outputs(path, ctx.world, resume, overwrite))
        log(f"priors: {split}: {len(ds)} images, {extractor.conv_count} conv layers, target "
            f"{meta['target_layer']}, positions {extractor.positions}"
            + (f"; {ctx.world} processes, one shard each" if ctx.enabled else ""))
        bs, workers = cfg.priors.batch_size, cfg.data.num_workers
        if ctx.enabled:
            out = write_prior_set(extractor, ds, path, meta, bs, ctx, resume, overwrite, workers)
            size = sum(shard_path(path, r, ctx.world).stat().st_size for r in range(ctx.world)) if ctx.main else 0
            log(f"priors: wrote {out} ({ctx.world} shards, {size / 1e6:.1f} MB)")
        else:
            out = write_prior_file(extractor, ds, path, meta, bs, resume, overwrite, workers)
            log(f"priors: wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        if overwrite and ctx.main:
            remove_other_outputs(path, ctx.world, log)
        written.append(out)
    if written and ctx.main:
        save_config(cfg, Path(f"{cfg.priors_prefix}.yaml"))
    return written
