"""The target CNN: build any torchvision classifier, train it, save/load checkpoints, list its conv layers."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cnnprior.config import ARCHS, Config, to_dict
from cnnprior.data import load_split
from cnnprior.errors import UserError
from cnnprior.runtime import atomic_torch_save, load_checkpoint, resolve_device, seed_everything

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
    from torchvision.models import get_model_weights

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
    from torchvision.models import get_model

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


def _leaf_calls(model: nn.Module, image_size: int | None) -> list[tuple[nn.Module, int, int]]:
    """(module, id of its first input, id of its output) for every leaf-module call (and every nn.Conv2d) of
    one eval-mode forward of a zero image, in execution order."""
    size = image_size or getattr(model, "image_size", 64)
    calls: list[tuple[nn.Module, int, int]] = []

    def hook(mod, inputs, output):
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        calls.append((mod, id(first) if first is not None else 0, id(output)))

    traced = [m for m in model.modules() if isinstance(m, nn.Conv2d) or not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in traced]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def _convs_in_order(model: nn.Module, calls: list[tuple[nn.Module, int, int]]) -> list[tuple[str, nn.Conv2d]]:
    names = {m: n for n, m in model.named_modules()}
    first = dict.fromkeys(m for m, _, _ in calls if isinstance(m, nn.Conv2d))  # first call's order
    return [(names[m], m) for m in first]


def conv_layers(model: nn.Module, image_size: int | None = None) -> list[tuple[str, nn.Conv2d]]:
    """Every nn.Conv2d in forward-execution order, by qualified name (layers never run are left out)."""
    return _convs_in_order(model, _leaf_calls(model, image_size))


def cam_layers(model: nn.Module, image_size: int | None = None) -> list[tuple[str, nn.Module]]:
    """The layers whose outputs the CAMs use: every conv layer in forward-execution order, except that a conv
    whose output goes straight into a ReLU module (plain VGG: conv -> ReLU, no batch norm) is represented by
    that ReLU, if the ReLU runs once per forward.

    Grad-CAM on such a conv's raw output sums mostly negative pre-activations: on a VGG-11 trained on
    Fashion-MNIST 90 % of the last conv's outputs are negative and its Grad-CAM is zero on every image, while
    on the ReLU's output (grad-cam's usual VGG target, `features[-1]`-style) it is a proper map. Convs
    followed by batch norm (ResNet, DenseNet, MobileNet, VGG-*_bn, ...) are unchanged.
    """
    calls = _leaf_calls(model, image_size)
    count: dict[nn.Module, int] = {}
    for mod, _, _ in calls:
        count[mod] = count.get(mod, 0) + 1
    follow: dict[nn.Module, nn.Module] = {}
    for (mod, _, out), (nxt, nxt_in, _) in zip(calls, calls[1:], strict=False):
        if isinstance(mod, nn.Conv2d) and mod not in follow and isinstance(nxt, nn.ReLU) and nxt_in == out \
                and count[nxt] == 1:
            follow[mod] = nxt
    names = {m: n for n, m in model.named_modules()}
    return [(names[follow[m]], follow[m]) if m in follow else (n, m) for n, m in _convs_in_order(model, calls)]


def save_cnn(model: TargetCNN, path: str | Path, *, val_accuracy: float, epoch: int, config: dict,
             dataset: str, history: list | None = None, half: bool = False) -> Path:
    """Atomically write weights + arch + class names + input size + normalisation + accuracy.

    `half` stores the conv/linear weights (floating tensors of >= 2 dims) as float16; normalisation statistics
    stay float32. Loading casts back to float32.
    """
    state = {k: v.detach().cpu() for k, v in model.net.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() and v.dim() >= 2 else v for k, v in state.items()}
    return atomic_torch_save({
        "format": CNN_FORMAT, "arch": model.arch, "class_names": list(model.class_names),
        "image_size": model.image_size, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
        "state_dict": state, "weights_dtype": "float16" if half else "float32",
        "val_accuracy": float(val_accuracy), "epoch": int(epoch), "dataset": dataset, "config": config,
        "history": history or [],
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


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip + random translation by up to 1/16 of the size (reflect padding), batched."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)
    pad = max(1, h // 16)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return xp[:, :, dy:dy + h, dx:dx + w]


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "val") -> float:
    """Top-1 accuracy of `model` over a loader of {image, label} batches."""
    model.eval()
    correct = total = 0
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        logits = model(batch["image"].to(device, non_blocking=True))
        correct += (logits.argmax(1).cpu() == batch["label"]).sum().item()
        total += len(batch["label"])
    return correct / max(total, 1)


def train_cnn(cfg: Config, log=print) -> dict:
    """The classifier stage: train (or fine-tune) the target CNN; keep the best-validation checkpoint."""
    seed_everything(cfg.data.seed)
    device = resolve_device(cfg.cnn.device)
    train_set, val_set = load_split(cfg.data, "train"), load_split(cfg.data, "val")
    if len(train_set) == 0 or len(val_set) == 0:
        raise UserError(f"{cfg.source_file or 'config'}: data gives {len(train_set)} train / {len(val_set)} val "
                        f"images; raise data.limit or data.val_fraction")
    model = build_cnn(cfg.cnn.arch, train_set.class_names, cfg.data.image_size, cfg.cnn.pretrained).to(device)
    model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(cfg.data.seed)
    kw = dict(batch_size=cfg.cnn.batch_size, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
              persistent_workers=cfg.data.num_workers > 0)
    train_loader = DataLoader(train_set, shuffle=True, drop_last=len(train_set) > cfg.cnn.batch_size,
                              generator=gen, **kw)
    val_loader = DataLoader(val_set, shuffle=False, **kw)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.cnn.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.cnn.lr, momentum=0.9, weight_decay=cfg.cnn.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.cnn.lr, weight_decay=cfg.cnn.weight_decay)
    steps = max(1, cfg.cnn.epochs * len(train_loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    path = Path(cfg.cnn_checkpoint)
    log(f"classifier: {cfg.cnn.arch} on {cfg.data.source} ({len(train_set)} train / {len(val_set)} val, "
        f"{len(train_set.class_names)} classes, {cfg.data.image_size}px) on {device}")
    best, history, t0 = -1.0, [], time.time()
    for epoch in range(1, cfg.cnn.epochs + 1):
        model.train()
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.cnn.epochs}", dynamic_ncols=True)
        run_loss = run_acc = 0.0
        for i, batch in enumerate(bar):
            x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = batch["label"].to(device, non_blocking=True)
            if cfg.cnn.augment:
                x = _augment(x, gen)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss = 0.9 * run_loss + 0.1 * loss.item() if i else loss.item()
            run_acc = 0.9 * run_acc + 0.1 * (logits.argmax(1) == y).float().mean().item() if i else 0.0
            bar.set_postfix(loss=f"{run_loss:.3f}", acc=f"{run_acc:.3f}")
        acc = evaluate_accuracy(model, val_loader, device)
        history.append({"epoch": epoch, "val_accuracy": acc, "train_loss": run_loss, "seconds": time.time() - t0})
        log(f"epoch {epoch}: val accuracy {acc:.4f} ({time.time() - t0:.0f}s)")
        if acc > best:
            best = acc
            save_cnn(model, path, val_accuracy=acc, epoch=epoch, config=to_dict(cfg), dataset=cfg.data.source,
                     history=history, half=cfg.cnn.save_half)
    if cfg.cnn.epochs == 0:
        best = evaluate_accuracy(model, val_loader, device)
        save_cnn(model, path, val_accuracy=best, epoch=0, config=to_dict(cfg), dataset=cfg.data.source,
                 half=cfg.cnn.save_half)
    log(f"classifier: best val accuracy {best:.4f}, checkpoint {path} ({time.time() - t0:.0f}s)")
    return {"checkpoint": str(path), "val_accuracy": best, "seconds": time.time() - t0, "history": history}
