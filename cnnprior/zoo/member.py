"""One zoo member from descriptor to files: train it (train.py), keep its checkpoint, and if it reaches the zoo's
quality floor write its test / val / train priors and its randomised-copy priors with the priors stage's own
writer and rules (priors/stage.py, priors/random_priors.py), every sidecar carrying the descriptor under `zoo`.
Its record, `<id>.json` in its folder, is written last: a member is finished exactly when that file exists.

Files of member m007 under `zoo.out`: `m007/m007-cnn.pt`, `m007/m007-{test,val,train}.npy` (+ .json sidecars),
`m007/m007-train-random-<stage>-s<seed>.npy` (+ .json), `m007/m007.json`.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from torch.utils.data import Subset

from cnnprior.cnn.randomise import model_stages, randomise
from cnnprior.core.config import Config, to_dict
from cnnprior.core.runtime import Log, atomic_write_text, file_sha256
from cnnprior.priors.extract import extractor_from
from cnnprior.priors.random_priors import FixedClassExtractor, random_prior_path, stage_steps
from cnnprior.priors.spec import spec_from_config
from cnnprior.priors.stage import file_meta, split_dataset, write_prior_file
from cnnprior.zoo.families import family_arch
from cnnprior.zoo.train import save_member, threads, train_member

__all__ = ["MEMBER_FORMAT", "member_dir", "member_settings", "record_path", "run_member"]

MEMBER_FORMAT = "cnnprior-zoo-member/1"


def member_dir(out: str | Path, member: str) -> Path:
    """The folder of one member's files."""
    return Path(out) / member


def record_path(out: str | Path, member: str) -> Path:
    """The member's record: written last, its presence marks the member finished."""
    return member_dir(out, member) / f"{member}.json"


def member_settings(cfg: Config) -> dict:
    """What besides the descriptor decides a member's files: the data, the priors (less their device), the floor
    and the thread count (a resumed zoo must agree on them)."""
    priors = {k: v for k, v in to_dict(cfg)["priors"].items() if k not in ("device", "out")}
    data = {k: v for k, v in to_dict(cfg)["data"].items() if k not in ("num_workers", "homepage")}
    return {"data": data, "priors": priors, "floor": cfg.zoo.floor, "threads": cfg.zoo.threads}


def _member_cfg(cfg: Config, ckpt: Path, prefix: Path) -> Config:
    """The config the priors writers read: the zoo's, with this member's checkpoint and prefix."""
    mc = copy.deepcopy(cfg)
    mc.cnn.checkpoint, mc.priors.out = str(ckpt), str(prefix)
    return mc


def _sidecar(cfg: Config, mc: Config, extractor, cnn_meta: dict, ds, split: str, zoo: dict, **extra) -> dict:
    """A prior file's sidecar as the priors stage writes it, with the zoo's config and the member under `zoo`."""
    meta = file_meta(mc, extractor, cnn_meta, ds, split, zoo=zoo, **extra)
    meta["config"] = to_dict(cfg)  # the zoo's config (its cnn section trains no member; the descriptor does)
    return meta


def _write_priors(cfg: Config, mc: Config, model, cnn_meta: dict, zoo: dict, log: Log) -> dict:
    """Every split's prior file and every randomised-copy prior file of a kept member -> their paths."""
    pc, prefix = cfg.priors, Path(mc.priors_prefix)
    extractor = extractor_from(model, spec_from_config(pc))
    written: dict = {}
    for split in pc.splits:
        ds = split_dataset(cfg, split)
        path = Path(f"{prefix}-{split}.npy")
        meta = _sidecar(cfg, mc, extractor, cnn_meta, ds, split, zoo)
        write_prior_file(extractor, ds, path, meta, pc.batch_size, False, True, progress=False)
        written[split] = str(path)
    written["random"] = []
    if not pc.randomised_stages:
        return written
    ds = split_dataset(cfg, "train")
    per_file = min(pc.randomised_limit or len(ds), len(ds))
    n_stages, order, init = len(model_stages(model)), pc.randomised_order, pc.randomised_init
    for step, stage in stage_steps(model, list(pc.randomised_stages), order):
        for seed in range(pc.randomised_seeds):
            # the slice rule of random_priors.run_random_priors_stage: each (stage, seed) its own train images
            start = ((step - 1 + n_stages * seed) * per_file) % len(ds)
            part = Subset(ds, [(start + i) % len(ds) for i in range(per_file)])
            part.class_names, part.has_masks = ds.class_names, ds.has_masks
            copy_ = randomise(model, order, step, seed, init).eval()
            ex = FixedClassExtractor(model, extractor_from(copy_, extractor.spec))
            path = random_prior_path(str(prefix), stage, seed, order, init)
            meta = _sidecar(cfg, mc, ex.extractor, cnn_meta, part, "train", zoo,
                            randomised={"steps": step, "stage": stage, "seed": seed, "order": order, "init": init,
                                        "explained": "the trained CNN's predicted class"})
            write_prior_file(ex, part, path, meta, pc.batch_size, False, True, progress=False)
            written["random"].append(str(path))
    log(f"zoo: {zoo['member']}: priors {', '.join(pc.splits)} and {len(written['random'])} randomised-copy files")
    return written


def run_member(cfg: Config, desc: dict, log: Log = print) -> dict:
    """Train member `desc`, write its files and its record (zoo.out/<id>/<id>.json); returns the record."""
    t0, c0 = time.time(), time.process_time()
    member = desc["id"]
    folder = member_dir(cfg.zoo.out or f"outputs/{cfg.name}", member)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / f"{member}-cnn.pt"
    with threads(cfg.zoo.threads):
        model, summary = train_member(desc, cfg.data, log)
        save_member(model, ckpt, desc, summary, cfg.data.source)
        kept = summary["val_accuracy"] >= cfg.zoo.floor and not summary["diverged"]
        log(f"zoo: {member} ({desc['family']}): val accuracy {summary['val_accuracy']:.4f} at epoch "
            f"{summary['epoch']} ({summary['seconds']:.0f}s){'' if kept else f', below the floor {cfg.zoo.floor}: left out'}")
        t1 = time.time()
        priors: dict = {}
        if kept:
            mc = _member_cfg(cfg, ckpt, folder / member)
            cnn_meta = {"arch": family_arch(desc["family"]), "image_size": model.image_size,
                        "val_accuracy": summary["val_accuracy"]}
            zoo = {"member": member, "descriptor": desc, "val_accuracy": summary["val_accuracy"]}
            priors = _write_priors(cfg, mc, model, cnn_meta, zoo, log)
    record = {
        "format": MEMBER_FORMAT, "id": member, "index": desc["index"], "family": desc["family"],
        "arch": family_arch(desc["family"]), "descriptor": desc, "val_accuracy": summary["val_accuracy"],
        "kept": bool(kept), "epoch": summary["epoch"], "diverged": summary["diverged"],
        "params": summary["params"], "train_images": summary["train_images"], "val_images": summary["val_images"],
        "history": summary["history"], "checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(ckpt),
        "priors": priors, "settings": member_settings(cfg),
        "seconds": {"epochs": summary["epoch_seconds"], "train": round(summary["seconds"], 2), "priors": round(time.time() - t1, 2),
                    "total": round(time.time() - t0, 2), "cpu": round(time.process_time() - c0, 2)},
    }
    atomic_write_text(record_path(folder.parent, member), json.dumps(record, indent=1))
    return record
