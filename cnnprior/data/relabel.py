"""A split with some of its labels permuted: the training data of the data-randomisation test.

Adebayo et al. (2018), "Sanity checks for saliency maps", §5: a CNN of the same architecture trained on the same
images with permuted labels can only memorise them; an explanation method that reads the CNN must give maps
unlike those of the CNN trained on the true labels. `relabel` permutes the labels of a seeded share of the images
among themselves, so the class frequencies are kept.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

__all__ = ["permuted_labels", "Relabelled"]


def permuted_labels(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A copy of `labels` in which a seeded `share` of the positions have their labels permuted among themselves.

    Args:
        labels: (N,) integer labels.
        share: fraction in [0, 1] of the positions drawn for the permutation (1.0: all of them).
        seed: seed of the draw and of the permutation.

    Returns:
        (N,) labels with the same class counts; for share 1.0 on balanced classes about 1 - 1/C of them differ.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    labels = np.asarray(labels)
    out = labels.copy()
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(labels), size=int(round(share * len(labels))), replace=False))
    out[picked] = labels[picked][rng.permutation(len(picked))]
    return out


class Relabelled(Dataset):
    """A split view whose items carry other labels (`permuted_labels`); everything else is the view's own."""

    def __init__(self, view: Dataset, share: float, seed: int) -> None:
        self.view, self.share, self.seed = view, float(share), int(seed)
        self.labels = permuted_labels(view.labels, share, seed)
        self.class_names = view.class_names

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, i: int) -> dict:
        return dict(self.view[i], label=int(self.labels[i]))

    @property
    def changed(self) -> float:
        """Fraction of the items whose label differs from the true one."""
        return float((self.labels != np.asarray(self.view.labels)).mean()) if len(self.labels) else 0.0

    def describe(self) -> str:
        """The view's description plus what was permuted."""
        return (f"{self.view.describe()}; train labels permuted for {self.share:.0%} of the images (seed "
                f"{self.seed}; {self.changed:.0%} differ from the true label)")
