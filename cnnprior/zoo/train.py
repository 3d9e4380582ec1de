"""Training one zoo member on the config's data: a short, seeded, one-thread CPU run that any machine repeats bit
for bit; its checkpoint (the project's CNN format plus the descriptor) and how to load it back.

The recipe is the classifier stage's (cnn/train.py) made small: every member sees the same train split
(`data.*`), `zoo.epochs` epochs of `zoo.batch_size` (the last partial batch dropped), the epoch order of
`core.runtime.epoch_order(seed, epoch)`, random flips and shifts of up to 1/16 of the size, cross-entropy with
label smoothing 0.05, gradients clipped to norm `CLIP`, a 5 % linear warm-up then a cosine decay, and the
optimiser, learning rate and weight decay of the descriptor (`sgd`: Nesterov momentum 0.9; `adam`: L2 weight
decay; `adamw`: decoupled). The checkpoint is the epoch of best validation accuracy. A loss that stops being finite
ends the run (`diverged`).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnnprior.cnn.model import TargetCNN, save_cnn
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import epoch_order, load_checkpoint
from cnnprior.data.splits import load_split
from cnnprior.zoo.families import build_member

__all__ = ["accuracy", "CLIP", "load_member", "OPTIMIZERS", "save_member", "split_tensors", "threads", "train_member"]

OPTIMIZERS = ("adamw", "adam", "sgd")
CLIP = 5.0  # gradient-norm clipping: members without normalisation survive their first steps at high rates
_SPLITS: dict[tuple, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}


@contextmanager
def threads(count: int):
    """torch's intra-op threads set to `count` for the block (a member's numbers depend on it)."""
    old = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def split_tensors(data, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images (N,3,S,S) in [0,1], labels (N,), class names) of one split of a `data:` section, loaded once per
    process (every member of a worker trains on the same tensors)."""
    key = (split, tuple(sorted((k, repr(v)) for k, v in vars(data).items() if k != "num_workers")))
    if key not in _SPLITS:
        ds = load_split(data, split)
        if len(ds) == 0:
            raise UserError(f"data gives no {split} images; raise data.limit or data.val_fraction")
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        _SPLITS[key] = images, torch.as_tensor(ds.labels, dtype=torch.long), list(ds.class_names)
    return _SPLITS[key]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and one random shift per batch by up to 1/16 of the size (reflect padding)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    pad = max(1, h // 16)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return xp[:, :, dy:dy + h, dx:dx + w]


def _optimizer(desc: dict, params) -> torch.optim.Optimizer:
    name, lr, wd = desc["optimizer"], float(desc["lr"]), float(desc["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise UserError(f"zoo: optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    hits = sum(int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
               for i in range(0, len(images), batch))
    return hits / max(1, len(images))


def train_member(desc: dict, data, log=print) -> tuple[TargetCNN, dict]:
    """Train the member `desc` on `data` (a `data:` section) -> (model at its best epoch, in eval mode; summary
    {val_accuracy, epoch, history, diverged, seconds, epoch_seconds, params, train_images, val_images}). The
    history holds no timing, so that the checkpoint is the same file on every run."""
    t0 = time.time()
    x, y, class_names = split_tensors(data, "train")
    vx, vy, _ = split_tensors(data, "val")
    seed, epochs, bs = int(desc["seed"]), int(desc["epochs"]), int(desc["batch_size"])
    model = build_member(desc, class_names, int(desc["image_size"]))
    opt = _optimizer(desc, model.parameters())
    per_epoch = len(x) // bs if len(x) > bs else 1
    steps = max(1, epochs * per_epoch)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    aug = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, history, times, diverged = -1.0, None, 0, [], [], False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            model.train()
            order = epoch_order(seed, epoch, len(x))
            total = 0.0
            for b in range(per_epoch):
                idx = order[b * bs:(b + 1) * bs]
                loss = F.cross_entropy(model(_augment(x[idx], aug)), y[idx], label_smoothing=0.05)
                if not torch.isfinite(loss):
                    diverged = True
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                opt.step()
                sched.step()
                total += loss.item()
            if diverged:
                log(f"zoo: {desc['id']}: loss not finite in epoch {epoch + 1}; training stopped")
                break
            acc = accuracy(model, vx, vy)
            history.append({"epoch": epoch + 1, "val_accuracy": acc, "train_loss": total / per_epoch})
            times.append(round(time.time() - t0, 3))  # apart from the history: the checkpoint holds no timing
            if acc > best:
                best, best_epoch = acc, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # diverged in the first epoch (or no epochs): the weights as they are
        best = accuracy(model, vx, vy)
    model.eval()
    return model, {"val_accuracy": best, "epoch": best_epoch, "history": history, "diverged": diverged,
                   "seconds": time.time() - t0, "epoch_seconds": times, "params": sum(p.numel() for p in model.parameters()),
                   "train_images": len(x), "val_images": len(vx)}


def _interned(value):
    """`value` with every string interned: pickle shares equal strings only when they are one object, so without
    this the checkpoint's bytes would depend on where the descriptor came from (a worker unpickles its own)."""
    if isinstance(value, dict):
        return {_interned(k): _interned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interned(v) for v in value]
    return sys.intern(value) if isinstance(value, str) else value


def save_member(model: TargetCNN, path: str | Path, desc: dict, summary: dict, dataset: str) -> Path:
    """The project's CNN checkpoint (cnn.model.save_cnn) with the descriptor under `zoo`: the same bytes for the
    same member wherever it was trained."""
    desc = _interned(desc)
    return save_cnn(model, path, val_accuracy=summary["val_accuracy"], epoch=summary["epoch"],
                    config={"zoo": desc}, dataset=sys.intern(dataset), history=_interned(summary["history"]),
                    extra={"zoo": desc})


def load_member(path: str | Path, device: str | torch.device = "cpu") -> tuple[TargetCNN, dict]:
    """A zoo member's checkpoint -> (model in eval mode, metadata); rebuilt from its descriptor."""
    ckpt = load_checkpoint(path, "zoo member")
    desc = ckpt.get("zoo")
    if not isinstance(desc, dict):
        raise UserError(f"{path}: not a zoo member checkpoint (no descriptor); load other CNNs with "
                        f"cnnprior.cnn.model.load_cnn")
    model = build_member(desc, ckpt["class_names"], ckpt["image_size"])
    model.net.load_state_dict(ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.to(device).eval(), meta
