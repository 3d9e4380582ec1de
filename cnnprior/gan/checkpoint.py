"""Generator checkpoints: the format, its metadata read in one place (`GeneratorMeta`), exporting the
generator-only file and loading it for inference (no training code: inference and evaluation import this, not the
training loop)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnprior.core.budget import Budget
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import atomic_torch_save, load_checkpoint, resolve_device
from cnnprior.gan.models.base import get as get_generator

__all__ = [
    "ARCH_KEYS", "check_format", "export_generator", "GAN_FORMAT", "GeneratorMeta", "INPUT_KEYS", "load_generator",
    "MaskedInputGenerator", "PAPER_SCRIPTS", "SCHEMA_KEYS", "STATE_KEYS"
]

GAN_FORMAT = "cnnprior-gan/1"


# Config keys that shape the networks: a resumed run must keep them.
ARCH_KEYS = ("variant", "width", "depth", "cond_channels", "cond_hidden", "disc_width", "disc_layers")


SCHEMA_KEYS = frozenset({"format", "variant", "generator_config", "generator", "discriminator_config",
                         "discriminator", "optim_g", "optim_d", "epoch", "step", "batch_in_epoch", "rng",
                         "data_order", "epoch_sums", "config", "priors_meta", "metrics", "history"})


# Which inputs a generator is given (gan.priors / gan.image) and their defaults in older checkpoints.
INPUT_KEYS = {"priors": "cnn", "image": "use"}


def export_generator(src: str | Path, dst: str | Path, history: list | None = None) -> Path:
    """Write the generator-only part of a checkpoint (what inference needs; no D, optimisers or RNG states)."""
    ckpt = load_checkpoint(src, "GAN")
    check_format(ckpt, src)
    out = {k: v for k, v in ckpt.items() if k not in STATE_KEYS or k == "generator"}
    out["exported_from"] = str(src)
    if history is not None:
        out["history"] = history  # the whole run's curve, not only up to the best epoch
    return atomic_torch_save(out, dst)


def check_format(ckpt: Mapping, path: Path | str) -> None:
    """Refuse a file that is not a GAN checkpoint of this format version (one line)."""
    fmt = ckpt.get("format")
    if isinstance(fmt, str) and fmt.startswith(GAN_FORMAT.split("/")[0] + "/") and fmt != GAN_FORMAT:
        raise UserError(f"{path}: a GAN checkpoint of another cnnprior version (format {fmt!r}; this version reads "
                        f"{GAN_FORMAT!r})")
    if fmt != GAN_FORMAT:
        raise UserError(f"{path}: not a GAN checkpoint (format {fmt!r}, expected {GAN_FORMAT!r})")


@dataclass(frozen=True)
class GeneratorMeta(Mapping):
    """What a generator checkpoint says about itself, parsed once (`parse`): typed fields for what inference and
    evaluation read, and read-only mapping access (`meta["epoch"]`) to every stored entry but the weights and the
    training state.

    Attributes:
        path: the file it was read from ('' when parsed from a dict).
        variant: the registered generator name.
        generator_config: the generator's constructor arguments.
        gan: the `gan` section of the run config it was trained with ({} when not recorded).
        priors_meta: the training priors' description (size S, n, method, target, layers, files...).
        metrics: the validation scores of the kept epoch ({} when not recorded).
        epoch, step: the kept epoch and step.
        history: the per-epoch curve.
        entries: every non-state entry, as stored.
        budget: what training had spent when it was saved (samples, steps, wall seconds, threads, precision,
            training FLOPs; core/budget.py); None for a checkpoint of an earlier version.
        size, n: the map size S and the priors per sample it was trained on.
    """

    path: str
    variant: str
    generator_config: dict
    gan: dict
    priors_meta: dict
    metrics: dict
    epoch: int | None
    step: int
    history: list
    entries: dict = field(repr=False)
    budget: Budget | None = None
    size: int = 0  # the map size S it was trained on (priors_meta["size"])
    n: int = 0  # the priors per sample it was trained on (priors_meta["n"])

    @classmethod
    def parse(cls, ckpt: Mapping, path: Path | str = "") -> GeneratorMeta:
        """Read a checkpoint dict (or the metadata `load_generator` returned); a file of another format or an older
        version is one UserError line."""
        where = str(path or ckpt.get("path") or "generator checkpoint")
        check_format(ckpt, where)
        config = ckpt.get("config")
        pm = ckpt.get("priors_meta")
        problems = [f"no {k!r}" for k, kind in (("variant", str), ("generator_config", Mapping))
                    if not isinstance(ckpt.get(k), kind) or k == "variant" and not ckpt[k]]
        if not isinstance(pm, Mapping) or "size" not in pm or "n" not in pm:
            problems.append("no priors_meta size/n")
        if problems:
            raise UserError(f"{where}: a generator checkpoint of an older or unknown version ({', '.join(problems)});"
                            f" re-save it with this version of train.py")
        entries = {k: v for k, v in ckpt.items() if k not in STATE_KEYS}
        if path:
            entries["path"] = str(path)
        epoch = ckpt.get("epoch")
        gan = config.get("gan") if isinstance(config, Mapping) else None
        # the typed fields are the stored objects themselves (not copies): meta["priors_meta"] is meta.priors_meta
        return cls(path=str(entries.get("path", "")), variant=str(ckpt["variant"]),
                   generator_config=ckpt["generator_config"], gan=gan if isinstance(gan, dict) else {},
                   priors_meta=pm, metrics=ckpt.get("metrics") or {},
                   epoch=None if epoch is None else int(epoch), step=int(ckpt.get("step") or 0),
                   history=ckpt.get("history") or [], entries=entries, budget=Budget.from_dict(ckpt.get("budget")),
                   size=int(pm["size"]), n=int(pm["n"]))


    @property
    def val_r(self) -> float:
        """The validation r recorded for the kept epoch (its selection score), NaN when absent."""
        return float(self.metrics.get("r", float("nan")))

    @property
    def adv_weight(self) -> float:
        """gan.adv_weight it was trained with (1.0 when not recorded)."""
        return float(self.gan.get("adv_weight", 1.0))

    @property
    def inputs(self) -> tuple[str, str]:
        """(gan.image, gan.priors) it was trained with: the information it is given."""
        return self.gan.get("image", INPUT_KEYS["image"]), self.gan.get("priors", INPUT_KEYS["priors"])

    def __getitem__(self, key: str) -> Any:
        return self.entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def load_generator(path: str | Path, expect_variant: str | None = None,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, GeneratorMeta]:
    """Load a GAN checkpoint's generator -> (model in eval mode, its `GeneratorMeta`)."""
    ckpt = load_checkpoint(path, "GAN")
    meta = GeneratorMeta.parse(ckpt, path)
    cls = get_generator(meta.variant, f"{path}: variant")
    variant = meta.variant
    if expect_variant is not None and variant != expect_variant:
        if not cls.adversarial and get_generator(expect_variant, "variant").adversarial:
            raise UserError(f"{path} is a learned-baseline ({variant}) checkpoint, not a GAN; score it beside a GAN "
                            f"checkpoint with --learned {path}")
        raise UserError(f"{path} is a {variant} checkpoint; use {_command(variant)}")
    try:
        model = cls(**meta.generator_config)
        model.load_state_dict(ckpt["generator"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: generator weights do not fit the {variant} model ({first[:160]})") from None
    dev = resolve_device(device) if isinstance(device, str) else device
    image, priors = meta.inputs
    if priors == "none" or image == "none":
        # trained without priors (image-only control) or without the image (priors-only): never given them
        model = MaskedInputGenerator(model, image=image != "none", priors=priors != "none")
    return model.to(dev).eval(), meta


def _command(variant: str) -> str:
    """The command that runs a generator of `variant`: the paper's scripts for lsft / gsft."""
    return f"{variant}_inference.py" if variant in PAPER_SCRIPTS else f"cnnprior explain --variant {variant}"


# the generators with a top-level script of their own (the paper's names)
PAPER_SCRIPTS = ("lsft", "gsft")


class MaskedInputGenerator(nn.Module):
    """A generator trained with `gan.priors: none` or `gan.image: none`: called as G(image, priors), it is given
    zeros for the input it was trained without."""

    def __init__(self, generator: nn.Module, image: bool = True, priors: bool = True) -> None:
        super().__init__()
        self.generator, self.use_image, self.use_priors = generator, image, priors

    def forward(self, image: Tensor, priors: Tensor) -> Tensor:
        return self.generator(image if self.use_image else torch.zeros_like(image),
                              priors if self.use_priors else torch.zeros_like(priors))


# Checkpoint entries that are training state, not description (left out of load_generator's meta).
STATE_KEYS = ("generator", "discriminator", "optim_g", "optim_d", "rng", "data_order", "epoch_sums")
