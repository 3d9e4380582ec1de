"""The GAN stage's data: prior files as compact uint8 tensors, training/validation files, randomised-copy mixing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cnnprior.baselines import choose
from cnnprior.config import Config
from cnnprior.errors import UserError
from cnnprior.priorfile import PriorFile, read_priors

# Prior files trained on together must agree on these sidecar keys.
AGREE_KEYS = ("size", "n", "order", "target", "method")


@dataclass
class MapData:
    """Samples as compact uint8 tensors: image (N,3,S,S), priors (N,n,S,S), target (N,1,S,S)."""

    image: Tensor
    priors: Tensor
    target: Tensor

    def __len__(self) -> int:
        return self.image.shape[0]

    @classmethod
    def from_files(cls, files: list[PriorFile], limit: int = 0) -> MapData:
        """Concatenate prior files (the first `limit` records in all when limit > 0)."""
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        left = limit or None
        for pf in files:
            rec = pf.records if left is None else pf.records[:left]
            parts.append((torch.from_numpy(np.ascontiguousarray(rec["image"])).permute(0, 3, 1, 2).contiguous(),
                          torch.from_numpy(np.ascontiguousarray(rec["priors"])),
                          torch.from_numpy(np.ascontiguousarray(rec["target"])).unsqueeze(1)))
            if left is not None:
                left -= len(rec)
                if left <= 0:
                    break
        return cls(*(torch.cat(t) for t in zip(*parts, strict=True)))

    def batch(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Float tensors in [0, 1] (as PriorFile.tensors gives them) for samples `idx`, on `device`."""
        return tuple(t[idx].to(device, non_blocking=True).float() / 255.0  # type: ignore[return-value]
                     for t in (self.image, self.priors, self.target))


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
    """The randomised-copy prior files for gan.randomised_share: gan.randomised, or all the priors stage wrote."""
    if cfg.gan.randomised:
        return list(cfg.gan.randomised)
    prefix = Path(cfg.priors_prefix)
    return sorted(str(p) for p in prefix.parent.glob(f"{prefix.name}-train-random-*.npy"))


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
    mixed = MapData(*(torch.cat([a, b[pick]]) for a, b in zip((train.image, train.priors, train.target),
                                                              (pool.image, pool.priors, pool.target), strict=True)))
    return mixed, {"share": share, "files": names, "count": want}


def load_gan_data(cfg: Config) -> tuple[MapData, MapData, dict]:
    """Training data (all train files, concatenated), validation data (capped) and the priors meta."""
    names = cfg.gan_train_files()
    files = [read_priors(f) for f in names]
    for pf in files[1:]:
        check_agree(files[0], pf)
    val_name = cfg.gan_val_file()
    if not Path(val_name).is_file():
        raise UserError(f"{val_name}: validation prior file not found; make it with `python train.py --config "
                        f"{cfg.source_file or '<config>'} --stage priors --set \"priors.splits=[val]\"` (or set gan.val; "
                        f"never the test file: val picks the checkpoint and the baselines)")
    val = read_priors(val_name)
    check_agree(files[0], val)
    if val.meta.get("split") == "test":
        raise UserError(f"{val_name}: gan.val is a test-split prior file; checkpoints and baselines are chosen on "
                        f"validation data only (use the -val.npy file of the priors stage)")
    train_data, val_data = MapData.from_files(files), MapData.from_files([val], cfg.gan.val_limit)
    if len(train_data) == 0:
        raise UserError(f"{', '.join(names)}: no training samples")
    if len(val_data) == 0:
        raise UserError(f"{val_name}: no validation samples")
    meta = priors_meta(files[0], names)
    if cfg.gan.randomised_share > 0:
        train_data, meta["randomised"] = with_randomised(cfg, train_data, files[0])
    if cfg.gan.priors == "none":  # the image-only control: the generator never sees the CNN's priors
        train_data.priors.zero_()
        val_data.priors.zero_()
    if cfg.gan.image == "none":  # the priors-only generator: the image never reaches it
        train_data.image.zero_()
        val_data.image.zero_()
    t = val.tensors()
    meta["baselines"] = choose(t["image"], t["priors"], t["target"], chosen_on=val_name).as_dict()
    meta["val_file"] = val_name
    return train_data, val_data, meta
