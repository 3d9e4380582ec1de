"""Generator variants by name: the one table the config's choices, building, loading, inference and evaluation read.

A variant is a model class in `cnnprior/gan/models/<name>.py` (imported only when built, so this table imports
no torch), the constructor argument that `gan.depth` sets and whether it is trained adversarially. The GANs
(`lsft`, `gsft`) are the paper's generators; the learned baselines (`linear`, `convnet`) are small regressors
trained by the same loop on the same data with the L1 term only, the comparison a learned explainer must win.
To add a variant, write its class there and add one `Variant` here (the evaluation gets a checkpoint key of
its name).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["ALL", "BASELINES", "DEFAULT", "NAMES", "Variant", "VARIANTS"]


@dataclass(frozen=True)
class Variant:
    """One generator variant: its name (= its module in cnnprior/gan/models/), class name, depth argument and
    whether it is a GAN (adversarial term on) or a learned baseline (L1 only, whatever gan.adv_weight says)."""

    name: str
    class_name: str
    depth_arg: str  # the constructor argument that gan.depth sets
    adversarial: bool = True

    def generator_class(self) -> type:
        """The generator class (imports cnnprior.gan.models.<name>)."""
        return getattr(importlib.import_module(f"cnnprior.gan.models.{self.name}"), self.class_name)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("lsft", "LSFTGenerator", "n_plain"),  # one condition per prior, SFT blocks between plain blocks
    Variant("gsft", "GSFTGenerator", "n_blocks"),  # one condition from all priors, shared by every SFT block
    Variant("linear", "LinearBaseline", "depth", adversarial=False),  # per-pixel affine mix of the inputs
    Variant("convnet", "ConvRegressor", "depth", adversarial=False),  # gan.depth 5x5 convs of gan.width
)}
ALL = tuple(VARIANTS)
NAMES = tuple(v.name for v in VARIANTS.values() if v.adversarial)  # the GANs: lsft_inference.py, gsft_inference.py
BASELINES = tuple(v.name for v in VARIANTS.values() if not v.adversarial)  # the learned baselines
DEFAULT = NAMES[0]
