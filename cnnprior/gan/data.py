"""The GAN stage's data: samples streamed from memmapped prior files, training/validation files, randomised-copy
mixing."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cnnprior.core.config import Config
from cnnprior.core.errors import UserError
from cnnprior.maps.baselines import choose_streamed
from cnnprior.priors.priorfile import PriorFile
from cnnprior.priors.priorset import manifest_path
from cnnprior.priors.random_priors import parse_random_prior_path, random_prior_path
from cnnprior.priors.read import read_priors

__all__ = [
    "AGREE_KEYS", "check_agree", "check_cnn_names", "load_gan_data", "MapData", "picked_cnns", "priors_meta",
    "randomised_files", "trained_cnns", "with_randomised", "with_references"
]

# Prior files trained on together must agree on these sidecar keys.
AGREE_KEYS = ("size", "n", "order", "target", "method")


@dataclass(eq=False)
class MapData:
    """Samples streamed from memmapped prior-file records: `batch(idx)` reads only the records it is asked for.

    `parts` are structured record arrays (memmapped; a PriorFile gives one, a prior set one per shard). Sample i
    is the record at position `rows[i]` of the parts laid end to end (`rows` None: position i, so a plain run
    holds no per-sample index). `use_image` / `use_priors` False make `batch` give zeros for that input
    (gan.image / gan.priors: none). `refs` (None: none) gives, per sample, the position of the trained CNN's
    record of the same image, -1 where there is none: `reference(idx)` reads those targets (gan.sanity_weight).
    """

    parts: list[np.ndarray]
    rows: np.ndarray | None = None
    use_image: bool = True
    use_priors: bool = True
    refs: np.ndarray | None = None
    starts: np.ndarray = field(init=False, repr=False)  # each part's first position, then the total

    def __post_init__(self) -> None:
        self.starts = np.cumsum([0] + [len(p) for p in self.parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1]) if self.rows is None else len(self.rows)

    @classmethod
    def from_files(cls, files: list[PriorFile], limit: int = 0) -> MapData:
        """Prior files (or sets) end to end, the first `limit` records in all when limit > 0; nothing is copied."""
        parts: list[np.ndarray] = []
        left = limit or None
        # a prior set lists its shards in `parts`; getattr(pf, "parts", [pf.records]) would read pf.records first
        for part in (p for pf in files for p in (pf.parts if hasattr(pf, "parts") else [pf.records])):
            if left is not None:
                part = part[:left]  # a view of the memmap
                left -= len(part)
            parts.append(part)
            if left is not None and left <= 0:
                break
        return cls(parts)

    def positions(self) -> np.ndarray:
        """Every sample's position in the parts laid end to end."""
        return np.arange(self.starts[-1], dtype=np.int64) if self.rows is None else self.rows

    def take(self, idx: Tensor | np.ndarray) -> MapData:
        """The samples `idx` (in that order) as a MapData over the same parts."""
        refs = None if self.refs is None else self.refs[self._indices(idx)]
        return replace(self, rows=self._positions(idx), refs=refs)

    @staticmethod
    def join_all(datas: list[MapData]) -> MapData:
        """The samples of `datas` one after the other (a single one is returned as it is)."""
        out = datas[0]
        for other in datas[1:]:
            out = out.join(other)
        return out

    def join(self, other: MapData) -> MapData:
        """This data's samples followed by `other`'s (other's input flags are not kept)."""
        refs = None
        if self.refs is not None or other.refs is not None:
            mine = self.refs if self.refs is not None else np.full(len(self), -1, np.int64)
            theirs = other.refs if other.refs is not None else np.full(len(other), -1, np.int64)
            refs = np.concatenate([mine, np.where(theirs >= 0, theirs + self.starts[-1], -1)])
        return replace(self, parts=self.parts + other.parts, refs=refs,
                       rows=np.concatenate([self.positions(), other.positions() + self.starts[-1]]))

    def _indices(self, idx: Tensor | np.ndarray) -> np.ndarray:
        """`idx` as a checked int64 array of sample indices."""
        idx = np.asarray(idx.cpu() if isinstance(idx, Tensor) else idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range 0..{len(self) - 1}")
        return idx

    def _positions(self, idx: Tensor | np.ndarray) -> np.ndarray:
        """The positions of samples `idx` in the parts laid end to end."""
        idx = self._indices(idx)
        return idx if self.rows is None else self.rows[idx]

    def reference(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """The trained CNN's targets (B,1,S,S) in [0, 1] of the images of samples `idx` (zeros where a sample has
        none) and a (B,) float mask, 1 where it has one."""
        samples = self._indices(idx)
        refs = np.full(len(samples), -1, np.int64) if self.refs is None else self.refs[samples]
        has = refs >= 0
        size = self.parts[0].dtype.fields["target"][0].shape
        target = torch.zeros(len(refs), 1, *size)
        if has.any():
            plain = MapData(self.parts)  # positions, not samples
            target[torch.from_numpy(has)] = plain.uint8(refs[has])[2].float() / 255.0
        return target.to(device, non_blocking=True), torch.from_numpy(has).float().to(device, non_blocking=True)

    def uint8(self, idx: Tensor | np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """uint8 tensors image (B,3,S,S), priors (B,n,S,S), target (B,1,S,S) of samples `idx`, in that order."""
        pos = self._positions(idx)
        part = np.searchsorted(self.starts, pos, side="right") - 1  # empty parts are skipped
        fields = self.parts[0].dtype.fields
        out = {k: np.empty((len(pos), *fields[k][0].shape), np.uint8) for k in ("image", "priors", "target")}
        for p in np.unique(part):
            at = np.flatnonzero(part == p)
            rows = pos[at] - self.starts[p]
            ordered = np.argsort(rows, kind="stable")  # ascending reads of the memmap
            records = self.parts[p][rows[ordered]]
            for key, arr in out.items():
                arr[at[ordered]] = records[key]
        image = torch.from_numpy(out["image"]).permute(0, 3, 1, 2).contiguous()
        priors, target = torch.from_numpy(out["priors"]), torch.from_numpy(out["target"]).unsqueeze(1)
        return (image if self.use_image else torch.zeros_like(image),
                priors if self.use_priors else torch.zeros_like(priors), target)

    def batch(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Float tensors in [0, 1] (as PriorFile.tensors gives them) for samples `idx`, on `device`."""
        return tuple(t.to(device, non_blocking=True).float() / 255.0  # type: ignore[return-value]
                     for t in self.uint8(idx))

    # The whole data set read into RAM as uint8 tensors: for looking at small data in tests, never for training.
    @property
    def image(self) -> Tensor:
        return self.uint8(np.arange(len(self)))[0]

    @property
    def priors(self) -> Tensor:
        return self.uint8(np.arange(len(self)))[1]

    @property
    def target(self) -> Tensor:
        return self.uint8(np.arange(len(self)))[2]


def check_agree(ref: PriorFile, other: PriorFile) -> None:
    """Refuse a prior file whose AGREE_KEYS differ from the first training file's."""
    for key in AGREE_KEYS:
        if other.meta.get(key) != ref.meta.get(key):
            raise UserError(f"{other.path}: priors {key} is {other.meta.get(key)!r} but {ref.path} has "
                            f"{ref.meta.get(key)!r}; GAN prior files must agree on {', '.join(AGREE_KEYS)}")


def priors_meta(pf: PriorFile, train_files: list[str]) -> dict:
    """What a generator was trained on, from a prior file's sidecar (stored in every GAN checkpoint)."""
    m = pf.meta
    return {"size": int(m["size"]), "n": int(m["n"]), "order": m.get("order"), "target": m.get("target"),
            "method": m.get("method"), "include_target_layer": m.get("include_target_layer"),
            "explain": m.get("explain"), "dataset": m.get("dataset"),
            "class_names": [str(c) for c in m.get("class_names") or []],
            "cnn_arch": (m.get("cnn") or {}).get("arch"), "target_layer": m.get("target_layer"),
            "prior_layers": [[str(x) for x in layers] for layers in m.get("prior_layers") or []],
            "positions": [int(p) for p in m.get("positions") or []], "train_files": list(train_files),
            "exclude": list(m.get("exclude") or []), "layer_outputs": m.get("layer_outputs", "raw"),
            "layers": [str(x) for x in m.get("layers") or []]}


def randomised_files(cfg: Config) -> list[str]:
    """The randomised-copy prior files for gan.randomised_share: gan.randomised, or the ones this config's priors
    stage writes (its priors.randomised_order, _init, _stages and seeds 0 .. randomised_seeds - 1). Files of other
    schemes or seeds under the same prefix (made by another config's priors stage, e.g. for held-out sanity checks)
    are not taken: a recipe must not change with what else was run before it."""
    if cfg.gan.randomised:
        return list(cfg.gan.randomised)
    pc, prefix = cfg.priors, cfg.priors_prefix
    scheme, seeds = (pc.randomised_order, pc.randomised_init), range(pc.randomised_seeds)
    if pc.randomised_stages not in ([], ["all"]):  # named stages: exactly the files the priors stage names
        wanted = [random_prior_path(prefix, stage, seed, *scheme) for stage in pc.randomised_stages for seed in seeds]
        return sorted(str(p) for p in wanted if p.is_file())
    found = Path(prefix).parent.glob(f"{Path(prefix).name}-train-random-*.npy")  # `all`: the CNN's stages
    return sorted(str(p) for p in found if (name := parse_random_prior_path(str(p)))
                  and (name["order"], name["init"]) == scheme and name["seed"] in seeds)


def with_randomised(cfg: Config, train: MapData, ref: PriorFile) -> tuple[MapData, dict]:
    """Training data with randomised-copy records added so that they make up gan.randomised_share of it."""
    names = randomised_files(cfg)
    if not names:
        raise UserError(f"gan.randomised_share is {cfg.gan.randomised_share} but no randomised-copy prior files "
                        f"exist ({cfg.priors_prefix}-train-random-*.npy); make them with `python train.py --config "
                        f"{cfg.source_file or '<config>'} --stage priors --set \"priors.splits=[]\" --set "
                        f"\"priors.randomised_stages=[all]\"` or set gan.randomised")
    files = [read_priors(f) for f in names]
    for pf in files:
        check_agree(ref, pf)
    pool = MapData.from_files(files)
    share = cfg.gan.randomised_share
    want = round(share / (1.0 - share) * len(train))
    if want > len(pool):
        raise UserError(f"gan.randomised_share {share} needs {want} randomised-copy records but "
                        f"{', '.join(names)} hold {len(pool)}; lower the share or raise priors.randomised_limit")
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.gan.seed))[:want]
    picked = pool.take(pick)
    mixed = train.join(picked)
    info = {"share": share, "files": names, "count": want}
    if cfg.gan.sanity_weight > 0:
        refs = with_references(train, picked, ref, files, names)
        mixed = replace(mixed, refs=np.concatenate([np.full(len(train), -1, np.int64), refs]))
        info["paired"] = int((refs >= 0).sum())
    return mixed, info


def _cnn_sha(pf: PriorFile) -> str | None:
    return (pf.meta.get("cnn") or {}).get("checkpoint_sha256")


def with_references(train: MapData, picked: MapData, ref: PriorFile, files: list[PriorFile],
                    names: list[str]) -> np.ndarray:
    """For each randomised-copy sample of `picked`, the position (in `train`'s parts, which come first when the two
    are joined) of the trained CNN's training record of the same image (same dataset index); -1 where the training
    data lacks it. The randomised `files` must be copies of the training files' CNN (`ref`'s)."""
    for pf, name in zip(files, names, strict=True):
        if _cnn_sha(pf) != _cnn_sha(ref):
            raise UserError(f"{name}: gan.sanity_weight pairs randomised copies with the trained CNN's records, but "
                            f"this file's CNN ({(pf.meta.get('cnn') or {}).get('checkpoint')}) is not the training "
                            f"files' CNN ({(ref.meta.get('cnn') or {}).get('checkpoint')})")
    train_pos = train.positions()
    train_index = np.concatenate([np.asarray(p["index"]) for p in train.parts])[train_pos]
    first: dict[int, int] = {}
    for i, p in zip(train_index.tolist(), train_pos.tolist(), strict=True):
        first.setdefault(i, p)
    pool_index = np.concatenate([np.asarray(p["index"]) for p in picked.parts])[picked.positions()]
    refs = np.array([first.get(i, -1) for i in pool_index.tolist()], dtype=np.int64)
    if not (refs >= 0).any():
        raise UserError(f"gan.sanity_weight: none of the {len(refs)} randomised-copy samples has its image among the "
                        f"training records ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); make the "
                        f"randomised copies from the training images (priors.randomised_limit <= priors.train_limit)")
    return refs


def _val_file(cfg: Config, name: str) -> PriorFile:
    if not (Path(name).is_file() or manifest_path(name).is_file()):  # a file, or a prior set by its name
        raise UserError(f"{name}: validation prior file not found; make it with `python train.py --config "
                        f"{cfg.source_file or '<config>'} --stage priors --set \"priors.splits=[val]\"` (or set gan.val; "
                        f"never the test file: val picks the checkpoint and the baselines)")
    val = read_priors(name)
    if val.meta.get("split") == "test":
        raise UserError(f"{name}: gan.val is a test-split prior file; checkpoints and baselines are chosen on "
                        f"validation data only (use the -val.npy file of the priors stage)")
    return val


def trained_cnns(files: list[PriorFile]) -> list[dict]:
    """One entry per distinct CNN the training files came from (architecture, dataset, checkpoint, target)."""
    seen: dict[tuple, dict] = {}
    for pf in files:
        cnn = pf.meta.get("cnn") or {}
        entry = {"arch": cnn.get("arch"), "dataset": pf.meta.get("dataset"), "checkpoint": cnn.get("checkpoint"),
                 "target_layer": pf.meta.get("target_layer"), "files": []}
        key = (entry["arch"], entry["dataset"], entry["checkpoint"])
        seen.setdefault(key, entry)["files"].append(str(pf.path))
    return list(seen.values())


def _cnn_keys(pf: PriorFile) -> set[str]:
    cnn = pf.meta.get("cnn") or {}
    return {str(cnn.get("arch")), str(cnn.get("checkpoint"))}


def check_cnn_names(cfg: Config, files: list[PriorFile]) -> None:
    """Refuse a gan.leave_out / gan.only name that matches no CNN of the training files (a typo would silently
    keep every CNN)."""
    for name, wanted in (("gan.leave_out", cfg.gan.leave_out), ("gan.only", cfg.gan.only)):
        unknown = [w for w in wanted if not any(w in _cnn_keys(pf) for pf in files)]
        if unknown:
            seen = sorted({str((pf.meta.get("cnn") or {}).get("arch")) for pf in files})
            raise UserError(f"{name}: {unknown[0]!r} is no CNN of the gan.train files (their architectures: "
                            f"{', '.join(seen)}; a CNN checkpoint path also works)")


def picked_cnns(cfg: Config, named: list[tuple[str, PriorFile]], key: str) -> list[tuple[str, PriorFile]]:
    """(name, file) pairs without the files of the CNNs in gan.leave_out and, when gan.only is set, of the CNNs
    not in it."""
    kept = [(n, pf) for n, pf in named if not _cnn_keys(pf) & set(cfg.gan.leave_out)
            and (not cfg.gan.only or _cnn_keys(pf) & set(cfg.gan.only))]
    if not kept:
        raise UserError(f"gan.leave_out / gan.only leave no {key} file")
    return kept


def load_gan_data(cfg: Config) -> tuple[MapData, MapData, dict]:
    """Training data (all train files end to end, gan.train_per_file records of each), validation data (each val
    file capped at gan.val_limit), both streamed, and the priors meta."""
    train = [(f, read_priors(f)) for f in cfg.gan_train_files()]
    check_cnn_names(cfg, [pf for _, pf in train])
    names, files = map(list, zip(*picked_cnns(cfg, train, "gan.train"), strict=True))
    for pf in files[1:]:
        check_agree(files[0], pf)
    val_names, vals = map(list, zip(*picked_cnns(cfg, [(f, _val_file(cfg, f)) for f in cfg.gan_val_files()],
                                                 "gan.val / gan.val_more"), strict=True))
    for val in vals:
        check_agree(files[0], val)
    per = cfg.gan.train_per_file
    train_data = MapData.from_files(files) if not per else MapData.join_all(
        [MapData.from_files([pf], per) for pf in files])
    val_data = MapData.join_all([MapData.from_files([v], cfg.gan.val_limit) for v in vals])
    if len(train_data) == 0:
        raise UserError(f"{', '.join(names)}: no training samples")
    if len(val_data) == 0:
        raise UserError(f"{', '.join(val_names)}: no validation samples")
    meta = priors_meta(files[0], names)
    meta["cnns"] = trained_cnns(files)
    if cfg.gan.randomised_share > 0:
        cnns = {_cnn_sha(pf) for pf in files}
        if cfg.gan.sanity_weight > 0 and len(cnns) > 1:
            raise UserError(f"gan.sanity_weight pairs randomised copies with one trained CNN's records, but the "
                            f"training files come from {len(cnns)} CNNs "
                            f"({', '.join(names)}); train on one CNN's files (gan.only) or set gan.sanity_weight: 0")
        train_data, meta["randomised"] = with_randomised(cfg, train_data, files[0])
    # gan.priors: none is the image-only control (the generator never sees the CNN's priors); gan.image: none the
    # priors-only generator (the image never reaches it)
    use = {"use_priors": cfg.gan.priors != "none", "use_image": cfg.gan.image != "none"}
    train_data, val_data = replace(train_data, **use), replace(val_data, **use)
    meta["baselines"] = choose_streamed(vals[0], chosen_on=val_names[0]).as_dict()
    meta["val_file"] = val_names[0]
    if len(vals) > 1:
        meta["val_files"] = val_names
    return train_data, val_data, meta
