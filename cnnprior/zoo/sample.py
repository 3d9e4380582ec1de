"""Drawing the zoo's members: member i's descriptor is a function of the zoo config and i alone.

Member i belongs to family `zoo.families[i % len(families)]` (the families take turns, so they are equally
represented), and draws the rest from numpy's generator seeded with (zoo.seed, i): per-stage depth (blocks) from
`zoo.depth`, width (the dense family: growth rate) from `zoo.width` (`zoo.growth`), kernel size, normalisation,
activation, initialisation and optimiser from their lists, expansion ratio (mobile), learning rate (log-uniform in
the optimiser's range), weight decay (log-uniform) and the member's own seed (initial weights, batch order and
augmentation). A depth whose CNN leaves fewer CAM layers for the priors than `priors.n` + 1 (the paper's n
positions need n + 1 layers to be distinct) is drawn again from the same generator. Learning rate and weight
decay are rounded to 4 significant digits (the recorded value is the one trained with, the same on every
machine). Adding members changes no existing member; another family list changes which family an index gets.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from cnnprior.core.errors import UserError
from cnnprior.priors.extract import extractor_from
from cnnprior.priors.spec import PriorSpec
from cnnprior.zoo.families import build_member

__all__ = ["DRAWS", "member_id", "prior_pool", "sample_member", "sample_members"]

DRAWS = 100  # depth draws per member before the config is refused (its depth range is too shallow)
_PROBE_CLASSES = [str(i) for i in range(10)]


def member_id(index: int) -> str:
    """The member's name: m000, m001, ... (its folder and file prefix)."""
    return f"m{index:03d}"


@lru_cache(maxsize=512)
def prior_pool(family: str, depth: tuple[int, ...], expand: int, image_size: int) -> int:
    """How many CAM layers the prior rule leaves for the priors of such a member (its target's block and the
    target left out). Width, kernel, normalisation and activation change no count."""
    desc = {"family": family, "depth": list(depth), "width": 8, "kernel": 3, "norm": "batch",
            "activation": "relu", "init": "default", "seed": 0, "expand": expand}
    model = build_member(desc, _PROBE_CLASSES, image_size).eval()
    return len(extractor_from(model, PriorSpec(size=8, n=1)).average_order)


def _log_uniform(rng: np.random.Generator, lo_hi: list[float]) -> float:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    value = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
    return float(f"{value:.4g}")


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def sample_member(zc, index: int, n_priors: int, image_size: int) -> dict:
    """The descriptor of member `index` of the zoo config `zc` (a `zoo:` section)."""
    rng = np.random.default_rng([int(zc.seed), int(index)])
    family = zc.families[index % len(zc.families)]
    lo, hi = int(zc.depth[0]), int(zc.depth[1])
    width = int(_pick(rng, list(zc.growth if family == "dense" else zc.width)))
    kernel = int(_pick(rng, list(zc.kernel)))
    expand = int(_pick(rng, list(zc.expand))) if family == "mobile" else 1
    for _ in range(DRAWS):
        depth = [int(d) for d in rng.integers(lo, hi + 1, size=3)]
        if prior_pool(family, tuple(depth), expand, image_size) >= n_priors + 1:
            break
    else:
        raise UserError(f"zoo.depth {[lo, hi]}: member {member_id(index)} ({family}) found no depth leaving "
                        f"{n_priors + 1} CAM layers for priors.n={n_priors} in {DRAWS} draws; raise zoo.depth")
    optimizer = str(_pick(rng, list(zc.optimizers)))
    lr = _log_uniform(rng, zc.lr_sgd if optimizer == "sgd" else zc.lr_adam)
    desc = {
        "id": member_id(index), "index": int(index), "family": family, "depth": depth, "width": width,
        "kernel": kernel, "expand": expand, "norm": str(_pick(rng, list(zc.norms))),
        "activation": str(_pick(rng, list(zc.activations))), "init": str(_pick(rng, list(zc.inits))),
        "optimizer": optimizer, "lr": lr, "weight_decay": _log_uniform(rng, zc.weight_decay),
        "seed": int(rng.integers(0, 2**31 - 1)), "epochs": int(zc.epochs), "batch_size": int(zc.batch_size),
        "image_size": int(image_size),
    }
    return desc


def sample_members(zc, n_priors: int, image_size: int) -> list[dict]:
    """Every member's descriptor, in index order."""
    return [sample_member(zc, i, n_priors, image_size) for i in range(int(zc.members))]
