"""Trivial baselines a learned explainer must beat: one prior, the mean of the priors, the image intensity.

Which prior is "best" and whether the intensity is inverted are chosen once, on the *validation* prior file,
by the GAN stage (stored in the generator checkpoint); scoring code only applies that choice, so no baseline
is ever selected on the data it is scored on. Each baseline is also given min-max rescaled per map: Pearson r
does not change under rescaling, L1 and SSIM do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from cnnprior.maps.metrics import pearson
from cnnprior.maps.ops import rescale

__all__ = [
    "baseline_maps", "BaselineChoice", "BASELINES", "BaselineScores", "choose", "choose_streamed", "grayscale",
    "label"
]

BASELINES = ("best_prior", "mean_prior", "image")


def grayscale(image: Tensor) -> Tensor:
    """ITU-R 601 luma of (B, 3, S, S) RGB in [0, 1] -> (B, 1, S, S)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return (image * w).sum(1, keepdim=True)


@dataclass
class BaselineChoice:
    """What was chosen on validation data: the best single prior, the intensity sign, the best baseline."""

    best_prior: int
    image_inverted: bool
    best_baseline: str
    chosen_on: str
    val_r: dict

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> BaselineChoice | None:
        """The stored choice, or None for checkpoints written before baselines were chosen on validation."""
        if not d:
            return None
        return cls(int(d["best_prior"]), bool(d["image_inverted"]), str(d["best_baseline"]), str(d["chosen_on"]),
                   dict(d.get("val_r") or {}))


class BaselineScores:
    """Running sums of the validation Pearson r that `choose` compares, fed batch by batch: choosing on a
    validation set of any size keeps O(batch) memory (the GAN stage streams its validation prior file)."""

    def __init__(self) -> None:
        self.count = 0
        self.per_prior: Tensor | None = None
        self.sums = {"mean_prior": 0.0, "gray": 0.0, "inverted": 0.0}

    def add(self, image: Tensor, priors: Tensor, target: Tensor) -> None:
        """One batch: image (B,3,S,S), priors (B,n,S,S), target (B,1,S,S), floats in [0, 1]."""
        b, n = priors.shape[:2]
        t = target.expand(b, n, *target.shape[-2:]).reshape(b * n, *target.shape[-2:])
        per_prior = pearson(priors.reshape(b * n, *priors.shape[-2:]), t).view(b, n).double().sum(0)
        self.per_prior = per_prior if self.per_prior is None else self.per_prior + per_prior
        gray = grayscale(image)
        self.sums["mean_prior"] += pearson(priors.mean(1, keepdim=True), target).double().sum().item()
        self.sums["gray"] += pearson(gray, target).double().sum().item()
        self.sums["inverted"] += pearson(1.0 - gray, target).double().sum().item()
        self.count += b

    def choice(self, chosen_on: str) -> BaselineChoice:
        """The best single prior (mean r), the intensity sign and the best baseline over every batch added."""
        if self.per_prior is None:
            raise ValueError("BaselineScores.choice: no validation samples were added")
        means = self.per_prior / self.count
        per_prior = means.tolist()
        best = int(means.nan_to_num(-math.inf).argmax())  # a NaN r (not produced by pearson today) never wins
        r_gray, r_inv = self.sums["gray"] / self.count, self.sums["inverted"] / self.count
        val_r = {"best_prior": per_prior[best], "mean_prior": self.sums["mean_prior"] / self.count,
                 "image": max(r_gray, r_inv), "per_prior": per_prior}
        best_baseline = max(BASELINES, key=lambda k: val_r[k])
        return BaselineChoice(best, r_inv > r_gray, best_baseline, chosen_on, val_r)


def choose(image: Tensor, priors: Tensor, target: Tensor, chosen_on: str) -> BaselineChoice:
    """Choose the best single prior (mean Pearson r), the intensity sign and the best baseline on validation data
    held in memory (BaselineScores streams it).

    image (B,3,S,S), priors (B,n,S,S), target (B,1,S,S), floats in [0, 1].
    """
    scores = BaselineScores()
    scores.add(image, priors, target)
    return scores.choice(chosen_on)


def choose_streamed(pf, chosen_on: str, chunk: int = 64) -> BaselineChoice:
    """`choose` over a prior file or set (anything with len() and .tensors(slice)), `chunk` records at a time."""
    scores = BaselineScores()
    for start in range(0, len(pf), chunk):
        t = pf.tensors(slice(start, start + chunk))
        scores.add(t["image"], t["priors"], t["target"])
    return scores.choice(chosen_on)


def baseline_maps(image: Tensor, priors: Tensor, choice: BaselineChoice) -> dict[str, Tensor]:
    """The baselines' maps (B,1,S,S) under a validation choice, raw and `<name>_rescaled`."""
    gray = grayscale(image)
    raw = {"best_prior": priors[:, choice.best_prior:choice.best_prior + 1],
           "mean_prior": priors.mean(1, keepdim=True),
           "image": 1.0 - gray if choice.image_inverted else gray}
    return {**raw, **{f"{k}_rescaled": rescale(v) for k, v in raw.items()}}


def label(name: str, choice: BaselineChoice) -> str:
    """A table label for a baseline name, with what was chosen on validation."""
    base = name.removesuffix("_rescaled")
    text = {"best_prior": f"best single prior (C{choice.best_prior}, val)", "mean_prior": "mean of the priors",
            "image": "image intensity" + (" (inverted, val)" if choice.image_inverted else " (val)")}[base]
    return text + (", rescaled" if name.endswith("_rescaled") else "")
