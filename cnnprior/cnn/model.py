"""The target CNN as a model: build any torchvision classifier with its input normalisation built in, save and load
its checkpoint (no training code: the classifier stage is `cnn.train`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import get_model, get_model_weights

from cnnprior.core.config import ARCHS
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import atomic_torch_save, load_checkpoint

__all__ = [
    "build_cnn", "CNN_FORMAT", "IMAGENET_MEAN", "IMAGENET_STD", "load_cnn", "save_cnn", "set_bn_momentum", "TargetCNN"
]

CNN_FORMAT = "cnnprior-cnn/1"


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


class TargetCNN(nn.Module):
    """A torchvision classifier with its input normalisation built in: takes RGB in [0, 1]."""

    def __init__(self, net: nn.Module, arch: str, class_names: list[str], image_size: int,
                 mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
        super().__init__()
        self.net = net
        self.arch, self.class_names, self.image_size = arch, list(class_names), image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.net((x - self.mean) / self.std)


def _weights_in_cache(arch: str):
    """The DEFAULT torchvision weights of `arch` if their file is already in the torch hub cache."""
    weights = get_model_weights(arch).DEFAULT
    fname = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not cached.is_file():
        raise UserError(f"cnn.pretrained: torchvision weights for {arch} are not in the local cache ({cached}). "
                        f"On a machine with internet run: python -c \"import torchvision; "
                        f"torchvision.models.get_model('{arch}', weights='DEFAULT')\" and copy the file there, "
                        f"or set cnn.pretrained: false")
    return weights


def _replace_head(net: nn.Module, num_classes: int) -> None:
    """Swap the final Linear layer of a torchvision classifier for one with `num_classes` outputs."""
    for name in ("fc", "classifier", "heads"):
        head = getattr(net, name, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(net, name, nn.Linear(head.in_features, num_classes))
            return
        if isinstance(head, nn.Sequential):
            for i in range(len(head) - 1, -1, -1):
                if isinstance(head[i], nn.Linear):
                    head[i] = nn.Linear(head[i].in_features, num_classes)
                    return
    raise UserError(f"cannot find the classification head of {type(net).__name__}")  # pragma: no cover


def build_cnn(arch: str, class_names: list[str], image_size: int, pretrained: bool = False) -> TargetCNN:
    """A torchvision classifier by name with len(class_names) outputs (pretrained only from the local cache)."""
    if arch not in ARCHS:
        raise UserError(f"cnn.arch: unknown architecture {arch!r} (supported: {', '.join(ARCHS)})")
    if arch == "inception_v3" and image_size < 75:
        raise UserError("cnn.arch inception_v3 needs data.image_size >= 75")
    extra = {"aux_logits": False, "init_weights": True} if arch == "inception_v3" else {}
    if pretrained:
        weights = _weights_in_cache(arch)
        if arch == "inception_v3":
            extra = {"aux_logits": True}  # the weight file holds the aux head; dropped below
        net = get_model(arch, weights=weights, **extra)
        if arch == "inception_v3":
            net.aux_logits, net.AuxLogits = False, None
        _replace_head(net, len(class_names))
    else:
        net = get_model(arch, weights=None, num_classes=len(class_names), **extra)
    return TargetCNN(net, arch, class_names, image_size)


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set every batch norm's running-statistics momentum (returns how many). torchvision's MobileNet-V3 uses
    0.01, tuned for long ImageNet schedules: after a few hundred steps from scratch their running
    statistics still hold the initial values, and eval-mode accuracy is at chance while train accuracy is not."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = momentum
    return len(norms)


def save_cnn(model: TargetCNN, path: str | Path, *, val_accuracy: float | None, epoch: int, config: dict,
             dataset: str, history: list | None = None, half: bool = False, extra: dict | None = None) -> Path:
    """Atomically write weights + arch + class names + input size + normalisation + accuracy.

    `half` stores the conv/linear weights (floating tensors of >= 2 dims) as float16; normalisation statistics
    stay float32. Loading casts back to float32. `val_accuracy` is None when unknown (an imported CNN); `extra`
    adds entries (e.g. where an imported CNN came from).
    """
    state = {k: v.detach().cpu() for k, v in model.net.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() and v.dim() >= 2 else v for k, v in state.items()}
    return atomic_torch_save({
        "format": CNN_FORMAT, "arch": model.arch, "class_names": list(model.class_names),
        "image_size": model.image_size, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
        "state_dict": state, "weights_dtype": "float16" if half else "float32",
        "val_accuracy": None if val_accuracy is None else float(val_accuracy), "epoch": int(epoch),
        "dataset": dataset, "config": config, "history": history or [], **(extra or {}),
    }, path)


def load_cnn(path: str | Path, device: str | torch.device = "cpu") -> tuple[TargetCNN, dict]:
    """Load a CNN checkpoint (weights_only=True) -> (model in eval mode, checkpoint metadata)."""
    ckpt = load_checkpoint(path, "CNN")
    if ckpt.get("format") != CNN_FORMAT:
        raise UserError(f"{path}: expected a CNN checkpoint ({CNN_FORMAT}), found {ckpt.get('format')!r}")
    model = build_cnn(ckpt["arch"], ckpt["class_names"], ckpt["image_size"])
    model.mean.copy_(torch.tensor(ckpt["mean"]).view(1, 3, 1, 1))
    model.std.copy_(torch.tensor(ckpt["std"]).view(1, 3, 1, 1))
    try:
        model.net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit arch {ckpt['arch']!r} ({str(exc).splitlines()[0]})") from None
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.to(device).eval(), meta
