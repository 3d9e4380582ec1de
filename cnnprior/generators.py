"""Generator variants by name: the one table the config's choices, building, loading, inference and evaluation read.

A variant is a generator class in `cnnprior/models/<name>.py` (imported only when built, so this table imports
no torch) and the constructor argument that `gan.depth` sets. To add a variant, write its class there and add
one `Variant` here (and, to evaluate it, a checkpoint key of that name in `config.EvalConfig`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One generator variant: its name (= its module in cnnprior/models/), class name and depth argument."""

    name: str
    class_name: str
    depth_arg: str  # the constructor argument that gan.depth sets

    def generator_class(self) -> type:
        """The generator class (imports cnnprior.models.<name>)."""
        return getattr(importlib.import_module(f"cnnprior.models.{self.name}"), self.class_name)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("lsft", "LSFTGenerator", "n_plain"),  # one condition per prior, SFT blocks between plain blocks
    Variant("gsft", "GSFTGenerator", "n_blocks"),  # one condition from all priors, shared by every SFT block
)}
NAMES = tuple(VARIANTS)
DEFAULT = NAMES[0]
