"""How priors are formed from per-layer maps: `PriorSpec` (recorded in every sidecar), the paper's prior positions,
and the spec of a `priors:` config section or of a prior file's sidecar."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from cnnprior.core.errors import UserError
from cnnprior.priors import cams

__all__ = ["position_indices", "PriorSpec", "spec_from_config", "spec_from_sidecar", "TARGET_ALIASES", "TARGETS"]

TARGETS = ("final", "last_conv", "first")
TARGET_ALIASES = {"last": "last_conv"}  # `last` in files and configs written before `final` existed
SPEC_KEYS = ("size", "n", "method", "order", "target", "include_target_layer", "explain", "exclude", "target_layer")


def position_indices(n: int, last: int) -> list[int]:
    """The paper's picks: ceil(ceil(100/(n-1)·i) · l/100), i = 0..n-1, l = index of the last map (exact math)."""
    if last < 0:
        raise ValueError("no maps to pick from")
    if n == 1:
        return [last]
    return [math.ceil(Fraction(math.ceil(Fraction(100, n - 1) * i)) * last / 100) for i in range(n)]


@dataclass
class PriorSpec:
    """How priors and the target are formed from per-layer maps (recorded in every sidecar).

    `method` names a CAM method of `cams` (checked by the extractor: a prior file imported from elsewhere may
    carry a method no extractor computes)."""

    size: int = 64
    n: int = 8
    method: str = cams.DEFAULT
    order: str = "output_to_input"
    target: str = "final"
    include_target_layer: bool = False
    explain: str = "predicted"
    exclude: list = field(default_factory=list)
    layer_outputs: str = "activated"
    target_layer: str = ""

    def __post_init__(self) -> None:
        self.target = TARGET_ALIASES.get(self.target, self.target)
        if self.target not in TARGETS:
            raise UserError(f"priors.target: {self.target!r} is not one of {', '.join(TARGETS)}")
        self.exclude = list(self.exclude or [])

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, list) else v for k, v in self.__dict__.items()}


def spec_from_config(pc) -> PriorSpec:
    """PriorSpec from a `priors:` config section."""
    return PriorSpec(pc.size, pc.n, pc.method, pc.order, pc.target, pc.include_target_layer, pc.explain,
                     list(pc.exclude), pc.layer_outputs, pc.target_layer)


def spec_from_sidecar(pm: dict, **changes) -> PriorSpec:
    """The PriorSpec a prior file was written with (files without the newer keys: their old meaning)."""
    keys = {f: pm[f] for f in SPEC_KEYS if f in pm}
    keys.setdefault("target", "last_conv")
    keys["layer_outputs"] = pm.get("layer_outputs", "raw")  # files from before activated outputs
    if TARGET_ALIASES.get(keys["target"], keys["target"]) != "final":
        keys["target_layer"] = ""
    return PriorSpec(**{**keys, **changes})
