"""Generator checkpoints: the format, exporting the generator-only file and loading it for inference (no training
code: inference and evaluation import this, not the training loop)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from cnnprior.core import generators
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import atomic_torch_save, load_checkpoint, resolve_device

__all__ = [
    "ARCH_KEYS", "check_format", "export_generator", "GAN_FORMAT", "INPUT_KEYS", "load_generator",
    "MaskedInputGenerator", "SCHEMA_KEYS", "STATE_KEYS"
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


def check_format(ckpt: dict, path: Path | str) -> None:
    if ckpt.get("format") != GAN_FORMAT:
        raise UserError(f"{path}: not a GAN checkpoint (format {ckpt.get('format')!r}, expected {GAN_FORMAT!r})")


def load_generator(path: str | Path, expect_variant: str | None = None,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a GAN checkpoint's generator -> (model in eval mode, checkpoint meta without state dicts)."""
    ckpt = load_checkpoint(path, "GAN")
    check_format(ckpt, path)
    variant = ckpt.get("variant")
    if variant not in generators.VARIANTS:
        raise UserError(f"{path}: unknown generator variant {variant!r} (known: {', '.join(generators.ALL)})")
    if expect_variant is not None and variant != expect_variant:
        if variant in generators.BASELINES:
            raise UserError(f"{path} is a learned-baseline ({variant}) checkpoint, not a GAN; score it beside a GAN "
                            f"checkpoint with --learned {path}")
        raise UserError(f"{path} is a {variant} checkpoint; use {variant}_inference.py")
    try:
        model = generators.VARIANTS[variant].generator_class()(**ckpt["generator_config"])
        model.load_state_dict(ckpt["generator"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: generator weights do not fit the {variant} model ({first[:160]})") from None
    meta = {k: v for k, v in ckpt.items() if k not in STATE_KEYS}
    meta["path"] = str(path)
    dev = resolve_device(device) if isinstance(device, str) else device
    saved = (ckpt.get("config") or {}).get("gan") or {}
    if saved.get("priors") == "none" or saved.get("image") == "none":
        # trained without priors (image-only control) or without the image (priors-only): never given them
        model = MaskedInputGenerator(model, image=saved.get("image") != "none", priors=saved.get("priors") != "none")
    return model.to(dev).eval(), meta


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
