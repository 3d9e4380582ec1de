"""The generator contract and the registry of generators by name.

A generator is one subclass of `Generator`, registered under the name given where it is defined:

    class ToyGenerator(Generator, name="toy", adversarial=False):
        '''gan.depth: unused.'''

        def __init__(self, n_priors: int = 8) -> None:
            super().__init__()
            self.n_priors = n_priors
            self.mix = nn.Conv2d(n_priors + 3, 1, 1)

        @classmethod
        def from_config(cls, gan, n_priors):
            return cls(n_priors=n_priors)

        def config(self):
            return {"n_priors": self.n_priors}

        def forward(self, image, priors):
            return torch.sigmoid(self.mix(torch.cat([image, priors], 1)))

What a subclass implements:
    `__init__(**kwargs)`   explicit keyword arguments with defaults (no `**unused`); they describe the architecture.
    `from_config(gan, n_priors)`  classmethod: the model a run's `gan` config section (GANConfig) asks for, with
                           n_priors priors per sample; its docstring says what `gan.depth` (and gan.width,
                           gan.cond_*) mean for it.
    `config()`             the constructor arguments: `cls(**g.config())` rebuilds the architecture (checkpoints
                           store it as `generator_config`).
    `forward(image, priors)`  image (B, 3, S, S) and priors (B, n, S, S), both in [0, 1] -> map (B, 1, S, S) in
                           [0, 1].
Class keywords: `name` (the registry key: gan.variant, the checkpoint's `variant`, `cnnprior explain --variant`,
the evaluation's `explainers:` keys), `adversarial` (True: a GAN, trained with the discriminator's term; False: a
learned baseline, trained with the L1 term only whatever gan.adv_weight says, and scored as such in the
evaluation), `order` (place in listings and reports; lower first).

A module in cnnprior/gan/models/ is imported on the first lookup, so adding a generator there is one file; a class
defined anywhere else registers when its module is imported (the Python API path).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar

from torch import Tensor, nn

from cnnprior.core.config import GANConfig
from cnnprior.core.errors import UserError
from cnnprior.core.schema import suggest

__all__ = ["DEFAULT", "discover", "Generator", "get", "L1_SUFFIX", "names", "REGISTRY"]

DEFAULT = "lsft"  # the generator a run and `cnnprior explain` use when none is named
L1_SUFFIX = "_l1"  # `<gan>_l1`: a GAN's twin trained with the adversarial term off (evaluation keys)

REGISTRY: dict[str, type[Generator]] = {}
_discovered: list[bool] = []


class Generator(nn.Module):
    """Base of every generator: (image, priors) -> map. See the module docstring for the contract."""

    name: ClassVar[str] = ""
    variant: ClassVar[str] = ""  # = name: the checkpoint's `variant` entry
    adversarial: ClassVar[bool] = True
    order: ClassVar[int] = 100

    def __init_subclass__(cls, name: str = "", adversarial: bool | None = None, order: int | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if adversarial is not None:
            cls.adversarial = adversarial
        if order is not None:
            cls.order = order
        if name:
            cls.name = cls.variant = name
            _register(cls)

    @classmethod
    def from_config(cls, gan: GANConfig, n_priors: int) -> Generator:
        """The generator a run's gan config section asks for, with n_priors priors per sample."""
        raise NotImplementedError(f"{cls.__name__}.from_config")

    def config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild this generator."""
        raise NotImplementedError(f"{type(self).__name__}.config")

    def forward(self, image: Tensor, priors: Tensor) -> Tensor:
        """Image (B, 3, S, S) and priors (B, n, S, S), both in [0, 1] -> map (B, 1, S, S) in [0, 1]."""
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def check_priors(self, priors: Tensor) -> None:
        """Refuse priors that are not (B, n_priors, H, W) (for generators with an `n_priors` attribute)."""
        n = getattr(self, "n_priors", None)
        if priors.dim() != 4 or (n is not None and priors.shape[1] != n):
            raise ValueError(f"expected priors of shape (B, {n}, H, W), got {tuple(priors.shape)}")


def _register(cls: type[Generator]) -> None:
    """Add a named Generator subclass; a name taken by another class is an error (the same class again replaces
    itself, as when its module is imported anew)."""
    if cls.name.endswith(L1_SUFFIX):
        raise ValueError(f"{cls.__name__}: generator name {cls.name!r} must not end in {L1_SUFFIX!r} (the L1-only "
                         f"twins' evaluation keys)")
    old = REGISTRY.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"generator name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}")
    REGISTRY[cls.name] = cls


def discover() -> None:
    """Import every module of cnnprior/gan/models once, registering the generators defined there."""
    if _discovered:
        return
    _discovered.append(True)
    package = importlib.import_module(__name__.rsplit(".", 1)[0])
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def names(adversarial: bool | None = None) -> tuple[str, ...]:
    """Registered generator names in listing order; only the GANs (True) or the learned baselines (False)."""
    discover()
    ordered = sorted(REGISTRY.values(), key=lambda c: (c.order, c.name))
    return tuple(c.name for c in ordered if adversarial is None or c.adversarial == adversarial)


def get(name: str, key: str = "gan.variant") -> type[Generator]:
    """The generator class registered as `name`; a one-line UserError naming `key` and the known names."""
    discover()
    if name in REGISTRY:
        return REGISTRY[name]
    known = names()
    raise UserError(f"{key}: {name!r} is not a registered generator{suggest(str(name), known, listing=None)}; known: "
                    f"{', '.join(known)} (a generator defined outside cnnprior/gan/models registers when its module "
                    f"is imported)")
